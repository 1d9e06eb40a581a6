"""The byte pump after login, shared by every protocol.

An idle relayed session is what a proxy holds most of, so it must be cheap: a parked greenlet costs
about 9 KB here, an io watcher about half a kilobyte.  The session greenlet therefore hands both
sockets to watcher callbacks and ends.  Each direction reads into one buffer shared by the whole
process (callbacks run one at a time on the hub) and writes straight on; only bytes the destination
could not take are kept, and then the source is not read until they are gone (back-pressure).
Idle timeouts are checked by one sweeper for all relays, not one timer each.
"""
from __future__ import annotations

import logging
import socket
import ssl
from typing import Callable, Optional, Set

import gevent
from gevent import get_hub

log = logging.getLogger(__name__)

_BUF = bytearray(65536)
_VIEW = memoryview(_BUF)
_AGAIN = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
CLOSE_GRACE = 60.0        # after one side has finished, the other gets this long to finish too
SWEEP_EVERY = 5.0


class _Side:
    """One direction: bytes read from ``src`` are written to ``dst``."""

    __slots__ = ("src", "dst", "rd", "wr", "left", "done", "count")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.rd = src._read_event      # gevent sockets own an io watcher per direction: reuse them
        self.wr = dst._write_event
        self.left: Optional[bytes] = None
        self.done = False
        self.count = 0


class Relay:
    """Relays ``client`` <-> ``store`` until both directions end, an error, or ``idle`` seconds of silence."""

    __slots__ = ("up", "down", "idle", "last", "on_close", "reason", "closed", "tls", "__weakref__")

    def __init__(self, client: socket.socket, store: socket.socket, idle: float,
                 on_close: Callable[["Relay"], None], to_store: bytes = b"", to_client: bytes = b"") -> None:
        self.up = _Side(client, store)
        self.down = _Side(store, client)
        self.idle = idle
        self.on_close = on_close
        self.reason = ""
        self.closed = False
        self.tls = isinstance(client, ssl.SSLSocket) or isinstance(store, ssl.SSLSocket)
        self.last = get_hub().loop.now()
        client.settimeout(0.0)
        store.settimeout(0.0)
        _RELAYS.add(self)
        _ensure_sweeper()
        for side, pending in ((self.up, to_store), (self.down, to_client)):
            if pending:
                side.left = pending
                side.wr.start(self._writable, side)
            else:
                side.rd.start(self._readable, side)
            # TLS may already hold decrypted bytes that no watcher will announce
            if isinstance(side.src, ssl.SSLSocket) and side.src.pending() and not side.left:
                get_hub().loop.run_callback(self._readable, side)

    @property
    def bytes_up(self) -> int:
        return self.up.count

    @property
    def bytes_down(self) -> int:
        return self.down.count

    # ------------------------------------------------------------------ callbacks (run on the hub)
    def _readable(self, side: _Side) -> None:
        if self.closed or side.done or side.left:
            return
        while True:
            try:
                n = side.src.recv_into(_BUF)
            except _AGAIN:
                return
            except OSError as e:
                return self.close(_who(side, self) + " error: " + (e.strerror or str(e)))
            if n == 0:
                return self._eof(side)
            side.count += n
            self.last = get_hub().loop.now()
            try:
                sent = side.dst.send(_VIEW[:n])
            except _AGAIN:
                sent = 0
            except OSError as e:
                return self.close(_who(self._other(side), self) + " error: " + (e.strerror or str(e)))
            if sent < n:
                side.left = bytes(_VIEW[sent:n])
                side.rd.stop()
                side.wr.start(self._writable, side)
                return
            if not (isinstance(side.src, ssl.SSLSocket) and side.src.pending()):
                return

    def _writable(self, side: _Side) -> None:
        if self.closed or not side.left:
            return
        try:
            sent = side.dst.send(side.left)
        except _AGAIN:
            return
        except OSError as e:
            return self.close(_who(self._other(side), self) + " error: " + (e.strerror or str(e)))
        side.left = side.left[sent:] or None
        if side.left:
            return
        side.wr.stop()
        if side.done:
            return self._finish(side)
        side.rd.start(self._readable, side)
        if isinstance(side.src, ssl.SSLSocket) and side.src.pending():
            self._readable(side)

    def _other(self, side: _Side) -> _Side:
        return self.down if side is self.up else self.up

    def _eof(self, side: _Side) -> None:
        side.done = True
        side.rd.stop()
        if not self.reason:
            self.reason = "closed by " + _who(side, self)
        if side.left is None:
            self._finish(side)

    def _finish(self, side: _Side) -> None:
        """The source ended and everything it sent was written: pass the end on."""
        if self.tls or self._other(side).done:
            # TLS: a TCP half-close under a TLS stream would drop its state; end the session.
            return self.close(self.reason)
        try:
            side.dst.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close(self.reason)
        self.idle = min(self.idle, CLOSE_GRACE)

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = self.reason or reason
        _RELAYS.discard(self)
        for side in (self.up, self.down):
            side.rd.stop()
            side.wr.stop()
            side.left = None
        for s in (self.up.src, self.down.src):
            try:
                s.close()
            except OSError:
                pass
        try:
            self.on_close(self)
        except Exception:
            log.exception("relay close callback failed")


def _who(side: _Side, relay: Relay) -> str:
    return "client" if side is relay.up else "store"


_RELAYS: Set[Relay] = set()
_sweeper: Optional[gevent.Greenlet] = None


def _sweep() -> None:
    loop = get_hub().loop
    while True:
        gevent.sleep(SWEEP_EVERY)
        now = loop.now()
        for r in [r for r in _RELAYS if now - r.last > r.idle]:
            r.close("idle for %ds" % (now - r.last))


def _ensure_sweeper() -> None:
    global _sweeper
    if _sweeper is None or _sweeper.dead:
        _sweeper = gevent.spawn(_sweep)


def live_relays() -> Set[Relay]:
    return _RELAYS


def close_all(reason: str) -> None:
    for r in list(_RELAYS):
        r.close(reason)
