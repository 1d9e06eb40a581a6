"""The daemon: ServiceList entries become listeners; signals stop and refresh it.

One gevent StreamServer per listed endpoint, as the legacy AService opened one listener per port.
The pid file is ``<config dir>/mmproxy.pid`` (mmproxy/pidfile.py: written atomically, locked while the
daemon runs) so several instances (tests, a staging copy) coexist and a second start on one directory
is refused.  Under systemd (``Type=notify``) the main process tells it READY / RELOADING / STOPPING
(mmproxy/sdnotify.py).

``NumThreads N`` > 1 runs N worker processes (one gevent hub each; Python cannot spread a hub over
cores).  Each worker opens its own listeners with SO_REUSEPORT, so the kernel balances accepted
connections across them; the master only watches: it forwards SIGTERM/SIGHUP and replaces a worker
that dies.
"""
from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import resource
import signal
import socket
import sqlite3
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import gevent
import gevent.monkey
from gevent import socket as gsocket
from gevent.event import Event
from gevent.server import StreamServer

from mmproxy import logs, pidfile, pump, sdnotify, session, state
from mmproxy.config import Config, Problem, load_config
from mmproxy.config.types import Endpoint
from mmproxy.errors import ConfigError
from mmproxy.imap import ImapService
from mmproxy.pop import PopService
from mmproxy.session import Service
from mmproxy.smtp import SmtpService

log = logging.getLogger("mmproxy.aservice")

SERVICE_CLASSES: Dict[str, type] = {cls.kind: cls for cls in (ImapService, PopService, SmtpService)}


def service_class(kind: str) -> Optional[type]:
    """The Service class for a ServiceList kind (None for a kind no protocol module serves)."""
    return SERVICE_CLASSES.get(kind)


BACKLOG = 1024


class AcceptBackoff(OSError):
    """accept() failed for want of descriptors: gevent's server backs off instead of spinning."""


class Listener(StreamServer):
    """A StreamServer that leaves the socket to the session (after login the pump owns it) and
    treats running out of descriptors as a reason to pause accepting, not as a crash."""

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                _warn_once("accept failed: %s; pausing accepts" % e.strerror)
                raise AcceptBackoff(e.errno, e.strerror) from None
            raise

    def do_close(self, sock: Any, *args: Any) -> None:
        pass


_last_warning = [0.0]


def _warn_once(message: str) -> None:
    now = time.monotonic()
    if now - _last_warning[0] > 10:
        _last_warning[0] = now
        log.warning(message)


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _run_as(user: Optional[str], group: Optional[str]) -> Optional[Tuple[int, int]]:
    """(uid, gid) that BeTheUser/BeTheGroup will switch to, or None when the process stays as it is."""
    if (not user and not group) or os.geteuid() != 0:
        return None
    pw = pwd.getpwnam(user) if user else None
    gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw else os.getegid())
    return (pw.pw_uid if pw else os.geteuid(), gid)


def drop_privileges(user: Optional[str], group: Optional[str]) -> None:
    """BeTheUser / BeTheGroup: once the ports are bound (and keys read), stop being root."""
    if not user and not group:
        return
    if os.geteuid() != 0:
        log.warning("not running as root: BeTheUser/BeTheGroup ignored (running as uid %d)", os.geteuid())
        return
    pw = pwd.getpwnam(user) if user else None
    gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw else os.getegid())
    if pw:
        os.initgroups(pw.pw_name, gid)
    else:
        os.setgroups([gid])
    os.setgid(gid)
    if pw:
        os.setuid(pw.pw_uid)


def runtime_problems(config: Config) -> List[Problem]:
    """Checks that need more than the files: certificates and keys load, the run-as user exists."""
    from mmproxy import tls
    out = []
    a = config.aservice

    def problem(cfg: Any, file: str, name: str, severity: str, message: str) -> Problem:
        where = cfg.where(name)
        path, _, line = where.rpartition(":") if where else (file, "", "")
        return Problem(path, int(line) if line else None, severity, message)

    aservice_file = os.path.join(config.dir, "AService.cfg")
    for name, value, lookup in (("BeTheUser", a.BeTheUser, pwd.getpwnam), ("BeTheGroup", a.BeTheGroup, grp.getgrnam)):
        if value:
            try:
                lookup(value)
            except KeyError:
                out.append(problem(a, aservice_file, name, "error", "%s %s: no such %s on this system"
                                   % (name, value, "user" if name == "BeTheUser" else "group")))
    for cfg, file in [(a, aservice_file)] + [(e.cfg, e.file) for e in config.services]:
        if cfg.LogDir and not os.path.isdir(cfg.LogDir):
            out.append(problem(cfg, file, "LogDir", "warning",
                               "LogDir %s does not exist: no log file will be written" % cfg.LogDir))
    for entry in config.services:
        if service_class(entry.spec.kind) is None:
            continue
        cfg = entry.cfg
        if cfg.SSLEnable:
            cert_param = next((n for n in ("SSLCertFile", "SSLCertNicknames", "SSLCacheDir") if cfg.is_set(n)),
                              "SSLEnable")
            out += [problem(cfg, entry.file, cert_param, sev, msg) for sev, msg in tls.certificate_problems(cfg)]
        if entry.spec.kind in ("imap", "pop"):
            try:
                tls.store_context(cfg)
            except ConfigError as e:
                out.append(problem(cfg, entry.file, "SSLBacksideCAFile", "error", str(e)))
            out += certmap_problems(cfg, entry.file, problem)
    return out


def certmap_problems(cfg: Any, file: str, problem: Any) -> List[Problem]:
    """CertmapFile: the file parses (``certmap.conf:line: what``), and what a certificate login
    needs besides is set: TLS, the CAs that client certificates chain to, the store administrator."""
    from mmproxy.certmap import Certmap, CertmapError
    if not cfg.CertmapFile:
        return []
    out = []
    try:
        Certmap.load(cfg.CertmapFile)
    except CertmapError as e:
        out.append(Problem(e.file, e.line, "error", e.message))
    except ConfigError as e:
        out.append(problem(cfg, file, "CertmapFile", "error", str(e)))
    missing = [n for n in ("SSLEnable", "SSLClientCAFile", "StoreAdmin", "StoreAdminPass") if not getattr(cfg, n)]
    if missing:
        out.append(problem(cfg, file, "CertmapFile", "error", "CertmapFile needs %s for certificate logins"
                           % " and ".join(missing)))
    return out


class AService:
    """One process serving every listener; a worker when ``worker`` is set (no pid file then)."""

    def __init__(self, config: Config, foreground: bool = True, worker: Optional[int] = None) -> None:
        self.config = config
        self.foreground = foreground
        self.worker = worker
        self.services: Dict[Tuple[str, str], Service] = {}
        self.listeners: List[Listener] = []
        self.stopped = Event()
        self.pidfile = pidfile.Pidfile(pidfile.path_for(config.dir)) if worker is None else None

    def start(self) -> None:
        a = self.config.aservice
        logs.set_owner(_run_as(a.BeTheUser, a.BeTheGroup))
        logs.configure("aservice", a.LogDir, a.LogLevel, self.foreground)
        session.set_worker(self.worker)
        if self.pidfile is not None:
            self.pidfile.acquire()          # before anything of a running daemon's is touched
        if self.worker is None:
            state.use(state.LocalState.create(_run_as(a.BeTheUser, a.BeTheGroup)))
        else:
            state.store().worker = self.worker
        _raise_nofile()
        gevent.get_hub().NOT_ERROR += (AcceptBackoff,)     # paused accepts are not worth a traceback
        try:
            for entry in self.config.services:
                kind = entry.spec.kind
                cls = service_class(kind)
                if cls is None:
                    log.warning("%s (%s) is not served: its listeners %s are not opened",
                                kind, entry.spec.instance, _eps(entry.spec.listeners))
                    continue
                logs.configure(kind, entry.cfg.LogDir, entry.cfg.LogLevel, self.foreground)
                service = cls(entry)
                self.services[(kind, entry.spec.instance)] = service
                for ep in entry.spec.listeners:
                    self._listen(service, ep.host, ep.port)
        except (ConfigError, OSError, pidfile.PidfileError):
            self.close_listeners()
            if self.pidfile is not None:
                self.pidfile.release()
                state.store().remove()
            raise
        if self.pidfile is not None:
            try:
                self.pidfile.write()
            except pidfile.PidfileError:
                self.close_listeners()
                self.pidfile.release()
                state.store().remove()
                raise
        drop_privileges(a.BeTheUser, a.BeTheGroup)
        gevent.signal_handler(signal.SIGTERM, self.stop)
        gevent.signal_handler(signal.SIGINT, self.stop if self.worker is None else lambda: None)
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self._sighup))
        log.info("mmproxy %s (pid %d): %s", "started" if self.worker is None else "worker %d started" % self.worker,
                 os.getpid(),
                 ", ".join("%s on %s" % (k, _eps(s.entry.spec.listeners)) for (k, _), s in self.services.items()))
        if self.worker is None:
            sdnotify.notify("READY=1", "STATUS=accepting connections")

    def _sighup(self) -> None:
        """SIGHUP: refresh; systemd hears RELOADING=1 before and READY=1 after (sd_notify(3))."""
        if self.worker is None:
            sdnotify.notify(*sdnotify.reloading())
        try:
            self.refresh()
        finally:
            if self.worker is None:
                sdnotify.notify("READY=1", "STATUS=accepting connections")

    def _listen(self, service: Service, host: str, port: int) -> None:
        implicit = service.implicit_tls(host, port)

        def handle(sock: Any, addr: Any) -> None:
            service.handle(sock, addr, implicit)

        try:
            server = Listener(listen_socket(host, port, self.worker is not None), handle)
            server.start()
        except OSError as e:
            raise ConfigError("%s: cannot listen on %s:%d: %s"
                              % (service.entry.file, host or "*", port, e.strerror)) from None
        self.listeners.append(server)

    def serve_forever(self) -> None:
        self.stopped.wait()

    def close_listeners(self) -> None:
        for server in self.listeners:
            server.close()
        self.listeners = []

    def stop(self) -> None:
        """SIGTERM: stop accepting, say goodbye to sessions not yet pumped, end the pumps."""
        if self.stopped.is_set():
            return
        if self.worker is None:
            sdnotify.notify("STOPPING=1")
        log.info("stopping")
        self.close_listeners()
        greenlets = [s.greenlet for svc in self.services.values() for s in list(svc.sessions) if s.greenlet]
        gevent.killall(greenlets, block=True, timeout=5)
        pump.close_all("server shutting down")
        for svc in self.services.values():
            svc.close()
        if self.pidfile is not None:
            self.pidfile.release()
            state.store().remove()
        self.stopped.set()

    def refresh(self) -> None:
        """SIGHUP: new sessions get the new settings; running ones keep theirs; bad files change nothing."""
        config = load_config(self.config.dir)
        problems = config.errors + [p for p in runtime_problems(config) if p.severity == "error"]
        if problems:
            for p in problems:
                log.error("refresh refused: %s", p)
            return
        for entry in config.services:
            key = (entry.spec.kind, entry.spec.instance)
            old = self.services.get(key)
            if old is None:
                log.warning("refresh: %s is new in ServiceList; restart to open its listeners", entry.spec.instance)
                continue
            if [(e.host, e.port) for e in entry.spec.listeners] != [(e.host, e.port) for e in old.entry.spec.listeners]:
                log.warning("refresh: listeners of %s changed; restart to apply", entry.spec.instance)
            new = type(old)(entry)
            new.sessions = old.sessions
            self._swap(old, new)
            logs.configure(entry.spec.kind, entry.cfg.LogDir, entry.cfg.LogLevel, self.foreground)
        self.config = config
        log.info("configuration refreshed")

    def _swap(self, old: Service, new: Service) -> None:
        # The listeners' handlers hold the old object: give it the new settings in place.
        old_directory = getattr(old, "directory", None)
        old.__dict__.update({k: v for k, v in new.__dict__.items() if k != "sessions"})
        if old_directory is not None:                   # SMTP has none
            gevent.spawn_later(60, old_directory.close)     # lookups in flight may still use it


_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class Master:
    """NumThreads > 1: fork the workers, forward signals, replace a worker that dies.

    The master never starts a gevent hub: it forks from a clean state and polls its children with
    the plain calls, so a worker inherits no greenlets and no signal watchers of its parent.
    """

    RESPAWN_DELAY = 1.0
    POLL = 0.2

    def __init__(self, config: Config, workers: int, foreground: bool = True) -> None:
        self.config = config
        self.n = workers
        self.foreground = foreground
        self.pids: Dict[int, int] = {}          # pid -> worker number
        self.due: Dict[int, float] = {}         # worker number -> when to start it again
        self.pending: List[int] = []
        self.stopping = False
        self.state: Optional[state.LocalState] = None      # the master's own handle on the store
        self.pidfile = pidfile.Pidfile(pidfile.path_for(config.dir))
        self.ready_w: Optional[int] = None      # the first workers say on this pipe that they listen

    def start(self) -> None:
        a = self.config.aservice
        logs.set_owner(_run_as(a.BeTheUser, a.BeTheGroup))
        logs.configure("aservice", a.LogDir, a.LogLevel, self.foreground)
        self.pidfile.acquire()
        try:
            self._check_listeners()
        except ConfigError:
            self.pidfile.release()
            raise
        # made before the workers are forked: they all open it; the master forgets the connections
        # of a worker that died (through its own handle: the master has no hub to wait on)
        store = state.LocalState.create(_run_as(a.BeTheUser, a.BeTheGroup))
        state.use(store)
        self.state = state.LocalState(store.path, sleep=_orig("time", "sleep"))
        for sig in _SIGNALS:
            _orig("signal", "signal")(sig, lambda signum, frame: self.pending.append(signum))
        ready_r, self.ready_w = os.pipe()
        try:
            for i in range(self.n):
                self._spawn(i)
        finally:
            os.close(self.ready_w)
            self.ready_w = None
        listening = _count_ready(ready_r, self.n)
        os.close(ready_r)
        self.pidfile.write()
        log.info("mmproxy started (pid %d) with %d worker processes", os.getpid(), self.n)
        if listening < self.n:
            log.warning("%d of %d workers did not start listening", self.n - listening, self.n)
        sdnotify.notify("READY=1", "STATUS=accepting connections (%d workers)" % self.n)

    def _check_listeners(self) -> None:
        for entry in self.config.services:      # fail here, once, rather than in every worker
            if service_class(entry.spec.kind) is not None:
                for ep in entry.spec.listeners:
                    try:
                        _plain_listen_check(ep.host, ep.port)
                    except OSError as e:
                        raise ConfigError("%s: cannot listen on %s:%d: %s"
                                          % (entry.file, ep.host or "*", ep.port, e.strerror)) from None

    def _spawn(self, i: int) -> None:
        # Signals wait until the child has dropped the master's handlers (they would queue the
        # signal in the child's copy of ``pending`` and lose it).
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = _orig("os", "fork")()
            if pid == 0:
                for sig in _SIGNALS:
                    _orig("signal", "signal")(sig, signal.SIG_DFL)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        if pid == 0:
            gevent.reinit()
            code = 1
            try:
                worker = AService(self.config, self.foreground, worker=i)
                worker.start()
                if self.ready_w is not None:
                    os.write(self.ready_w, b".")
                    os.close(self.ready_w)
                worker.serve_forever()
                code = 0
            finally:
                # the child never returns into the master's code: what went wrong is logged here
                if code:
                    log.error("worker %d failed", i, exc_info=sys.exc_info()[0] is not None)
                logging.shutdown()
                os._exit(code)
        self.pids[pid] = i

    def _forward(self, sig: int) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def serve_forever(self) -> None:
        waitpid, sleep = _orig("os", "waitpid"), _orig("time", "sleep")
        while self.pids or (self.due and not self.stopping):
            while self.pending:
                sig = self.pending.pop(0)
                if sig == signal.SIGHUP:
                    sdnotify.notify(*sdnotify.reloading())
                    self._forward(signal.SIGHUP)
                    sdnotify.notify("READY=1", "STATUS=accepting connections (%d workers)" % self.n)
                elif not self.stopping:
                    sdnotify.notify("STOPPING=1")
                    self.stopping = True
                    log.info("stopping %d workers", len(self.pids))
                    self._forward(signal.SIGTERM)
            while self.pids:
                try:
                    pid, status = waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    self.pids.clear()
                    break
                if pid == 0:
                    break
                i = self.pids.pop(pid, None)
                if i is not None and not self.stopping:
                    log.error("worker %d (pid %d) %s; starting a new one", i, pid, _ended(status))
                    self._forget(i)
                    self.due[i] = time.monotonic() + self.RESPAWN_DELAY
            for i, when in list(self.due.items()):
                if self.stopping:
                    self.due.clear()
                elif when <= time.monotonic():
                    del self.due[i]
                    self._spawn(i)
            sleep(self.POLL)
        self.pidfile.release()
        state.store().remove()
        if self.state is not None:
            self.state.close()

    def _forget(self, worker: int) -> None:
        """A worker died: the connections it counted (ConnLimits) are closed; give their slots back."""
        assert self.state is not None
        try:
            n = self.state.forget_worker(worker)
        except (state.StateBusy, sqlite3.Error) as e:
            log.error("connections of worker %d not given back: %s", worker, e)
            return
        if n:
            log.info("gave back %d connection slot(s) of worker %d", n, worker)


def _ended(status: int) -> str:
    """How a child process ended, from its waitpid() ``status``: "was killed by signal 9 (SIGKILL)"
    or "exited with status 1"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return "was killed by signal %d (%s)" % (sig, signal.Signals(sig).name)
        except ValueError:
            return "was killed by signal %d" % sig
    return "exited with status %d" % os.waitstatus_to_exitcode(status)


def _orig(module: str, name: str) -> Any:
    return gevent.monkey.get_original(module, name)


def _plain_listen_check(host: str, port: int) -> None:
    """Bind (SO_REUSEPORT) and close, with the unpatched socket module: the master has no hub."""
    sock_cls = _orig("socket", "socket")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = sock_cls(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    finally:
        s.close()


def daemon(config: Config, foreground: bool = True) -> Union[AService, Master]:
    """The process model NumThreads asks for: one AService, or a Master over worker processes."""
    n = max(1, int(config.aservice.NumThreads or 1))
    return AService(config, foreground) if n == 1 else Master(config, n, foreground)


def _count_ready(fd: int, n: int, timeout: float = 30.0) -> int:
    """How many of ``n`` workers wrote their byte on the pipe ``fd`` (they listen), waiting until
    all did, all write ends closed, or ``timeout`` seconds (with the plain calls: no hub here)."""
    select, read = _orig("select", "select"), _orig("os", "read")
    deadline = time.monotonic() + timeout
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select([fd], [], [], left)[0]:
            break
        chunk = read(fd, n - got)
        if not chunk:
            break
        got += len(chunk)
    return got


def _eps(listeners: Iterable[Endpoint]) -> str:
    return "|".join("%s%d" % (("%s:" % e.host) if e.host else "", e.port) for e in listeners)


def _raise_nofile() -> None:
    """Every session holds two descriptors; take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
