"""The byte pump after login, shared by IMAP and POP: both sockets, both directions, until the end.

An idle logged-in session is what a proxy holds most of, so it must be cheap: a parked greenlet costs
about 9 KB here, an io watcher about half a kilobyte.  The session greenlet therefore hands both
sockets to watcher callbacks and ends.  Idle timeouts are checked by one sweeper for all pumps,
not one timer each.

Plaintext bulk data moves with splice(2) through a pipe, so it never enters Python (a
recv_into/send pump costs about three times the CPU per gigabyte); small exchanges (commands and
short answers) are copied, which takes half the system calls of a splice through a pipe.  Pipes come from a small pool
shared by the whole process: a direction holds one only while the destination is slow to take
what is already in it; 10,000 sessions must not cost 20,000 more descriptors.  TLS directions read
into one buffer shared by the process (callbacks run one at a time on the hub) and write straight
on.  Either way only what the destination could not take is kept, and the source is not read until
it is gone (back-pressure).
"""
from __future__ import annotations

import os
import socket
import ssl
from typing import Callable, List, Mapping, Optional, Set, Tuple

import gevent
from gevent import get_hub

CHUNK = 65536
_BUF = bytearray(CHUNK)
_VIEW = memoryview(_BUF)
_AGAIN = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
CLOSE_GRACE = 10.0        # after the client has finished, the store gets this long to finish too
SWEEP_EVERY = 5.0
BURST = 8                 # reads per readiness callback before yielding to other sessions
POOL_MAX = 32             # idle pipes kept for reuse

_pipes: List[Tuple[int, int]] = []


def _take_pipe() -> Tuple[int, int]:
    return _pipes.pop() if _pipes else os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


def _give_pipe(pipe: Tuple[int, int]) -> None:
    """Only an empty pipe goes back to the pool."""
    if len(_pipes) < POOL_MAX:
        _pipes.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


class _Side:
    """One direction: bytes read from ``src`` are written to ``dst``."""

    __slots__ = ("src", "dst", "rd", "wr", "left", "pipe", "inpipe", "done", "count", "splice", "can_splice")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        # gevent sockets own an io watcher per direction: reuse them (not in gevent's public types)
        self.rd = src._read_event  # type: ignore[attr-defined]
        self.wr = dst._write_event  # type: ignore[attr-defined]
        self.left: Optional[bytes] = None                 # bytes the destination has not taken
        self.pipe: Optional[Tuple[int, int]] = None       # a pipe holding ``inpipe`` such bytes
        self.inpipe = 0
        self.done = False
        self.count = 0
        self.can_splice = bool(_SPLICE) and not isinstance(src, ssl.SSLSocket) and not isinstance(dst, ssl.SSLSocket)
        self.splice = False       # small exchanges are cheaper copied: splice starts with bulk data

    @property
    def blocked(self) -> bool:
        return self.left is not None or self.inpipe > 0


class Pump:
    """Moves bytes ``client`` <-> ``store`` until one side has ended and what it sent is delivered,
    an error, or ``idle`` seconds of silence.

    When the store ends (after LOGOUT, QUIT or its own timeout), what it sent goes to the client
    and both connections close at once: the client's connection slot is free.  When the client
    ends, the store is told (a half-close), and its last answer still reaches the client, within
    CLOSE_GRACE.  When the proxy ends a session itself (``idle`` for the idle timeout, ``shutdown``
    when the daemon stops), ``goodbyes[why]`` is written to the client first, where it cannot cut
    a response in two: when the store-to-client stream is quiet (``* BYE ...``, ``-ERR ...``).
    ``on_close(pump)`` runs once.
    """

    __slots__ = ("up", "down", "idle", "last", "on_close", "reason", "closed", "tls", "goodbyes", "__weakref__")

    def __init__(self, client: socket.socket, store: socket.socket, idle: float,
                 on_close: Callable[["Pump"], None], to_store: bytes = b"", to_client: bytes = b"",
                 goodbyes: Optional[Mapping[str, bytes]] = None) -> None:
        self.up = _Side(client, store)
        self.down = _Side(store, client)
        self.idle = idle
        self.on_close = on_close
        self.reason = ""
        self.closed = False
        self.goodbyes = goodbyes or {}
        self.tls = isinstance(client, ssl.SSLSocket) or isinstance(store, ssl.SSLSocket)
        self.last = get_hub().loop.now()
        client.settimeout(0.0)
        store.settimeout(0.0)
        _PUMPS.add(self)
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
        if self.closed or side.done or side.blocked:
            return
        try:
            for _ in range(BURST):
                if not (self._splice_once(side) if side.splice else self._copy_once(side)):
                    return
        except OSError as e:
            self._error(side, e)

    def _copy_once(self, side: _Side) -> bool:
        """recv_into the shared buffer and send on; True when another read may follow at once."""
        try:
            n = side.src.recv_into(_BUF)
        except _AGAIN:
            return False
        except OSError as e:
            raise _Failed(side, e) from None
        if n == 0:
            self._eof(side)
            return False
        side.count += n
        self.last = get_hub().loop.now()
        try:
            sent = side.dst.send(_VIEW[:n])
        except _AGAIN:
            sent = 0
        except OSError as e:
            raise _Failed(self._other(side), e) from None
        if sent < n:
            side.left = bytes(_VIEW[sent:n])
            self._wait_writable(side)
            return False
        if n == CHUNK:
            side.splice = side.can_splice      # a full buffer: bulk data, move it by splice from now on
            return True
        # TLS may hold decrypted bytes that no watcher will announce
        return isinstance(side.src, ssl.SSLSocket) and side.src.pending() > 0

    def _splice_once(self, side: _Side) -> bool:
        """socket -> pipe -> socket, the bytes never copied into Python."""
        pipe = _take_pipe()
        try:
            n = os.splice(side.src.fileno(), pipe[1], CHUNK, flags=_SPLICE)
        except BlockingIOError:
            _give_pipe(pipe)
            return False
        except OSError as e:
            _give_pipe(pipe)
            raise _Failed(side, e) from None
        if n == 0:
            _give_pipe(pipe)
            self._eof(side)
            return False
        side.count += n
        self.last = get_hub().loop.now()
        try:
            sent = os.splice(pipe[0], side.dst.fileno(), n, flags=_SPLICE)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            _drop_pipe(pipe)
            raise _Failed(self._other(side), e) from None
        if sent < n:
            side.pipe, side.inpipe = pipe, n - sent      # this pipe stays with the slow direction
            self._wait_writable(side)
            return False
        _give_pipe(pipe)
        if n < CHUNK // 8:
            side.splice = False                # back to small exchanges
        return n == CHUNK

    def _wait_writable(self, side: _Side) -> None:
        side.rd.stop()
        side.wr.start(self._writable, side)

    def _writable(self, side: _Side) -> None:
        if self.closed:
            return
        try:
            if side.left is not None:
                sent = side.dst.send(side.left)
                side.left = side.left[sent:] or None
            elif side.pipe is not None:
                side.inpipe -= os.splice(side.pipe[0], side.dst.fileno(), side.inpipe, flags=_SPLICE)
                if not side.inpipe:
                    _give_pipe(side.pipe)
                    side.pipe = None
        except _AGAIN:
            return
        except OSError as e:
            return self._error(self._other(side), e)
        self.last = get_hub().loop.now()      # a slow reader taking held-back bytes is activity too
        if side.blocked:
            return
        side.wr.stop()
        if side.done:
            return self._finish(side)
        side.rd.start(self._readable, side)
        if isinstance(side.src, ssl.SSLSocket) and side.src.pending():
            self._readable(side)

    def _error(self, side: _Side, e: BaseException) -> None:
        if isinstance(e, _Failed):
            side, e = e.side, e.error
        self.close(_who(side, self) + " error: " + (getattr(e, "strerror", None) or str(e)))

    def _other(self, side: _Side) -> _Side:
        return self.down if side is self.up else self.up

    def _eof(self, side: _Side) -> None:
        side.done = True
        side.rd.stop()
        if not self.reason:
            self.reason = "closed by " + _who(side, self)
        if not side.blocked:
            self._finish(side)

    def _finish(self, side: _Side) -> None:
        """The source ended and everything it sent was written: pass the end on."""
        if self.tls or self._other(side).done or side is self.down:
            # The store has ended (nothing the client sends can be answered now), or TLS (a TCP
            # half-close under a TLS stream would drop its state): end the session.
            return self.close(self.reason)
        try:
            side.dst.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close(self.reason)
        self.idle = min(self.idle, CLOSE_GRACE)

    def end(self, why: str, reason: str) -> None:
        """The proxy ends the session: ``goodbyes[why]`` where it cannot cut a response in two, then close."""
        goodbye = self.goodbyes.get(why)
        if goodbye and not self.closed and not self.down.blocked and not self.down.done:
            try:
                self.down.dst.send(goodbye)           # a few bytes into a quiet socket: never blocks
            except (OSError, *_AGAIN):
                pass
        self.close(reason)

    def close(self, reason: str = "") -> None:
        """Stop both directions and close both sockets; ``on_close`` runs once."""
        if self.closed:
            return
        self.closed = True
        self.reason = self.reason or reason
        _PUMPS.discard(self)
        for side in (self.up, self.down):
            side.rd.stop()
            side.wr.stop()
            side.left = None
            if side.pipe is not None:
                _drop_pipe(side.pipe)        # it may still hold bytes: never reuse it
                side.pipe, side.inpipe = None, 0
        for s in (self.up.src, self.down.src):
            try:
                s.close()
            except OSError:
                pass
        self.on_close(self)


class _Failed(OSError):
    """An I/O error, with the direction whose socket failed."""

    def __init__(self, side: _Side, error: OSError) -> None:
        super().__init__(error.errno, error.strerror)
        self.side, self.error = side, error


def _drop_pipe(pipe: Tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


def _who(side: _Side, pump: Pump) -> str:
    return "client" if side is pump.up else "store"


_PUMPS: Set[Pump] = set()
_sweeper: Optional[gevent.Greenlet] = None


def _sweep() -> None:
    loop = get_hub().loop
    while True:
        gevent.sleep(SWEEP_EVERY)
        now = loop.now()
        for p in [p for p in _PUMPS if now - p.last > p.idle]:
            p.end("idle", "idle for %ds" % (now - p.last))


def _ensure_sweeper() -> None:
    global _sweeper
    if _sweeper is None or _sweeper.dead:
        _sweeper = gevent.spawn(_sweep)


def count() -> int:
    """How many sessions this process relays now."""
    return len(_PUMPS)


def end_quiet(quiet: float, why: str, reason: str) -> int:
    """End, with ``goodbyes[why]``, every pump that has moved nothing either way for ``quiet``
    seconds and holds no bytes a destination has not taken yet (a stop's grace: Dovecot's proxy
    lets sessions idle for 2 s go at once); how many."""
    now = get_hub().loop.now()
    quiet_ones = [p for p in _PUMPS
                  if now - p.last >= quiet and not (p.up.blocked or p.down.blocked)]
    for p in quiet_ones:
        p.end(why, reason)
    return len(quiet_ones)


def close_all(reason: str, quiet: float = 1.0) -> None:
    """End every pump of this process (the daemon is stopping): with its shutdown goodbye where it
    has moved nothing for ``quiet`` seconds, so that the goodbye cannot land inside a response
    still streaming; with a plain close otherwise."""
    end_quiet(quiet, "shutdown", reason)
    for p in list(_PUMPS):
        p.close(reason)
