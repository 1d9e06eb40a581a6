"""Bounded, inspectable line reading over a socket, for the client side and the store side.

A ``makefile()`` reader would hide its buffer; we need to see it: STARTTLS must drop whatever the
client pipelined before the handshake (CVE-2011-0411), and at the end of a login the bytes already
read past the last answer must go to the pump, not be lost.

Every read is bounded in size and in time twice over: ``idle`` seconds per receive, and an optional
overall deadline (:meth:`LineReader.set_deadline`) by which the present phase (the dialogue before
login, one command, a message, a store's part of a login) must be done, however its peer trickles
the bytes.  On a TLS socket a receive is bounded as a whole (a gevent.Timeout): the ssl module's
timeout counts per wait, so a TLS record trickled a byte at a time would outlast any deadline.
Which error a failure raises depends on the side: a client's problems are ``Client*`` errors, a
store's or relay's are ``Backend*`` errors, so nobody mistakes one for the other.
"""
from __future__ import annotations

import socket
import ssl
import time
from typing import Callable, Optional

import gevent

from mmproxy.errors import (
    BackendProtocolError,
    BackendUnavailable,
    ClientGone,
    ClientTimeout,
    ClientTooLong,
    MMProxyError,
)

RECV_SIZE = 16384


def send_now(sock: socket.socket, data: bytes) -> int:
    """Send what the kernel takes of ``data`` at once, without waiting (the usual case: the whole
    reply fits the socket buffer, in one system call); how many bytes it took.  The caller sends
    the rest under its own bounds.  Plain (gevent) sockets only; OSError when the peer is gone."""
    try:
        return sock.send(data, 0, 0.0)        # type: ignore[call-arg]  # gevent's timeout argument
    except BlockingIOError:
        return 0


class LineReader:
    """Reads CRLF (or bare LF) terminated lines and exact byte counts from a client.

    ``flush`` is called before every blocking receive, so replies to pipelined commands are batched
    into one send while more input is already buffered, and never withheld once we would wait.
    ``received`` counts every byte read from the socket.
    """

    def __init__(self, sock: socket.socket, max_line: int, idle: Optional[float],
                 flush: Optional[Callable[[], None]] = None) -> None:
        self.sock = sock
        self.max_line = max_line
        self.idle = idle
        self.deadline: Optional[float] = None     # monotonic time the present phase must be over by
        self.phase = ""                           # what it bounds, for the error ("the login dialogue")
        self.limit = 0.0                          # and in how many seconds, for the error
        self.flush = flush
        self.buf = bytearray()
        self.eof = False
        self.received = 0

    def set_deadline(self, seconds: Optional[float], phase: str = "", at: Optional[float] = None) -> None:
        """The present ``phase`` must be over within ``seconds`` from now (or by the monotonic time
        ``at``, when given: a phase that began earlier); None: no deadline."""
        if seconds is None:
            self.deadline, self.phase = None, ""
            return
        self.deadline = time.monotonic() + seconds if at is None else at
        self.phase, self.limit = phase, seconds

    # ------------------------------------------------------------------ what a failure is called
    def gone(self, why: str) -> MMProxyError:
        return ClientGone(why)

    def timeout(self, why: str) -> MMProxyError:
        return ClientTimeout(why)

    def deadline_passed(self) -> MMProxyError:
        return ClientTimeout("%s took more than %g s" % (self.phase or "the present phase", self.limit),
                             phase=self.phase)

    def too_long(self, why: str, recoverable: bool = False) -> MMProxyError:
        return ClientTooLong(why, recoverable)

    # ------------------------------------------------------------------ reading
    def _fill(self) -> None:
        if self.flush is not None:
            self.flush()
        if self.eof:
            raise self.gone("peer closed the connection")
        wait = self.idle
        by_deadline = False
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self.deadline_passed()
            if wait is None or left < wait:
                wait, by_deadline = left, True
        self.sock.settimeout(wait)
        timer = gevent.Timeout.start_new(wait) if wait is not None and isinstance(self.sock, ssl.SSLSocket) else None
        try:
            data = self.sock.recv(RECV_SIZE)
        except (socket.timeout, gevent.Timeout) as e:
            if isinstance(e, gevent.Timeout) and e is not timer:
                raise
            raise (self.deadline_passed() if by_deadline else self.timeout("idle for %ds" % (wait or 0))) from None
        except OSError as e:
            raise self.gone("read error: %s" % (e.strerror or e)) from None
        finally:
            if timer is not None:
                timer.close()
        if not data:
            # A FIN in the middle of a command can never be completed: end now, not at the timeout.
            self.eof = True
            raise self.gone("peer closed the connection")
        self.received += len(data)
        self.buf += data

    def readline(self, limit: Optional[int] = None) -> bytes:
        """One line without its terminator; too_long() when the line, terminator included, is
        longer than ``limit`` (default ``max_line``) octets."""
        limit = self.max_line if limit is None else limit
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                if i >= limit:
                    raise self.too_long("line of more than %d octets" % limit)
                line = bytes(self.buf[:i])
                del self.buf[:i + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buf) >= limit:
                raise self.too_long("line of more than %d octets" % limit)
            start = len(self.buf)
            self._fill()

    def read_raw(self, limit: int) -> bytes:
        """One line exactly as received, terminator included (through its LF), or, for a longer
        line, its next ``limit`` bytes (no LF at the end): long lines stream in bounded pieces,
        and a caller that checks line endings itself (CR LF versus bare LF) sees the bytes."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start, limit)
            if i >= 0:
                piece = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return piece
            if len(self.buf) >= limit:
                piece = bytes(self.buf[:limit])
                del self.buf[:limit]
                return piece
            start = len(self.buf)
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes: what is buffered, or one receive."""
        if not self.buf:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def discard(self, n: int) -> None:
        """Skip ``n`` bytes without keeping more than one receive buffer in memory."""
        while n > 0:
            if not self.buf:
                self._fill()
            k = min(n, len(self.buf))
            del self.buf[:k]
            n -= k

    def wait_for_input(self) -> None:
        """Return once some input is buffered (a receive, within the idle limit and deadline, when
        none is)."""
        if not self.buf:
            self._fill()

    def peek_line(self, limit: int) -> Optional[bytes]:
        """The next line if it is already buffered whole and within ``limit`` octets (without its
        terminator; nothing is consumed), else None.  Never reads, never raises."""
        i = self.buf.find(b"\n", 0, limit)          # the same bound as read_raw(limit)
        if i < 0:
            return None
        line = bytes(self.buf[:i])
        return line[:-1] if line.endswith(b"\r") else line

    def take_pending(self) -> bytes:
        """Everything read but not consumed; the buffer is left empty."""
        data = bytes(self.buf)
        self.buf.clear()
        return data


class BackendReader(LineReader):
    """The same reader towards a store or an SMTP relay: its failures are Backend* errors named
    after the peer (``peer`` is ``host:port``)."""

    def __init__(self, sock: socket.socket, max_line: int, idle: Optional[float], peer: str) -> None:
        super().__init__(sock, max_line, idle)
        self.peer = peer

    def gone(self, why: str) -> MMProxyError:
        return BackendUnavailable("%s: %s" % (self.peer, why))

    def timeout(self, why: str) -> MMProxyError:
        return BackendUnavailable("%s: no answer (%s)" % (self.peer, why))

    def deadline_passed(self) -> MMProxyError:
        return BackendUnavailable("%s: %s took more than %g s" % (self.peer, self.phase or "its answer", self.limit))

    def too_long(self, why: str, recoverable: bool = False) -> MMProxyError:
        return BackendProtocolError("%s sent a %s" % (self.peer, why))
