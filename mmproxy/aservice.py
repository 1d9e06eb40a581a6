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
import functools
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

from mmproxy import control, fleet, logs, pidfile, pump, redisstate, sdnotify, session, state
from mmproxy.config import Config, Problem, load_config
from mmproxy.config.params import PARAMS
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
# A ServiceList entry: (kind, instance, section, n) where n counts the earlier entries with the same
# kind, instance and section: two entries naming one .cfg file (or one section of it) are two services
ServiceKey = Tuple[str, str, str, int]
QUIET = 2.0          # seconds without traffic after which a relayed session is told at once when stopping


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
    try:
        run_as = _run_as(a.BeTheUser, a.BeTheGroup)
    except KeyError:
        run_as = None                           # said above
    for cfg, file in [(a, aservice_file)] + [(e.cfg, e.file) for e in config.services]:
        if cfg.LogDir and not os.path.isdir(cfg.LogDir):
            out.append(problem(cfg, file, "LogDir", "warning",
                               "LogDir %s does not exist: no log file will be written" % cfg.LogDir))
        elif cfg.LogDir and run_as is not None and not _can_create_in(cfg.LogDir, a.BeTheUser, *run_as):
            out.append(problem(cfg, file, "LogDir", "warning",
                               "LogDir %s: %s cannot create files there: each day's file after the start's is "
                               "made by that account, so none would be written" % (cfg.LogDir, _who(a))))
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


def _can_create_in(directory: str, user: Optional[str], uid: int, gid: int) -> bool:
    """Whether the account ``uid``/``gid`` (``user``'s supplementary groups too) may create files
    in ``directory`` by its mode bits (write and search; ACLs are not looked at)."""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    if uid == 0:
        return True
    if st.st_uid == uid:
        bits = 0o300
    elif st.st_gid in (os.getgrouplist(user, gid) if user else [gid]):
        bits = 0o030
    else:
        bits = 0o003
    return st.st_mode & bits == bits


def _who(a: Any) -> str:
    return " ".join("%s %s" % (n, getattr(a, n)) for n in ("BeTheUser", "BeTheGroup") if getattr(a, n))


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
    """One process serving every listener; a worker when ``worker`` is set (no pid file then).

    ``services`` holds the Service of each ServiceList entry now in force and ``routes`` which one
    each listening endpoint hands its connections to: a listener looks its service up at accept
    time, so a refresh that replaces a service, moves a port to another service or into
    ``SSLPorts`` applies to the next connection, while sessions already running keep the object
    (and the settings) they started with.
    """

    def __init__(self, config: Config, foreground: bool = True, worker: Optional[int] = None) -> None:
        self.config = config
        self.foreground = foreground
        self.worker = worker
        self.services: Dict[ServiceKey, Service] = {}
        self.routes: Dict[Tuple[str, int], Tuple[Service, bool, bool]] = {}   # endpoint -> _routes()
        self.listeners: Dict[Tuple[str, int], Listener] = {}
        self.retired: List[Service] = []          # replaced by a refresh; their sessions may still run
        self.stopping = False
        self._hurry = float("inf")                # when the stop's grace ends
        self._finishing = False
        self.stopped = Event()
        self.pidfile = pidfile.Pidfile(pidfile.path_for(config.dir)) if worker is None else None
        self.serving = False                      # start() is done: a SIGHUP before then waits for it
        self._refresh_asked = False
        self.started = time.time()
        self.control = control.ControlServer(control.socket_path(config.dir, worker), control.Control(self))
        self.shared: Optional[redisstate.SharedState] = None     # with StateRedisURL: the fleet's state
        self.fleet: Optional[fleet.Subscriber] = None             # ... and its control requests
        self.metrics: Any = None                # metrics.MetricsServer when MetricsAddress is set

    def start(self) -> None:
        a = self.config.aservice
        logs.set_owner(_run_as(a.BeTheUser, a.BeTheGroup))
        logs.configure("aservice", a.LogDir, a.LogLevel, self.foreground)
        session.set_worker(self.worker)
        # From the first moment: `refresh` finds a starting daemon by its pid file's lock (or the
        # master passes a SIGHUP on to a worker it has just forked), and SIGHUP's default action
        # would end it; the refresh runs once the daemon serves.
        gevent.signal_handler(signal.SIGHUP, self._sighup)
        self._refresh_asked = bool(_early_sighups)
        if self.pidfile is not None:
            self.pidfile.acquire()          # before anything of a running daemon's is touched
        if self.worker is None:
            state.use(state.MemoryState())      # one process: nobody else on this box reads the store
        else:
            state.store().worker = self.worker
        if a.StateRedisURL:                     # a fleet: shared through Redis, this box's store behind it
            self.shared = redisstate.SharedState(redisstate.RedisState(
                a.StateRedisURL, a.StateRedisPrefix, fleet.instance_name(a), self.worker, a.StateRedisCAFile),
                state.store())
            state.use(self.shared)
            self.fleet = fleet.Subscriber(a.StateRedisURL, a.StateRedisPrefix, a.StateRedisCAFile,
                                          self.control.control, fleet.instance_name(a))
        _raise_nofile()
        gevent.get_hub().NOT_ERROR += (AcceptBackoff,)     # paused accepts are not worth a traceback
        self._open_control(_run_as(a.BeTheUser, a.BeTheGroup))     # before the listeners: status sees them all
        try:
            self.services = self._make_services(self.config, {})
            self.routes = self._routes(self.services)
            for endpoint in self.routes:
                self.listeners[endpoint] = self._listen(endpoint)
            if a.MetricsAddress:
                self._open_metrics(a.MetricsAddress)
            if self.pidfile is not None:
                self.pidfile.write()
        except (ConfigError, OSError, pidfile.PidfileError):
            self._abandon_start()
            raise
        drop_privileges(a.BeTheUser, a.BeTheGroup)
        self.control.start()
        if self.shared is not None and self.fleet is not None:
            self.shared.start()
            self.fleet.start()
        if self.metrics is not None:
            self.metrics.start()
        gevent.signal_handler(signal.SIGTERM, self.stop)
        gevent.signal_handler(signal.SIGINT, self.stop if self.worker is None else self._interrupt)
        log.info("mmproxy %s (pid %d): %s", "started" if self.worker is None else "worker %d started" % self.worker,
                 os.getpid(),
                 ", ".join("%s on %s" % (s.kind, _eps(s.entry.spec.listeners)) for s in self.services.values()))
        if self.worker is None:
            sdnotify.notify("READY=1", "STATUS=accepting connections")
        else:
            gevent.spawn(self._watch_master, os.getppid())
        self.serving = True
        if self._refresh_asked:
            gevent.spawn(self._sighup)

    def _abandon_start(self) -> None:
        """A start that failed gives back what it had opened: listeners, metrics, the control
        socket, and (one process, or the master) the pid file and the state store."""
        self.close_listeners()
        self.close_metrics()
        self.control.close()
        if self.pidfile is not None:
            self.pidfile.release()
            state.store().remove()

    def _watch_master(self, master: int) -> None:
        """A worker whose master is gone (killed with SIGKILL: nothing forwards signals or holds the
        pid file any more) stops as on SIGTERM, instead of serving on as an orphan."""
        while not self.stopping:
            gevent.sleep(1.0)
            if os.getppid() != master:
                log.error("worker %s: the master process (pid %d) is gone; stopping", self.worker, master)
                self.stop()
                return

    def _sighup(self) -> None:
        """SIGHUP: refresh; systemd hears RELOADING=1 before and READY=1 after (sd_notify(3)).
        Before the daemon serves, only noted: the refresh runs at the end of :meth:`start`."""
        if not self.serving:
            self._refresh_asked = True
            return
        if self.stopping:               # nothing to refresh, and systemd must not hear READY=1 now
            return
        if self.worker is None:
            sdnotify.notify(*sdnotify.reloading())
        try:
            self.refresh()
        finally:
            if self.worker is None:
                sdnotify.notify("READY=1", "STATUS=accepting connections")

    def _make_services(self, config: Config, previous: Dict[ServiceKey, Service]) -> Dict[ServiceKey, Service]:
        """A Service for each ServiceList entry a protocol module serves (its log configured); what a
        service of ``previous`` holds that the new settings leave as they were (the directory with
        its caches and connections) is taken over.  ConfigError when one cannot be made."""
        out: Dict[ServiceKey, Service] = {}
        for entry in config.services:
            kind = entry.spec.kind
            cls = service_class(kind)
            if cls is None:
                log.warning("%s (%s) is not served: its listeners %s are not opened",
                            kind, entry.spec.instance, _eps(entry.spec.listeners))
                continue
            logs.configure(kind, entry.cfg.LogDir, entry.cfg.LogLevel, self.foreground)
            key = (kind, entry.spec.instance, entry.spec.section.lower(), 0)
            while key in out:
                key = key[:3] + (key[3] + 1,)
            out[key] = cls(entry, previous.get(key))
        return out

    def _open_control(self, owner: Optional[Tuple[int, int]]) -> None:
        """The control socket (status, who, kick), made while still root.  Without it the proxy
        still serves: the log says why ``mmproxy status`` cannot see this process."""
        try:
            if self.worker is None:
                control.prepare(self.config.dir, owner)
            self.control.open(owner)
        except OSError as e:
            log.error("control socket %s not opened: %s", self.control.path, e.strerror or e)

    def _open_metrics(self, address: Endpoint) -> None:
        """MetricsAddress: the Prometheus endpoint, bound while still root (SO_REUSEPORT in every
        worker: whichever takes a scrape answers for all).  ConfigError when it cannot listen."""
        from mmproxy.metrics import MetricsServer
        host, port = address
        try:
            sock = listen_socket(host, port, self.worker is not None)
        except OSError as e:
            raise ConfigError("%s: MetricsAddress: cannot listen on %s:%d: %s"
                              % (self.config.aservice.where("MetricsAddress") or "AService.cfg", host, port,
                                 e.strerror)) from None
        self.metrics = MetricsServer(self.config.dir, fleet.instance_name(self.config.aservice))
        self.metrics.open(sock)

    def close_metrics(self) -> None:
        """The metrics endpoint closes (the process stops, or its start failed)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    @staticmethod
    def _routes(services: Dict[ServiceKey, Service]) -> Dict[Tuple[str, int], Tuple[Service, bool, bool]]:
        """listener (host, port) -> (its service, TLS on accept, a PROXY header first)."""
        return {(ep.host, ep.port): (service, service.implicit_tls(ep.host, ep.port),
                                     service.proxy_protocol(ep.host, ep.port))
                for service in services.values() for ep in service.entry.spec.listeners}

    def _listen(self, endpoint: Tuple[str, int]) -> Listener:
        """A started listener on ``endpoint`` (host, port); ConfigError when the port cannot be had."""
        host, port = endpoint
        try:
            server = Listener(listen_socket(host, port, self.worker is not None),
                              functools.partial(self._accept, endpoint))
            server.start()
        except OSError as e:
            route = self.routes.get(endpoint)
            where = route[0].entry.file if route else "AService.cfg"
            raise ConfigError("%s: cannot listen on %s:%d: %s" % (where, host or "*", port, e.strerror)) from None
        return server

    def _accept(self, endpoint: Tuple[str, int], sock: Any, addr: Any) -> None:
        """A listener's handler: the connection goes to the service in force for ``endpoint`` now."""
        route = self.routes.get(endpoint)
        if route is None or self.stopping:          # its listener is being closed
            sock.close()
            return
        service, implicit, proxied = route
        service.handle(sock, addr, implicit, proxied)

    def serve_forever(self) -> None:
        self.stopped.wait()

    def close_listeners(self) -> None:
        for server in self.listeners.values():
            server.close()
        self.listeners = {}

    def _all_services(self) -> List[Service]:
        return list(self.services.values()) + self.retired

    def stop(self) -> None:
        """SIGTERM: stop accepting at once; sessions before login get the protocol's goodbye now;
        relayed sessions get ``ShutdownGrace`` seconds to finish what they are doing (one that is
        quiet meanwhile is told and closed at once), then the goodbye where it cannot cut a
        response in two, and a close.  A second SIGTERM (or SIGINT) ends the grace at once."""
        if self.stopping:
            if not self.stopped.is_set():
                log.info("stopping now")
                self._end_sessions(grace=0)
            return
        if self.worker is None:
            sdnotify.notify("STOPPING=1")
        self.stopping = True
        self.close_listeners()
        grace = float(self.config.aservice.ShutdownGrace)
        log.info("stopping: listeners closed; %d relayed session(s) get up to %gs", pump.count(), grace)
        self._end_sessions(grace)

    def _interrupt(self) -> None:
        """SIGINT in a worker (the terminal's Ctrl-C reaches the whole process group): only a
        second signal after SIGTERM counts, to end the grace at once."""
        if self.stopping:
            self.stop()

    def _end_sessions(self, grace: float) -> None:
        self._hurry = min(self._hurry, time.monotonic() + grace)
        if grace > 0:
            while time.monotonic() < self._hurry:
                self._kill_idle_sessions()
                pump.end_quiet(QUIET, "shutdown", "server shutting down")
                if not pump.count() and not self._sessions(busy=True):
                    break
                gevent.sleep(min(0.2, max(0.0, self._hurry - time.monotonic())))
        if self._finishing:                     # a second signal got here first
            return
        self._finishing = True
        gevent.killall([s.greenlet for s in self._sessions() if s.greenlet], block=True, timeout=5)
        pump.close_all("server shutting down")
        for svc in self._all_services():
            svc.close()
        self.control.close()
        self.close_metrics()
        if self.fleet is not None:
            self.fleet.close()
        if self.worker is None:
            control.remove(self.config.dir)
        if self.pidfile is not None:
            self.pidfile.release()
            state.store().remove()
        elif self.shared is not None:
            self.shared.remote.remove()         # this worker's slots stop counting in the fleet now
        log.info("stopped")
        self.stopped.set()

    def _sessions(self, busy: Optional[bool] = None) -> List[Any]:
        """Sessions still served by their own greenlet (before login, SMTP); ``busy``: only those in
        the middle of something worth the grace (True) or only the others (False)."""
        return [s for svc in self._all_services() for s in list(svc.sessions)
                if busy is None or s.busy() == busy]

    def _kill_idle_sessions(self) -> None:
        greenlets = [s.greenlet for s in self._sessions(busy=False) if s.greenlet]
        if greenlets:
            gevent.killall(greenlets, block=False)

    def refresh(self) -> None:
        """SIGHUP (legacy: ``refresh mmp``): re-read every file.  Bad files change nothing (each
        problem logged as file:line); good ones apply to new sessions while running sessions keep
        theirs: services are made anew (a directory whose settings did not change is kept, caches
        and connections included), listeners open and close to match ServiceList, ports move into
        and out of SSLPorts for the next connection, and parameters that only a restart applies
        are reported as such."""
        if self.stopping:
            return
        config = reload_config(self.config, self.foreground, report=self.worker is None)
        if config is None:
            return
        try:
            services = self._make_services(config, self.services)
        except (ConfigError, OSError) as e:
            log.error("refresh refused: %s", e)
            return
        routes = self._routes(services)
        opened: Dict[Tuple[str, int], Listener] = {}
        old_routes, self.routes = self.routes, routes
        try:
            for endpoint in routes:
                if endpoint not in self.listeners:
                    opened[endpoint] = self._listen(endpoint)
        except ConfigError as e:
            for server in opened.values():
                server.close()
            self.routes = old_routes
            for svc in services.values():
                self._release(svc, keep=self._all_services())
            log.error("refresh refused: %s", e)
            return
        self.listeners.update(opened)
        for endpoint in [e for e in self.listeners if e not in routes]:
            self.listeners.pop(endpoint).close()
        old = self._all_services()
        for key, svc in services.items():
            if key in self.services:
                svc.sessions = self.services[key].sessions     # one set: status and stop see them all
        self.retired = [s for s in old if s.sessions and all(s.sessions is not n.sessions for n in services.values())]
        self.services = services
        for svc in old:
            self._release(svc, keep=list(services.values()))
        self.config = config
        closed = [e for e in old_routes if e not in routes]
        log.info("configuration refreshed%s", "".join(
            "; %s %s" % (what, ", ".join(_ep(e) for e in eps)) for what, eps in
            (("listening on", list(opened)), ("closed", closed)) if eps))

    def _release(self, svc: Service, keep: List[Service]) -> None:
        """What ``svc`` holds and no service in ``keep`` took over is closed once no session that
        started before the refresh can still need it: a session before login has at most
        ``LoginTimeout`` seconds to get there (10 more for the login's own lookups)."""
        for d in svc.resources():
            if all(d not in k.resources() for k in keep):
                gevent.spawn_later(float(svc.cfg.LoginTimeout) + 10, d.close)


_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_early_sighups: List[int] = []      # SIGHUPs a new worker got before its AService handles them


def _note_sighup(signum: int, frame: Any) -> None:
    _early_sighups.append(signum)


class Master:
    """NumThreads > 1: fork the workers, forward signals, replace a worker that dies.

    The master never starts a gevent hub: it forks from a clean state and polls its children with
    the plain calls, so a worker inherits no greenlets and no signal watchers of its parent.
    """

    RESPAWN_DELAY = 0.2      # a worker that died is started again this soon (the poll adds up to POLL)...
    CRASH_LOOP = 10.0        # ...unless it lived less than this: then the delay doubles each time, up to
    MAX_DELAY = 30.0         # this (a worker that cannot start must not flood the log)
    POLL = 0.2

    def __init__(self, config: Config, workers: int, foreground: bool = True) -> None:
        self.config = config
        self.n = workers
        self.foreground = foreground
        self.pids: Dict[int, int] = {}          # pid -> worker number
        self.due: Dict[int, float] = {}         # worker number -> when to start it again
        self.started: Dict[int, float] = {}     # worker number -> when it was last started
        self.delay: Dict[int, float] = {}       # worker number -> its present respawn delay
        self.pending: List[int] = []
        self.stopping = False
        self.state: Optional[state.LocalState] = None      # the master's own handle on the store
        self.pidfile = pidfile.Pidfile(pidfile.path_for(config.dir))
        self.ready_w: Optional[int] = None      # the first workers say on this pipe that they listen
        self.ready_r: Optional[int] = None

    def start(self) -> None:
        a = self.config.aservice
        logs.set_owner(_run_as(a.BeTheUser, a.BeTheGroup))
        logs.configure("aservice", a.LogDir, a.LogLevel, self.foreground)
        for sig in _SIGNALS:            # before `refresh`/`stop` can find us by the pid file's lock
            _orig("signal", "signal")(sig, lambda signum, frame: self.pending.append(signum))
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
        control.prepare(self.config.dir, _run_as(a.BeTheUser, a.BeTheGroup))     # the workers' sockets go there
        self.state = state.LocalState(store.path, sleep=_orig("time", "sleep"))
        self.ready_r, self.ready_w = os.pipe()
        try:
            for i in range(self.n):
                self._spawn(i)
        finally:
            os.close(self.ready_w)
            self.ready_w = None
        listening = _count_ready(self.ready_r, self.n)
        os.close(self.ready_r)
        self.ready_r = None
        try:
            self.pidfile.write()
        except pidfile.PidfileError:
            self._forward(signal.SIGTERM)           # no worker outlives a master that cannot start
            self.pidfile.release()
            raise
        log.info("mmproxy started (pid %d) with %d worker processes", os.getpid(), self.n)
        if listening < self.n:
            log.warning("%d of %d workers did not start listening", self.n - listening, self.n)
        sdnotify.notify("READY=1", "STATUS=accepting connections (%d workers)" % self.n)

    def _check_listeners(self, config: Optional[Config] = None, held: Iterable[Tuple[str, int]] = ()) -> None:
        """Fail here, once, rather than in every worker: ConfigError naming the file when an
        endpoint of ``config`` (default: the one in force) that the workers do not hold already
        (``held``) cannot be had.  Another process's listener counts even when it set SO_REUSEPORT
        (another mmproxy with NumThreads > 1, under the same uid): the workers' SO_REUSEPORT would
        share the port with it, and the kernel hand it part of our connections."""
        held = set(held)
        for entry in (config or self.config).services:
            if service_class(entry.spec.kind) is not None:
                for ep in entry.spec.listeners:
                    if (ep.host, ep.port) in held:
                        continue
                    try:
                        _plain_listen_check(ep.host, ep.port)
                    except OSError as e:
                        raise ConfigError("%s: cannot listen on %s:%d: %s"
                                          % (entry.file, ep.host or "*", ep.port, e.strerror)) from None
        a = self.config.aservice
        if a.MetricsAddress:
            try:
                _plain_listen_check(*a.MetricsAddress)
            except OSError as e:
                raise ConfigError("%s: MetricsAddress: cannot listen on %s:%d: %s"
                                  % (a.where("MetricsAddress") or "AService.cfg", *a.MetricsAddress,
                                     e.strerror)) from None

    def _spawn(self, i: int) -> None:
        # Signals wait until the child has dropped the master's handlers (they would queue the
        # signal in the child's copy of ``pending`` and lose it).
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = _orig("os", "fork")()
            if pid == 0:
                for sig in _SIGNALS:
                    _orig("signal", "signal")(sig, _note_sighup if sig == signal.SIGHUP else signal.SIG_DFL)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        if pid == 0:
            gevent.reinit()
            code = 1
            try:
                self._close_masters_descriptors()
                worker = AService(self.config, self.foreground, worker=i)
                try:
                    worker.start()
                except (ConfigError, pidfile.PidfileError) as e:    # e.g. a certificate file gone
                    log.error("worker %d cannot start: %s", i, e)
                    raise SystemExit(1) from None
                if self.ready_w is not None:
                    os.write(self.ready_w, b".")
                    os.close(self.ready_w)
                worker.serve_forever()
                code = 0
            except SystemExit:
                pass
            finally:
                # the child never returns into the master's code: what went wrong is logged here
                exc = sys.exc_info()[0]
                if code and exc is not None and exc is not SystemExit:
                    log.error("worker %d failed", i, exc_info=True)
                logging.shutdown()
                os._exit(code)
        self.pids[pid] = i
        self.started[i] = time.monotonic()

    def _close_masters_descriptors(self) -> None:
        """In a new worker: the pid file (a worker must not keep it open: the master's lock is the
        daemon's, and a stale copy would outlive a replaced pid file) and the start-up pipe's read end."""
        for fd in (self.pidfile.fd, self.ready_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

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
                    if not self.stopping:
                        sdnotify.notify(*sdnotify.reloading())
                        self.refresh()
                        sdnotify.notify("READY=1", "STATUS=accepting connections (%d workers)" % self.n)
                elif not self.stopping:
                    sdnotify.notify("STOPPING=1")
                    self.stopping = True
                    log.info("stopping %d workers", len(self.pids))
                    self._forward(signal.SIGTERM)
                else:                           # a second signal: the workers end their grace at once
                    log.info("stopping now")
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
                    self.due[i] = time.monotonic() + self._respawn_delay(i)
            for i, when in list(self.due.items()):
                if self.stopping:
                    self.due.clear()
                elif when <= time.monotonic():
                    del self.due[i]
                    self._spawn(i)
            sleep(self.POLL)
        self.pidfile.release()
        control.remove(self.config.dir)
        state.store().remove()
        if self.state is not None:
            self.state.close()

    def _respawn_delay(self, i: int) -> float:
        """How long worker ``i``, just dead, waits for its replacement: RESPAWN_DELAY, doubling (up
        to MAX_DELAY) while each replacement dies within CRASH_LOOP seconds of its start."""
        if time.monotonic() - self.started.get(i, 0.0) >= self.CRASH_LOOP:
            self.delay[i] = self.RESPAWN_DELAY
        else:
            self.delay[i] = min(self.MAX_DELAY, max(1.0, 2 * self.delay.get(i, 0.5)))
        return self.delay[i]

    def refresh(self) -> None:
        """SIGHUP: the master reads the files too, so that a worker it starts from now on (one
        replacing a worker that died) runs the configuration in force, then the workers refresh.
        A configuration with errors changes nothing anywhere (each problem logged as file:line)."""
        config = reload_config(self.config, self.foreground)
        if config is None:
            return
        try:            # a listener the workers could not open: they would refuse, replacements die
            self._check_listeners(config, held=_endpoints(self.config))
        except ConfigError as e:
            log.error("refresh refused: %s", e)
            return
        self.config = config
        self._forward(signal.SIGHUP)

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
    """Bind and close, with the unpatched socket module (the master has no hub); OSError when the
    port is taken.  Without SO_REUSEPORT: a listener of another process fails it, with that
    option set or not (socket(7): every socket must set it, and have the same effective uid)."""
    sock_cls = _orig("socket", "socket")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = sock_cls(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    finally:
        s.close()


def _endpoints(config: Config) -> List[Tuple[str, int]]:
    """The (host, port) of every listener ``config`` opens."""
    return [(ep.host, ep.port) for e in config.services if service_class(e.spec.kind) is not None
            for ep in e.spec.listeners]


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


def _ep(endpoint: Tuple[str, int]) -> str:
    return "%s:%d" % (endpoint[0] or "*", endpoint[1])


def reload_config(current: Config, foreground: bool, report: bool = True) -> Optional[Config]:
    """The configuration of ``current``'s directory read again for a refresh, the AService log
    configured by it; None (each error logged as file:line, nothing changed) when it has errors.
    ``report``: log what only a restart applies (the process that owns the workers does)."""
    # never create_missing here: a file moved away for a moment (an editor's save, a deployment)
    # would come back as the template, and its defaults (ports 143, 993, 110 on every address) apply
    config = load_config(current.dir)
    problems = config.errors + [p for p in runtime_problems(config) if p.severity == "error"]
    if problems:
        for p in problems:
            log.error("refresh refused: %s", p)
        return None
    changed = needs_restart(current, config)
    for name in changed if report else ():
        log.warning("refresh: %s changed from %s to %s: needs a restart (running with %s)", name,
                    _shown(getattr(current.aservice, name)), _shown(getattr(config.aservice, name)),
                    _shown(getattr(current.aservice, name)))
    if changed:                 # what runs (and what a replacement worker gets) keeps the running values
        config.aservice = config.aservice.override({n: getattr(current.aservice, n) for n in changed})
    a = config.aservice
    logs.configure("aservice", a.LogDir, a.LogLevel, foreground)
    return config


def needs_restart(old: Config, new: Config) -> List[str]:
    """The AService.cfg parameters the registry marks ``reload=False`` (NumThreads, BeTheUser,
    BeTheGroup) whose value differs between ``old`` and ``new``: a refresh cannot apply them."""
    return [p.name for p in PARAMS.values() if not p.reload and "A" in p.files
            and getattr(old.aservice, p.name) != getattr(new.aservice, p.name)]


def _shown(value: Any) -> str:
    return "(unset)" if value is None else str(value)


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
