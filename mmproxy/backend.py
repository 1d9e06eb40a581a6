"""The store side of a session: connect to the user's mail host and talk to it line by line.

The protocol modules drive the dialogue (greeting, telling the store who the real client is,
replaying the login); this module only knows sockets, deadlines and the failure taxonomy.
"""
from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import time
from typing import Optional

from gevent import socket as gsocket

from mmproxy.errors import BackendUnavailable
from mmproxy.linereader import BackendReader

CONNECT_TIMEOUT = 10.0    # a store that does not accept in 10 s is down for this login
REPLY_TIMEOUT = 30.0      # a store that accepted must greet and answer the login within this, in all
MAX_STORE_LINE = 65536    # capability lines can be long; anything longer is not a store we know


class Store:
    """A connected store: a socket and a bounded line reader; raises Backend* errors only.

    The whole dialogue up to the pump (greeting, who the client is, the login) must end within
    REPLY_TIMEOUT seconds of the connect: a store that trickles its answers cannot hold a login.
    """

    def __init__(self, host: str, port: int, connect_timeout: float = CONNECT_TIMEOUT,
                 deadline: Optional[float] = REPLY_TIMEOUT, tls: Optional[ssl.SSLContext] = None) -> None:
        self.host, self.port = host, port
        started = time.monotonic()
        try:
            self.sock = _connect(host, port, connect_timeout)
        except (OSError, gsocket.timeout) as e:
            raise BackendUnavailable("cannot connect to %s:%d: %s" % (host, port, _why(e))) from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self._handshake(tls, started + (deadline or REPLY_TIMEOUT))
        self.reader = BackendReader(self.sock, MAX_STORE_LINE, REPLY_TIMEOUT, "%s:%d" % (host, port))
        if deadline is not None:
            self.reader.deadline = time.monotonic() + deadline

    def _handshake(self, ctx: ssl.SSLContext, deadline: float) -> None:
        """Implicit TLS (SSLBacksidePort): the handshake, within what is left of the deadline; the
        store's name is its mailHost (an IP address or a host name), checked when ``ctx`` verifies."""
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            self.close()
            raise BackendUnavailable("%s:%d: TLS certificate refused: %s"
                                     % (self.host, self.port, e.verify_message or e.reason)) from None
        except (OSError, ssl.SSLError, gsocket.timeout) as e:
            self.close()
            raise BackendUnavailable("%s:%d: TLS handshake failed: %s" % (self.host, self.port, _why(e))) from None

    @property
    def tls_version(self) -> Optional[str]:
        """The TLS version of the connection (None in plaintext)."""
        return self.sock.version() if isinstance(self.sock, ssl.SSLSocket) else None

    def __str__(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def readline(self) -> bytes:
        """One line from the store; BackendUnavailable or BackendProtocolError."""
        return self.reader.readline()

    def send(self, data: bytes) -> None:
        try:
            self.sock.settimeout(REPLY_TIMEOUT)
            self.sock.sendall(data)
        except OSError as e:
            raise BackendUnavailable("%s:%d: write failed: %s" % (self.host, self.port, _why(e))) from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@functools.lru_cache(maxsize=4096)
def address_family(host: str) -> Optional[int]:
    """The address family of an IP address literal; None for a host name (memoised)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def _connect(host: str, port: int, timeout: float) -> gsocket.socket:
    """mailHost is usually an address: then skip the resolver (a thread-pool round trip per login)."""
    family = address_family(host)
    if family is None:
        return gsocket.create_connection((host, port), timeout=timeout)
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:                        # socket.timeout included
        sock.close()
        raise
    return sock


def _why(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    return getattr(e, "strerror", None) or str(e) or e.__class__.__name__
