"""The control socket: how ``mmproxy status``, ``who`` and ``kick`` (and the metrics endpoint) ask
the processes that serve sessions what they hold.

Every such process (the one process, or each worker when ``NumThreads`` > 1: the master serves no
session) listens on its own AF_UNIX stream socket in ``<config dir>/mmproxy.control/``:
``main.sock``, or ``w<N>.sock`` for worker N (a replacement worker takes its number's socket over).
The directory (mode 0700) and the sockets (mode 0600) belong to the ``BeTheUser`` account (root
without one), made before the process stops being root, so only root and that account can connect;
the peer's uid (SO_PEERCRED) is checked again at each connection.  Whoever starts the daemon
empties the directory first (sockets of an earlier run, e.g. with more workers); a socket that
refuses connections is one nobody serves and is skipped.

The protocol is one JSON object per line each way, one request per connection:
``{"cmd": "status"}``, ``{"cmd": "who", "user": U, "ip": A}``, ``{"cmd": "kick", "user": U, "ip": A}``
(``user``/``ip`` optional filters: the login id, or its part before ``@`` when U has none, case
ignored; an address or a network ``10.0.0.0/8``).  The answer is ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``: a request that does not parse, is too long (MAX_REQUEST) or too
slow (DEADLINE) is answered, never raised.  Requests are served on the hub by greenlets; they
only read in-memory state.
"""
from __future__ import annotations

import errno
import glob
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from mmproxy import fleet, pump, stats
from mmproxy.login import Relayed

log = logging.getLogger("mmproxy.control")

DIR_NAME = "mmproxy.control"
MAX_REQUEST = 4096            # octets of one request line
MAX_ANSWER = 256 << 20        # octets of one answer a client reads (who over 100,000 sessions is ~30 MB)
DEADLINE = 5.0                # seconds a client has to send its request, and a server to answer
CONCURRENT = 8                # requests served at once per process
KICK_REASON = "kicked by the administrator"


def directory(config_dir: str) -> str:
    """Where the control sockets of the daemon of ``config_dir`` are."""
    return os.path.join(config_dir, DIR_NAME)


def socket_path(config_dir: str, worker: Optional[int]) -> str:
    """The control socket of the one process (``worker`` None) or of worker ``worker``."""
    return os.path.join(directory(config_dir), "main.sock" if worker is None else "w%d.sock" % worker)


def prepare(config_dir: str, owner: Optional[Tuple[int, int]]) -> None:
    """Before the daemon serves (and before any worker is forked): the directory exists, is private
    (0700) and belongs to ``owner`` (uid, gid: BeTheUser/BeTheGroup; None: as it runs), and holds
    no socket of an earlier run.  Root follows no link there (the configuration directory may be
    the BeTheUser account's, see safeopen.py): a link or a file at the directory's name is removed,
    and the directory is changed through a descriptor opened with O_NOFOLLOW.  OSError when it
    cannot be made."""
    path = directory(config_dir)
    fd = _open_dir(path)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, 0o700)
        for entry in os.scandir(fd):
            if entry.name.endswith(".sock"):
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)


def _open_dir(path: str) -> int:
    for attempt in (1, 2):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR) or attempt == 2:
                raise
            os.unlink(path)                   # our name, not our directory: the link goes, not its target
    raise AssertionError("unreachable")


def remove(config_dir: str) -> None:
    """The daemon has stopped: its sockets and their directory go (what is not ours stays)."""
    try:
        fd = os.open(directory(config_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return                                # gone, or not our directory
    try:
        for entry in os.scandir(fd):
            if entry.name.endswith(".sock"):
                _unlink(entry.name, fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(directory(config_dir))
    except OSError:
        pass


# ---------------------------------------------------------------------- what a request reads
class Filter:
    """Which relayed sessions a who/kick request means; ValueError for an address that does not parse."""

    def __init__(self, user: Optional[str] = None, ip: Optional[str] = None) -> None:
        self.user = (user or "").strip().lower() or None
        self.net = None
        if ip:
            try:
                self.net = ipaddress.ip_network(str(ip).strip(), strict=False)
            except ValueError:
                raise ValueError("not an address or network: %r" % str(ip)[:80]) from None

    @property
    def empty(self) -> bool:
        """Neither a user nor an address: every session."""
        return self.user is None and self.net is None

    def matches(self, r: Relayed) -> bool:
        """Whether the relayed session ``r`` is one the filter means."""
        if self.user is not None:
            user = r.user.lower()
            if user != self.user and ("@" in self.user or user.partition("@")[0] != self.user):
                return False
        if self.net is not None:
            try:
                if ipaddress.ip_address(r.client_ip) not in self.net:
                    return False
            except ValueError:
                return False
        return True


def relayed() -> Iterable[Tuple[pump.Pump, Relayed]]:
    """This process's relayed sessions (IMAP and POP after login) with what the login recorded."""
    for p in list(pump._PUMPS):
        if isinstance(p.on_close, Relayed) and not p.closed:
            yield p, p.on_close


def session_row(p: pump.Pump, r: Relayed, worker: Optional[int], now: float, proxy: str = "") -> Dict[str, Any]:
    """One line of ``who``: bytes are the client's whole session, pre-login dialogue included;
    ``proxy``: InstanceName (``instance`` is the ServiceList entry's)."""
    return {"user": r.user, "client": _hostport(r.client_ip, r.client_port), "store": _hostport(r.host, r.port),
            "service": r.service, "instance": r.instance,
            "since": round(time.time() - (now - r.started)), "bytes_in": r.received + p.bytes_up,
            "bytes_out": r.sent + p.bytes_down, "worker": worker, "instance_name": proxy}


def _hostport(host: str, port: int) -> str:
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


class Control:
    """The requests one process answers, over ``daemon`` (an AService: ``services``, ``retired``,
    ``routes``, ``worker``, ``started``)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.requests: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
            "status": self.status, "who": self.who, "kick": self.kick, "flush": self.flush}

    @property
    def instance_name(self) -> str:
        """InstanceName, else the host name (fleet.instance_name)."""
        return fleet.instance_name(self.daemon.config.aservice)

    def answer(self, request: Any) -> Dict[str, Any]:
        """The answer to one decoded request; errors are answers too."""
        worker = self.daemon.worker
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with "cmd"', "worker": worker}
        handler = self.requests.get(request["cmd"])
        if handler is None:
            return {"ok": False, "error": "unknown cmd %r (known: %s)" % (request["cmd"][:40], " ".join(self.requests)),
                    "worker": worker}
        try:
            return dict(handler(request), ok=True)
        except ValueError as e:
            return {"ok": False, "error": str(e), "worker": worker}

    def status(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """pid, start time, listeners, sessions per service and phase, and stats.snapshot() with
        the bytes of relays still running added."""
        d = self.daemon
        listeners = [{"service": svc.kind, "instance": svc.entry.spec.instance, "address": _hostport(host or "*", port),
                      "tls": implicit, "proxy_protocol": proxied}
                     for (host, port), (svc, implicit, proxied) in sorted(d.routes.items())]
        sessions: Dict[str, Dict[str, int]] = {}
        for svc in [*d.services.values(), *d.retired]:          # retired: replaced by a refresh, sessions left
            row = sessions.setdefault(svc.kind, {"pre_login": 0, "relaying": 0})
            for s in list(svc.sessions):
                row["relaying" if s.relaying else "pre_login"] += 1
        snap = stats.snapshot()
        live = snap["relayed_bytes"]
        for p, r in relayed():
            sessions.setdefault(r.service, {"pre_login": 0, "relaying": 0})["relaying"] += 1
            row = live.setdefault(r.service, {"up": 0, "down": 0})
            row["up"] += p.bytes_up
            row["down"] += p.bytes_down
        return {"worker": d.worker, "pid": os.getpid(), "started": d.started, "listeners": listeners,
                "sessions": sessions, "stats": snap, "instance_name": self.instance_name}

    def who(self, request: Dict[str, Any]) -> Dict[str, Any]:
        f = Filter(request.get("user"), request.get("ip"))
        now = time.monotonic()
        return {"sessions": [session_row(p, r, self.daemon.worker, now, self.instance_name)
                             for p, r in relayed() if f.matches(r)]}

    def kick(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Close the matching relayed sessions with the protocol's goodbye (``kick`` in GOODBYES)
        where it cannot cut a response in two.  Sessions still logging in are not matched: who
        they are is not known yet (LoginTimeout ends them)."""
        f = Filter(request.get("user"), request.get("ip"))
        if f.empty:
            raise ValueError("kick needs a user or an address")
        victims = [(p, r) for p, r in relayed() if f.matches(r)]
        for p, r in victims:
            r.log.info("kicked by the administrator (mmproxy kick)")
            p.end("kick", KICK_REASON)
        return {"kicked": len(victims), "worker": self.daemon.worker}


    def flush(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Forget the directory caches' entries of one user (directory.Directory.flush_user) in
        every service of this process; the next login of that user asks the directory."""
        user = request.get("user")
        if not isinstance(user, str) or not user.strip() or len(user) > 1024:
            raise ValueError("flush needs a user")
        seen: set = set()
        dropped = 0
        for svc in [*self.daemon.services.values(), *self.daemon.retired]:
            for r in svc.resources():
                if id(r) not in seen and hasattr(r, "flush_user"):
                    seen.add(id(r))
                    dropped += r.flush_user(user)
        log.info("flush %s: %d cached directory entries dropped", user, dropped)
        return {"dropped": dropped, "worker": self.daemon.worker}


# ---------------------------------------------------------------------- the server
class ControlServer:
    """One process's control socket: made by :meth:`open` (while still root), served by
    :meth:`start`, removed by :meth:`close`."""

    def __init__(self, path: str, control: Control) -> None:
        self.path = path
        self.control = control
        self.server: Optional[StreamServer] = None

    def open(self, owner: Optional[Tuple[int, int]]) -> None:
        """Bind the socket, 0600, owned by ``owner`` (uid, gid; None: as the process runs).  A socket
        left at the path (a worker that died) is replaced.  OSError when it cannot be made."""
        _unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)           # never a moment with a wider mode
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            if owner is not None:             # never through a link (the directory may be owner's)
                os.chown(self.path, *owner, follow_symlinks=False)
            sock.listen(CONCURRENT)
        except OSError:
            sock.close()
            raise
        self.server = StreamServer(sock, self._serve, spawn=Pool(CONCURRENT))

    def start(self) -> None:
        """Serve (after :meth:`open`, once privileges are dropped)."""
        if self.server is not None:
            self.server.start()

    def close(self) -> None:
        """Stop serving and remove the socket (the process stops)."""
        if self.server is not None:
            self.server.close()
            self.server = None
            _unlink(self.path)

    def _serve(self, sock: socket.socket, addr: Any) -> None:
        timer = gevent.Timeout(DEADLINE)
        timer.start()
        try:
            try:
                answer = self._answer(sock)
            except gevent.Timeout as e:
                if e is not timer:
                    raise
                answer = {"ok": False, "error": "no complete request within %gs" % DEADLINE}
            finally:
                timer.close()
            sock.settimeout(DEADLINE)
            sock.sendall(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
        except OSError:
            pass                              # the client went away
        finally:
            sock.close()

    def _answer(self, sock: socket.socket) -> Dict[str, Any]:
        uid = _peer_uid(sock)
        if uid not in (0, os.geteuid()):
            log.warning("control socket: refused a request of uid %s", uid)
            return {"ok": False, "error": "permission denied"}
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(MAX_REQUEST + 1 - len(data))
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                return {"ok": False, "error": "request longer than %d octets" % MAX_REQUEST}
        try:
            request = json.loads(data.partition(b"\n")[0] or b"null")
        except ValueError as e:
            return {"ok": False, "error": "request is not JSON: %s" % e}
        try:
            return self.control.answer(request)
        except Exception as e:                # never a traceback for a request: an answer
            log.error("control request %r failed: %s: %s", request.get("cmd"), type(e).__name__, e)
            return {"ok": False, "error": "internal error: %s" % type(e).__name__}


def _peer_uid(sock: socket.socket) -> Optional[int]:
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return int(uid)
    except OSError:
        return None


# ---------------------------------------------------------------------- the client
def ask(config_dir: str, request: Dict[str, Any], timeout: float = DEADLINE) -> List[Tuple[str, Dict[str, Any]]]:
    """``request`` sent to every serving process of the daemon of ``config_dir``: (socket name
    without ``.sock``, answer) in worker order.  A socket that refuses connections (nobody serves
    it) is left out; one that cannot be used is an answer ``{"ok": false, "error": ...}``."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory(config_dir), "*.sock")), key=_order):
        name = os.path.basename(path)[:-5]
        try:
            out.append((name, _ask_one(path, request, timeout)))
        except (ConnectionRefusedError, FileNotFoundError):
            continue                          # a socket nobody serves (a worker that died, an old run)
        except PermissionError:
            out.append((name, {"ok": False, "error": "permission denied: only root and the BeTheUser account "
                                                     "may use %s" % path}))
        except (OSError, ValueError) as e:
            out.append((name, {"ok": False, "error": "%s: %s" % (path, getattr(e, "strerror", None) or e)}))
    if not out and not os.access(directory(config_dir), os.X_OK) and os.path.isdir(directory(config_dir)):
        out.append(("-", {"ok": False, "error": "permission denied: only root and the BeTheUser account may use %s"
                                                % directory(config_dir)}))
    return out


def _ask_one(path: str, request: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        chunks, size = [], 0
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise ValueError("answer longer than %d octets" % MAX_ANSWER)
    except socket.timeout:
        raise OSError(errno.ETIMEDOUT, "no answer within %gs" % timeout) from None
    finally:
        s.close()
    answer = json.loads(b"".join(chunks) or b"null")
    if not isinstance(answer, dict):
        raise ValueError("not an answer: %r" % answer)
    return answer


def _order(path: str) -> Tuple[int, str]:
    name = os.path.basename(path)[:-5]
    return (int(name[1:]), name) if name[:1] == "w" and name[1:].isdigit() else (-1, name)


def _unlink(path: str, dir_fd: Optional[int] = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
