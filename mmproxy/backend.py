"""The store side of a session: connect to the user's mail host and talk to it line by line.

The protocol modules drive the dialogue (greeting, telling the store who the real client is,
replaying the login); this module only knows sockets, deadlines and the failure taxonomy.
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import select
import socket
import ssl
import time
from typing import Dict, Optional, Union

import gevent.monkey
from gevent import socket as gsocket
from gevent.socket import wait_write

from mmproxy import tls as tlsmod
from mmproxy.errors import BackendUnavailable
from mmproxy.linereader import BackendReader, send_now

_poll = gevent.monkey.get_original("select", "poll")     # a poll that never waits (timeout 0)

STORE_TIMEOUT = 30.0      # the default of StoreTimeout
STORE_PHASE = "the store's part of the login (connect, greeting, login)"
MAX_STORE_LINE = 65536    # capability lines can be long; anything longer is not a store we know

Log = Union[logging.Logger, logging.LoggerAdapter]


class Attempts:
    """MaxConcurrentConnectionAttempts: how many connection attempts to each store (``host:port``)
    are under way in this process, so that a dead or slow store cannot tie up every session in
    connect attempts (Messaging Server 7u3's MMP option: "Number of outstanding connection attempts
    permitted to the same backend mailstore. If this is exceeded, users on that mailstore will have
    their connections rejected with a temporary service outage error").

    An attempt lasts from the connect until the store's first line (its greeting): a store that
    greets is up, whatever it answers to the login afterwards (StoreTimeout bounds that).  Counted
    per worker process (NumThreads > 1: each worker has its own allowance).  The log gets one line
    when a store's logins start being refused and one when a slot is free again, not one per login.
    """

    def __init__(self) -> None:
        self.busy: Dict[str, int] = {}       # "host:port" -> attempts under way
        self.refused: Dict[str, int] = {}    # "host:port" -> logins refused since the limit was reached

    def take(self, where: str, limit: int, log: Optional[Log]) -> None:
        """One attempt to ``where`` starts; BackendUnavailable when ``limit`` are under way already."""
        busy = self.busy.get(where, 0)
        if busy >= limit:
            if where not in self.refused:
                self.refused[where] = 0
                if log is not None:
                    log.warning("store %s: %d connection attempts under way (MaxConcurrentConnectionAttempts): "
                                "its logins get the store-down reply until one ends", where, busy)
            self.refused[where] += 1
            raise BackendUnavailable("store %s: %d connection attempts under way already "
                                     "(MaxConcurrentConnectionAttempts)" % (where, busy))
        self.busy[where] = busy + 1

    def give(self, where: str, log: Optional[Log]) -> None:
        """An attempt to ``where`` is over (greeted, failed, closed, or its session killed)."""
        busy = self.busy.get(where, 0) - 1
        if busy > 0:
            self.busy[where] = busy
        else:
            self.busy.pop(where, None)
        refused = self.refused.pop(where, None)
        if refused is not None and log is not None:
            log.warning("store %s: connection attempts below MaxConcurrentConnectionAttempts again "
                        "(%d login(s) refused meanwhile)", where, refused)


ATTEMPTS = Attempts()     # this process's count (each worker process has its own)


class Store:
    """A connected store: a socket and a bounded line reader; raises Backend* errors only.

    ``timeout`` bounds the connect and, when ``phase`` names one, that whole phase: everything up to
    the pump (the connect, greeting, telling the store who the client is, the login) must be over
    within ``timeout`` seconds of the connect's start, so a store that trickles its answers cannot
    hold a login.  ``phase`` None (an SMTP relay): each exchange sets its own deadline.

    ``attempts`` > 0 (MaxConcurrentConnectionAttempts): at most that many connection attempts to
    ``host:port`` at once in this process (:class:`Attempts`); one more raises BackendUnavailable at
    once.  The slot is held until the store's first line is read or the store is closed, whichever
    comes first; ``log`` gets the limit's state changes.
    """

    def __init__(self, host: str, port: int, timeout: float = STORE_TIMEOUT,
                 phase: Optional[str] = STORE_PHASE, tls: Optional[ssl.SSLContext] = None,
                 attempts: int = 0, log: Optional[Log] = None) -> None:
        self.host, self.port = host, port
        self._attempt: Optional[str] = None       # "host:port" while this holds an attempt slot
        self._log = log
        if attempts > 0:
            ATTEMPTS.take("%s:%d" % (host, port), attempts, log)
            self._attempt = "%s:%d" % (host, port)
        try:
            self._open(timeout, phase, tls)
        except BaseException:                      # failed, timed out, or the session was killed
            self._end_attempt()
            raise

    def _open(self, timeout: float, phase: Optional[str], tls: Optional[ssl.SSLContext]) -> None:
        host, port = self.host, self.port
        start = time.monotonic()
        try:
            self.sock = _connect(host, port, timeout)
        except (OSError, gsocket.timeout) as e:
            raise BackendUnavailable("cannot connect to %s:%d: %s" % (host, port, _why(e))) from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self._handshake(tls, start, timeout)
        self.reader = BackendReader(self.sock, MAX_STORE_LINE, timeout, "%s:%d" % (host, port))
        if phase is not None:
            self.reader.set_deadline(timeout, phase, start + timeout)

    def _end_attempt(self) -> None:
        """Give the MaxConcurrentConnectionAttempts slot back (once)."""
        where, self._attempt = self._attempt, None
        if where is not None:
            ATTEMPTS.give(where, self._log)

    def _handshake(self, ctx: ssl.SSLContext, start: float, timeout: float) -> None:
        """Implicit TLS (SSLBacksidePort): the handshake, within what is left of the ``timeout``
        seconds from ``start``; the store's name is its mailHost (an IP address or a host name),
        checked when ``ctx`` verifies."""
        try:
            self.sock = tlsmod.handshake(ctx, self.sock, max(0.1, start + timeout - time.monotonic()),
                                         server_hostname=self.host)
        except tlsmod.HandshakeTimeout:
            self.close()
            raise BackendUnavailable("%s:%d: the store's part of the login (connect, TLS handshake) took more "
                                     "than %g s" % (self.host, self.port, timeout)) from None
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
        """One line from the store; BackendUnavailable or BackendProtocolError.  The first one (the
        greeting) ends the connection attempt."""
        line = self.reader.readline()
        if self._attempt is not None:
            self._end_attempt()
        return line

    def send(self, data: bytes, timeout: Optional[float] = None) -> None:
        """Write ``data`` within ``timeout`` seconds (default: the reader's idle limit), and before
        the phase's deadline; BackendUnavailable otherwise."""
        wait = self.reader.idle if timeout is None else timeout
        if self.reader.deadline is not None:
            left = self.reader.deadline - time.monotonic()
            if left <= 0:
                raise self.reader.deadline_passed()
            wait = left if wait is None else min(wait, left)
        if not isinstance(self.sock, ssl.SSLSocket):
            try:
                n = send_now(self.sock, data)
            except OSError as e:
                raise BackendUnavailable("%s: write failed: %s" % (self, _why(e))) from None
            if n == len(data):
                return
            data = data[n:]
        try:
            self.sock.settimeout(wait)
            self.sock.sendall(data)
        except OSError as e:
            raise BackendUnavailable("%s: write failed: %s" % (self, _why(e))) from None

    def close(self) -> None:
        self._end_attempt()
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
    """mailHost is usually an address: then skip the resolver (a thread-pool round trip per login).

    A connection to a store nearby is usually made before the non-blocking connect() returns
    (EINPROGRESS): one poll without waiting says so, and the greenlet goes on at once instead of
    waiting for the event loop to report the socket writable.  Otherwise it waits, within
    ``timeout`` seconds.  OSError (socket.timeout included) when it fails."""
    family = address_family(host)
    if family is None:
        return gsocket.create_connection((host, port), timeout=timeout)
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        # gevent's socket is non-blocking underneath: its own socket connects without waiting
        err = sock._sock.connect_ex((host, port))      # type: ignore[attr-defined]
        if err == errno.EINPROGRESS:
            ready = _poll()
            ready.register(sock.fileno(), select.POLLOUT)
            if not ready.poll(0):
                wait_write(sock.fileno(), timeout)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except OSError:                        # socket.timeout included
        sock.close()
        raise
    sock.settimeout(timeout)
    return sock


def _why(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    return getattr(e, "strerror", None) or str(e) or e.__class__.__name__
