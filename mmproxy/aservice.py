"""The daemon: ServiceList entries become listeners; signals stop and refresh it.

One gevent StreamServer per listed endpoint, as the legacy AService opened one listener per port.
The pid file is ``<config dir>/mmproxy.pid`` so several instances (tests, a staging copy) coexist.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
from typing import Any, Dict, List, Optional, Tuple

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from mmproxy import logs, relay
from mmproxy.config import Problem, load_config
from mmproxy.errors import ConfigError
from mmproxy.session import Service

log = logging.getLogger("mmproxy.aservice")

# kind -> (module, class): one line per protocol module.
SERVICES = {"imap": ("mmproxy.imap", "ImapService"), "pop": ("mmproxy.pop", "PopService"),
            "smtp": ("mmproxy.smtp", "SmtpService")}
NOT_YET = {"pop": "POP3", "smtp": "SMTP"}


def service_class(kind: str) -> Optional[type]:
    """The Service class for a ServiceList kind, or None while that protocol is not implemented."""
    import importlib
    module, name = SERVICES[kind]
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return None
BACKLOG = 1024


class Listener(StreamServer):
    """A StreamServer that leaves the socket to the session: after login the relay owns it."""

    def do_close(self, sock: Any, *args: Any) -> None:
        pass


def pid_file(config_dir: str) -> str:
    return os.path.join(config_dir, "mmproxy.pid")


def running_pid(config_dir: str) -> Optional[int]:
    """The pid recorded for this config directory if that process is alive."""
    try:
        with open(pid_file(config_dir)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def runtime_problems(config: Any) -> List[Problem]:
    """Checks that need more than the files: certificates and keys load."""
    from mmproxy import tls
    out = []
    for entry in config.services:
        if service_class(entry.spec.kind) is not None and entry.cfg.SSLEnable:
            try:
                tls.server_context(entry.cfg)
            except ConfigError as e:
                out.append(Problem(entry.file, None, "error", str(e)))
    return out


class AService:
    def __init__(self, config: Any, foreground: bool = True) -> None:
        self.config = config
        self.foreground = foreground
        self.services: Dict[Tuple[str, str], Service] = {}
        self.listeners: List[Listener] = []
        self.stopped = Event()

    def start(self) -> None:
        a = self.config.aservice
        logs.configure("aservice", a.LogDir, a.LogLevel, self.foreground)
        _raise_nofile()
        try:
            for entry in self.config.services:
                kind = entry.spec.kind
                cls = service_class(kind)
                if cls is None:
                    log.warning("%s service (%s) is not implemented yet: its listeners %s are not opened",
                                NOT_YET.get(kind, kind), entry.spec.instance, _eps(entry.spec.listeners))
                    continue
                logs.configure(kind, entry.cfg.LogDir, entry.cfg.LogLevel, self.foreground)
                service = cls(entry)
                self.services[(kind, entry.spec.instance)] = service
                for ep in entry.spec.listeners:
                    self._listen(service, ep.host, ep.port)
        except BaseException:
            self.close_listeners()
            raise
        with open(pid_file(self.config.dir), "w") as f:
            f.write("%d\n" % os.getpid())
        gevent.signal_handler(signal.SIGTERM, self.stop)
        gevent.signal_handler(signal.SIGINT, self.stop)
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.refresh))
        log.info("mmproxy started (pid %d): %s", os.getpid(),
                 ", ".join("%s on %s" % (k, _eps(s.entry.spec.listeners)) for (k, _), s in self.services.items()))

    def _listen(self, service: Service, host: str, port: int) -> None:
        implicit = service.implicit_tls(host, port)

        def handle(sock: Any, addr: Any) -> None:
            service.handle(sock, addr, implicit)

        server = Listener((host or "0.0.0.0", port), handle, backlog=BACKLOG)
        try:
            server.start()
        except OSError as e:
            raise ConfigError("%s: cannot listen on %s:%d: %s" % (service.entry.file, host or "*", port, e.strerror)) from None
        self.listeners.append(server)

    def serve_forever(self) -> None:
        self.stopped.wait()

    def close_listeners(self) -> None:
        for server in self.listeners:
            server.close()
        self.listeners = []

    def stop(self) -> None:
        """SIGTERM: stop accepting, say BYE to sessions still logging in, end the relays."""
        if self.stopped.is_set():
            return
        log.info("stopping")
        self.close_listeners()
        greenlets = [s.greenlet for svc in self.services.values() for s in list(svc.sessions) if s.greenlet]
        gevent.killall(greenlets, block=True, timeout=5)
        relay.close_all("server shutting down")
        for svc in self.services.values():
            svc.close()
        try:
            os.unlink(pid_file(self.config.dir))
        except OSError:
            pass
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
        old_directory = old.directory
        old.__dict__.update({k: v for k, v in new.__dict__.items() if k != "sessions"})
        gevent.spawn_later(60, old_directory.close)     # lookups in flight may still use it


def _eps(listeners: Any) -> str:
    return "|".join("%s%d" % (("%s:" % e.host) if e.host else "", e.port) for e in listeners)


def _raise_nofile() -> None:
    """Every session holds two descriptors; take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
