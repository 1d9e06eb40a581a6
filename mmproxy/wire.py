"""Bounded, inspectable line reading over a socket, for both the client and the store side.

A ``makefile()`` reader would hide its buffer; we need to see it: STARTTLS must drop whatever the
client pipelined before the handshake (CVE-2011-0411), and at the end of a login the bytes already
read past the last answer must go to the relay, not be lost.
"""
from __future__ import annotations

import socket
from typing import Callable, Optional

from mmproxy.errors import ClientGone, ClientTooLong

RECV_SIZE = 16384


class LineReader:
    """Reads CRLF (or bare LF) terminated lines and exact byte counts, each read bounded in size and time.

    ``flush`` is called before every blocking receive, so replies to pipelined commands are batched
    into one send while more input is already buffered, and never withheld once we would wait.
    """

    def __init__(self, sock: socket.socket, max_line: int, timeout: Optional[float],
                 flush: Optional[Callable[[], None]] = None) -> None:
        self.sock = sock
        self.max_line = max_line
        self.timeout = timeout
        self.flush = flush
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> None:
        if self.flush is not None:
            self.flush()
        if self.eof:
            raise ClientGone("peer closed the connection")
        self.sock.settimeout(self.timeout)
        try:
            data = self.sock.recv(RECV_SIZE)
        except socket.timeout:
            raise ClientGone("timed out") from None
        except OSError as e:
            raise ClientGone("read error: %s" % (e.strerror or e)) from None
        if not data:
            # A FIN in the middle of a command can never be completed: end now, not at the timeout.
            self.eof = True
            raise ClientGone("peer closed the connection")
        self.buf += data

    def readline(self) -> bytes:
        """One line without its terminator; ClientTooLong when it exceeds ``max_line`` bytes."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                if i > self.max_line:
                    raise ClientTooLong("line too long")
                line = bytes(self.buf[:i])
                del self.buf[:i + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buf) > self.max_line:
                raise ClientTooLong("line too long")
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

    def discard(self, n: int) -> None:
        """Skip ``n`` bytes without keeping more than one receive buffer in memory."""
        while n > 0:
            if not self.buf:
                self._fill()
            k = min(n, len(self.buf))
            del self.buf[:k]
            n -= k

    def has_line(self) -> bool:
        return b"\n" in self.buf

    def take_pending(self) -> bytes:
        """Everything read but not consumed; the buffer is left empty."""
        data = bytes(self.buf)
        self.buf.clear()
        return data
