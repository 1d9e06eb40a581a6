"""DelayProxy: a TCP forwarder that delays every chunk the server sends (a slow directory), or
trickles it a byte at a time (a store or relay that holds a login by answering slowly).

It runs on real OS threads with blocking C-level sockets even when gevent has monkey-patched
the process. Why: a test that calls python-ldap (a C library that blocks the whole OS thread,
gevent hub included) through this proxy would deadlock if the proxy were greenlets in the same
thread. The originals are taken from gevent.monkey only if gevent is already loaded; this
module never imports gevent itself.
"""
from __future__ import annotations

import _socket
import _thread
import importlib
import sys
from typing import Any, Callable, Dict, Optional, Set, Tuple

_DONE = object()


def _original(module: str, name: str) -> Any:
    """The unpatched `module.name` (gevent.monkey.get_original when gevent is loaded)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


_start_thread: Callable[[Callable[..., object], Tuple[Any, ...]], int] = _original("_thread", "start_new_thread")
_allocate_lock: Callable[[], _thread.LockType] = _original("_thread", "allocate_lock")
_sleep: Callable[[float], None] = _original("time", "sleep")


def _raw_socket() -> "_socket.socket":
    return _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)


class DelayProxy:
    """Forward 127.0.0.1:<port> (listen_host) to target_host:target_port.

    `delay` (seconds, default 0, may be changed at any time) is slept before each chunk from the
    server is passed on to the client; client-to-server traffic is not delayed.  With `trickle`
    (seconds), the server's bytes after its first `trickle_after` lines (on each connection) are
    passed on one at a time, `trickle` seconds apart.  EOF is passed on as a half-close. `stop()`
    closes the listener and every forwarded connection.
    """

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 delay: float = 0.0, listen_port: int = 0, trickle: float = 0.0, trickle_after: int = 0) -> None:
        self.target = (target_host, int(target_port))
        self.listen_host = listen_host
        self.delay = float(delay)
        self.trickle = float(trickle)
        self.trickle_after = trickle_after
        self._listen_port = listen_port
        self._lsock: Optional[_socket.socket] = None
        self._lock = _allocate_lock()
        self._conns: Set[_socket.socket] = set()
        self._stopped = True
        self.connections = 0           # accepted so far

    @property
    def port(self) -> int:
        if self._lsock is None:
            raise RuntimeError("DelayProxy is not started")
        return self._lsock.getsockname()[1]

    @property
    def url(self) -> str:
        """ldap://host:port of the proxy (handy when it fronts slapd)."""
        return "ldap://%s:%d" % (self.listen_host, self.port)

    def start(self) -> "DelayProxy":
        if self._lsock is not None:
            return self
        s = _raw_socket()
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        s.bind((self.listen_host, self._listen_port))
        s.listen(128)
        s.settimeout(0.2)      # the accept loop polls, so stop() needs no cross-thread close
        self._lsock = s
        self._stopped = False
        _start_thread(self._accept_loop, (s,))
        return self

    def stop(self) -> None:
        self._stopped = True
        s, self._lsock = self._lsock, None
        if s is not None:
            s.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(_socket.SHUT_RDWR)    # wakes the threads blocked in recv
            except OSError:
                pass

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- threads -----------------------------------------------------------------------------
    def _accept_loop(self, lsock: _socket.socket) -> None:
        while not self._stopped:
            try:
                fd, _addr = lsock._accept()   # type: ignore[attr-defined]  # C-level accept: (fd, address)
            except TimeoutError:
                continue
            except OSError:
                if self._stopped:
                    return
                _sleep(0.05)
                continue
            client = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
            client.settimeout(None)
            self.connections += 1
            _start_thread(self._serve, (client,))

    def _serve(self, client: _socket.socket) -> None:
        server = _raw_socket()
        try:
            server.settimeout(10)
            server.connect(self.target)
            server.settimeout(None)
        except OSError:
            server.close()
            client.close()
            return
        with self._lock:
            if self._stopped:
                server.close()
                client.close()
                return
            self._conns.update((client, server))
        state = {"open": 2}
        _start_thread(self._pump, (server, client, True, state))
        self._pump(client, server, False, state)

    def _pump(self, src: _socket.socket, dst: _socket.socket, delayed: bool, state: Dict[str, int]) -> None:
        lines = 0                                # server lines passed on whole so far
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if delayed and self.delay > 0:
                    _sleep(self.delay)
                if delayed and self.trickle > 0:
                    whole = 0
                    while lines < self.trickle_after and whole < len(data):
                        end = data.find(b"\n", whole)
                        if end < 0:
                            break
                        whole, lines = end + 1, lines + 1
                    dst.sendall(data[:whole])
                    for i in range(whole, len(data)):
                        _sleep(self.trickle)
                        dst.sendall(data[i:i + 1])
                    continue
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(_socket.SHUT_WR)        # pass the EOF on, keep the other direction
        except OSError:
            pass
        with self._lock:
            state["open"] -= 1
            last = state["open"] == 0
            if last:
                self._conns.discard(src)
                self._conns.discard(dst)
        if last:
            src.close()
            dst.close()
