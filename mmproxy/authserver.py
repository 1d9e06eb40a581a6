"""Third-party authentication (``AuthenticationServer``, ``AuthenticationLdapAttributes``): with
PreAuth on, a plain-text login's password is checked by an outside server instead of an LDAP bind,
which may also rewrite the user id replayed to the store.

The wire protocol (MMPAUTH version 1) is mmproxy's own, defined in docs/authentication-server.md:
one connection per request, one request line, one answer line.  The legacy behaviour follows the
Sun ONE Messaging Server tpauthsdk README and the Messaging Server Administration Reference (MMP
chapter): used only with PreAuth, after the normal user lookup, for plain-text logins, IMAP and POP
only.  (Not to be confused with ``authservice``, the legacy POP-before-SMTP query service.)

Every read is bounded (a 1024-octet answer line) and the whole exchange (name lookup, connect,
request, answer) has one deadline; the sockets are gevent's, so a slow server holds only the
login that waits for it, never the hub.
"""
from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple
from urllib.parse import quote_from_bytes, unquote_to_bytes

import gevent
from gevent import socket as gsocket

from mmproxy.errors import AuthFailed, AuthServerUnavailable, MMProxyError
from mmproxy.linereader import LineReader

VERSION = "1"
MAX_REQUEST = 65536       # octets of a request line, CR LF included: servers accept at least this
MAX_ANSWER = 1024         # octets of an answer line, CR LF included: longer is a temporary failure
MAX_USER_ID = 256         # octets of a rewritten user id (as login.MAX_LOGIN_ID)
_SAFE = "-._~@:"          # sent as themselves, with ALPHA and DIGIT; every other octet as %XX
_VALUE = re.compile(rb"(?:[!-$&-~]|%[0-9A-Fa-f]{2})+")     # visible ASCII, "%" only as %XX
_TEXT = re.compile(rb"[ -~]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def encode(value: bytes) -> str:
    """Percent-encoding of any octets (docs/authentication-server.md, "Values"): ALPHA, DIGIT and
    ``-._~@:`` as themselves, every other octet as ``%XX``; "+" is never a space."""
    return quote_from_bytes(value, safe=_SAFE)


def decode(value: bytes) -> bytes:
    """The octets of a percent-encoded value; ValueError when it is not one (an empty value, a
    blank, a control or 8-bit octet, a ``%`` not followed by two hex digits)."""
    if not _VALUE.fullmatch(value):
        raise ValueError("not a percent-encoded value")
    return unquote_to_bytes(value)


@dataclass(frozen=True)
class Request:
    """What the proxy tells the server about one login (the fields of version 1, in order)."""

    service: str                  # "imap" or "pop"
    tls: bool                     # the client's connection is TLS (implicit or STARTTLS/STLS)
    login: str                    # as the client typed it (%o)
    user: str                     # user + CanonicalVirtualDomainDelim + domain (%s)
    dn: str                       # the user's entry
    password: bytes               # the octets the client sent
    client: Tuple[str, int]       # the client's address and port
    server: Tuple[str, int]       # the proxy's address and port the client reached
    attrs: Sequence[Tuple[str, str]] = ()   # (name, value) per value of AuthenticationLdapAttributes

    def line(self) -> bytes:
        """The request line, CR LF included."""
        fields: List[Tuple[str, bytes]] = [
            ("service", self.service.encode()), ("tls", b"yes" if self.tls else b"no"),
            ("login", self.login.encode()), ("user", self.user.encode()), ("dn", self.dn.encode()),
            ("password", self.password),
            ("client", self.client[0].encode()), ("client-port", b"%d" % self.client[1]),
            ("server", self.server[0].encode()), ("server-port", b"%d" % self.server[1])]
        fields += [("attr." + encode(name.encode()), value.encode()) for name, value in self.attrs]
        return ("MMPAUTH %s %s\r\n" % (VERSION, " ".join(
            "%s=%s" % (name, encode(value)) for name, value in fields))).encode("ascii")


def parse_answer(line: bytes) -> Tuple[str, str]:
    """(verdict, argument) of an answer line (without its CR LF): ("OK", new user id or ""),
    ("NO", reason), ("TEMP", reason).  ValueError for anything else, an OK whose user id does not
    decode to 1-256 octets of UTF-8 without control characters included."""
    word, _, rest = line.partition(b" ")
    if word in (b"NO", b"TEMP"):
        if not _TEXT.fullmatch(rest):
            raise ValueError("its reason is not printable ASCII")
        return word.decode(), rest.decode()
    if word != b"OK":
        raise ValueError("it is not OK, NO or TEMP")
    if not rest and not line.endswith(b" "):
        return "OK", ""
    try:
        new = decode(rest)
        text = new.decode("utf-8")
    except ValueError:
        raise ValueError("its user id is not percent-encoded UTF-8") from None
    if len(new) > MAX_USER_ID or _CONTROL.search(text):
        raise ValueError("its user id is longer than %d octets or holds control characters" % MAX_USER_ID)
    return "OK", text


class _Reader(LineReader):
    """The answer's reader: every failure is the server's, a temporary one."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        super().__init__(sock, MAX_ANSWER, None)
        self.peer = peer

    def gone(self, why: str) -> MMProxyError:
        return AuthServerUnavailable("%s closed without an answer (%s)" % (self.peer, why))

    def timeout(self, why: str) -> MMProxyError:
        return self.deadline_passed()

    def deadline_passed(self) -> MMProxyError:
        return AuthServerUnavailable("%s did not answer within %g s" % (self.peer, self.limit))

    def too_long(self, why: str, recoverable: bool = False) -> MMProxyError:
        return AuthServerUnavailable("%s answered a %s" % (self.peer, why))


class AuthServer:
    """The client of one ``AuthenticationServer host:port``; ``timeout`` (seconds) bounds each whole
    exchange (AuthenticationServerTimeout)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.peer = "authentication server %s:%d" % (host, port)

    def verify(self, request: Request) -> Optional[str]:
        """Ask the server.  The rewritten user id when it accepts with one, None when it accepts
        as is; AuthFailed when it refuses (NO), AuthServerUnavailable when it cannot say: TEMP, no
        connection, no whole answer within the deadline, an answer over 1024 octets or not of
        the grammar."""
        line = request.line()
        if len(line) > MAX_REQUEST:
            raise AuthServerUnavailable("the request for %s would be %d octets (at most %d): "
                                        "AuthenticationLdapAttributes values too large"
                                        % (request.user, len(line), MAX_REQUEST))
        timer = gevent.Timeout.start_new(self.timeout)
        sock = None
        try:
            start = time.monotonic()
            sock = gsocket.create_connection((self.host, self.port), timeout=self.timeout)
            sock.settimeout(max(0.01, start + self.timeout - time.monotonic()))
            sock.sendall(line)
            reader = _Reader(sock, self.peer)
            reader.set_deadline(self.timeout, at=start + self.timeout)
            answer = reader.readline()
        except gevent.Timeout as e:
            if e is not timer:
                raise
            raise AuthServerUnavailable("%s did not answer within %g s" % (self.peer, self.timeout)) from None
        except OSError as e:                       # refused, unreachable, reset, a name that does not resolve
            why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e) or type(e).__name__)
            raise AuthServerUnavailable("%s: %s" % (self.peer, why)) from None
        finally:
            timer.close()
            if sock is not None:
                sock.close()
        try:
            verdict, arg = parse_answer(answer)
        except ValueError as e:
            raise AuthServerUnavailable("%s answered %r: %s" % (self.peer, answer[:100], e)) from None
        if verdict == "NO":
            raise AuthFailed("%s said NO%s" % (self.peer, (": " + arg[:200]) if arg else ""))
        if verdict == "TEMP":
            raise AuthServerUnavailable("%s said TEMP%s" % (self.peer, (": " + arg[:200]) if arg else ""))
        return arg or None
