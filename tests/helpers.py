"""Client-side helpers for the end-to-end tests: real clients bound to chosen loopback addresses."""
import imaplib
import poplib
import socket
import time

from mmproxy.testing.base import free_port


class _FromAddress:
    """A stdlib client connecting from a chosen 127.x source address, so per-address behaviour is real."""

    def __init__(self, host, port, source="127.0.0.1", timeout=10):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class ImapFrom(_FromAddress, imaplib.IMAP4):
    pass


class PopFrom(_FromAddress, poplib.POP3):
    pass


class RawClient:
    """A raw socket for the abuse tests: exact bytes in, lines out."""

    def __init__(self, host, port, source="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout, source_address=(source, 0))
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def readline(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def expect(self, prefix):
        """The first line starting with ``prefix`` (earlier lines are skipped)."""
        while True:
            line = self.readline()
            if not line:
                raise AssertionError("connection closed while waiting for %r" % prefix)
            if line.startswith(prefix):
                return line

    def read_all(self, timeout=10):
        """Everything until the server closes; fails if it does not within ``timeout``."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        data = self.buf
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
            assert time.monotonic() < deadline, "server did not close"


def unused_port(*hosts):
    """A port nothing listens on (for 'server down' tests)."""
    return free_port(*hosts)
