"""SMTP (RFC 5321): a front end for mail submission that hands every client to a relay as itself.

Unlike IMAP and POP, an SMTP session has no login to replay and no store to find: every client
goes to one of ``SmtpRelays`` (round robin; a relay that failed is avoided for ``FailoverTimeout``
minutes), and the relay must apply its policy to the *client*, not to the proxy: a relay that
trusts the proxy's address would otherwise be an open relay.  The legacy product used a
password-authenticated extension of the Messaging Server MTA for that (``SmtpProxyPassword`` was
its PROXY_PASSWORD); mmproxy uses what today's relays offer:

* Postfix's XCLIENT (ADDR, PORT, NAME, HELO, PROTO, LOGIN, DESTADDR, DESTPORT as the relay lists
  them, values xtext-encoded), sent once, at the client's first EHLO/HELO (or before its first
  other command), never inside a mail transaction.  The relay answers 220 as to a new connection,
  the client's EHLO then goes to the relay, and the client is answered from the relay's reply.
  A relay that does not offer XCLIENT to the proxy (``smtpd_authorized_xclient_hosts``) is not
  used: the client gets 421 when no relay takes the hand-over.  Postfix re-checks its XCLIENT
  authorisation against the address XCLIENT set, so when the attributes need more than one
  command (512 octets each), ADDR and NAME go in the last one.
* optionally the PROXY protocol, v1 or v2 (``SmtpRelayProxyProtocol``), for relays that take it
  (Postfix ``smtpd_upstream_proxy_protocol = haproxy``); XCLIENT is then used as well if the relay
  still offers it, e.g. for LOGIN.
* ``SmtpProxyPassword`` is read for compatibility (it stays mandatory, as the legacy checker had
  it) and never sent anywhere, in particular never as SASL credentials.

POP before SMTP: with ``PopBeforeSmtpKludgeChannel`` set (any value: the legacy channel name is
only an on/off switch now) and a fresh record of a verified POP login from the client's address,
XCLIENT carries ``LOGIN=<user>``, which a relay with ``smtpd_sasl_auth_enable = yes`` and
``permit_sasl_authenticated`` honours.  Such a client is authenticated at the relay from the
start; a later AUTH of its own gets the relay's answer (Postfix: 503 already authenticated).

Why the session greenlet stays in command mode to the end instead of handing both sockets to the
byte relay after EHLO, as IMAP and POP do after login: the proxy must see the message text.  A bare
LF or bare CR in DATA is how SMTP smuggling (CVE-2023-51764 and relatives) makes one relay see two
messages where another saw one; the proxy refuses it for every relay behind it, whatever the
relay's own setting.  And the client must never reach XCLIENT/XFORWARD or BDAT.  So:

* commands are read with the bounded line reader and forwarded one by one; when the relay offers
  PIPELINING, the commands a client pipelined (already in the buffer) go to the relay in one write
  and the same number of replies is read back, in order.  Replies to the client are batched the
  same way (they are flushed when the session would wait for the client).
* DATA is streamed line by line, never buffered whole: each line must end in CR LF with no other
  CR in it; lines may be up to 64 KiB (RFC 5321 allows 1000 octets, but real mail has longer
  lines and relays cope with them; a longer one is refused).  A refused message cannot be taken
  back from the relay, which has its first part: the relay connection is dropped (a relay
  discards a message whose DATA did not end), the client gets a 5xx and the connection is closed
  (as Postfix does for a bare LF), because nobody can say any more where that client's message
  ends and its next command begins.
* commands a client sent after its end of data are read after the relay's reply and answered in
  order.  CHUNKING/BDAT is never offered (the text could not be checked the same way).

EHLO: the relay's keywords are filtered to the supported set (8BITMIME PIPELINING
ENHANCEDSTATUSCODES EXPN HELP XLOOP ETRN SIZE AUTH) plus ``EhloKeywords``; STARTTLS is offered when
the proxy itself can do it; CHUNKING, BINARYMIME, XCLIENT and XFORWARD never reach a client.  AUTH
is passed to the relay unchanged (the relay verifies it; ``RestrictPlainPasswords`` hides it
before TLS).  When the relay offers STARTTLS, the proxy-to-relay leg uses it (relays with
``smtpd_tls_auth_only`` offer AUTH only then); the relay's certificate is not verified.

Timeouts: client reads wait ``Timeout`` seconds; the relay must accept and greet within
``FailoverTimeout`` seconds, and then answers within RFC 5321 4.5.3.2's limits.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import gevent

from mmproxy import __version__
from mmproxy import tls as tlsmod
from mmproxy.authservice import RECORDS
from mmproxy.backend import MAX_STORE_LINE, Store
from mmproxy.errors import (BackendProtocolError, BackendUnavailable, ClientGone, ClientSyntaxError, ClientTooLong,
                            MMProxyError)
from mmproxy.guard import unmapped
from mmproxy.session import Service, Session
from mmproxy.wire import LineReader

log = logging.getLogger("mmproxy.smtp")

MAX_COMMAND_LINE = 16384    # RFC 5321 says 512, but AUTH initial responses may be 12288 (RFC 4954)
MAX_DATA_LINE = 65536       # RFC 5321 4.5.3.1.6 says 1000 octets; be lenient, stay bounded
MAX_SKIP = 1 << 20          # an overlong command line is skipped up to this much, then we hang up
MAX_REPLY_LINES = 256
MAX_BATCH = 100             # pipelined commands forwarded in one write
DATA_CHUNK = 65536          # message text goes to the relay in writes of about this size
XCLIENT_MAX = 510           # octets of one XCLIENT command before its CR LF (512 with it)
XCLIENT_VALUE_MAX = 255     # octets of one (xtext-encoded) attribute value; Postfix refuses longer
LINGER = 2.0                # seconds a refused client is still read from, so our reply is not lost
LOOKUP_TIMEOUT = 10.0       # reverse and forward DNS of the client (ClientLookup)

# Towards the relay (RFC 5321 4.5.3.2); the greeting comes within FailoverTimeout instead.
SETUP_TIMEOUT = 60.0        # EHLO, STARTTLS and the TLS handshake while a relay is being chosen
REPLY_TIMEOUT = 300.0       # MAIL, RCPT (4.5.3.2.2, .3) and every other command
DATA_INIT_TIMEOUT = 120.0   # 4.5.3.2.4
DATA_BLOCK_TIMEOUT = 180.0  # 4.5.3.2.5: each write of message text
DATA_END_TIMEOUT = 600.0    # 4.5.3.2.6
QUIT_TIMEOUT = 10.0
DEFAULT_FAILOVER = 10       # FailoverTimeout 0 still needs a connect timeout

SUPPORTED_KEYWORDS = ("8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "EXPN", "HELP", "XLOOP", "ETRN", "SIZE",
                      "STARTTLS", "AUTH")
# Never passed to a client, even when EhloKeywords lists them: STARTTLS is the proxy's own; the
# others would let the client past the proxy's checks or speak for someone else.
NEVER_PASSED = frozenset({"STARTTLS", "CHUNKING", "BINARYMIME", "XCLIENT", "XFORWARD", "BDAT"})
BASE_VERBS = frozenset({"MAIL", "RCPT", "RSET", "NOOP", "VRFY", "EXPN", "HELP", "ETRN"})
VERB = re.compile(rb"[A-Za-z][A-Za-z0-9]{0,19}")
HOSTNAME = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# Replies, as constants the tests import too.
BANNER = "mmproxy %s ESMTP proxy ready" % __version__
RELAY_DOWN = "421 4.4.1 Mail relay not available, try again later"
HANDOVER_REFUSED = "421 4.3.5 Mail relay not available (hand-over refused), try again later"
RELAY_ERROR = "421 4.4.2 Mail relay connection failed, closing connection"
INTERNAL_ERROR = "421 4.3.0 Internal error, closing connection"
SHUTDOWN = "421 4.3.2 Service shutting down, closing connection"
TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
TOO_MANY = "421 4.7.0 Too many errors, closing connection"
SKIP_TOO_LONG = "421 4.7.0 Line far too long, closing connection"
LINE_TOO_LONG = "500 5.5.2 Line too long"
UNKNOWN = "502 5.5.2 Error: command not recognized"
BAD_SYNTAX = "501 5.5.2 Syntax error in command line"
NOT_PROXIED = "550 5.7.0 XCLIENT and XFORWARD are not available through this proxy"
NO_BDAT = "502 5.5.1 BDAT not available (no CHUNKING)"
BAD_BDAT = "501 5.5.4 BDAT without a chunk size, closing connection"
NO_TLS = "502 5.5.1 STARTTLS not available"
TLS_ACTIVE = "554 5.5.1 TLS already active"
TLS_NOT_NOW = "503 5.5.1 STARTTLS not allowed now (mail transaction or authentication in progress)"
TLS_GO = "220 2.0.0 Ready to start TLS"
NEED_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
BARE_EOL = "550 5.6.11 Message refused: bare CR or LF in message text (SMTP smuggling protection)"
DATA_LINE_TOO_LONG = "552 5.3.4 Message refused: line longer than %d octets" % MAX_DATA_LINE
BYE = "221 2.0.0 Bye"


class HandOverRefused(BackendUnavailable):
    """The relay would not take the real client (no XCLIENT for us, or XCLIENT refused)."""


@dataclass
class Reply:
    code: int
    lines: List[bytes]

    def text(self) -> str:
        return " | ".join(line.decode("utf-8", "replace") for line in self.lines)[:300]


class RelayLink(Store):
    """The proxy's SMTP client connection to one relay."""

    def __init__(self, host: str, port: int, connect_timeout: float, header: bytes = b"") -> None:
        super().__init__(host, port, connect_timeout=connect_timeout)
        self.keywords: Dict[str, str] = {}      # EHLO keyword -> its parameters
        self.proxied = bool(header)             # the PROXY protocol told it the client already
        self.tls = False
        if header:
            self.send(header)

    def __str__(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def send(self, data: bytes, timeout: float = REPLY_TIMEOUT) -> None:
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        except OSError as e:
            raise BackendUnavailable("%s: write failed: %s" % (self, getattr(e, "strerror", None) or e)) from None

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        """One (multi-line) reply; BackendProtocolError unless every line is ``NNN[- ]text`` with one code."""
        self.reader.timeout = timeout
        lines: List[bytes] = []
        while True:
            line = self.readline()
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-") \
                    or (lines and line[:3] != lines[0][:3]):
                raise BackendProtocolError("%s: not an SMTP reply: %r" % (self, line[:80]))
            lines.append(line)
            if line[3:4] != b"-":
                return Reply(int(line[:3]), lines)
            if len(lines) >= MAX_REPLY_LINES:
                raise BackendProtocolError("%s: reply of more than %d lines" % (self, MAX_REPLY_LINES))

    def command(self, line: bytes, timeout: float = REPLY_TIMEOUT) -> Reply:
        self.send(line + b"\r\n")
        return self.reply(timeout)

    def learn(self, r: Reply) -> None:
        """Remember the keywords of an EHLO reply."""
        self.keywords = {}
        for line in r.lines[1:]:
            word, _, params = line[4:].decode("ascii", "replace").strip().partition(" ")
            self.keywords[word.partition("=")[0].upper()] = params

    def ehlo(self, name: str) -> None:
        r = self.command(b"EHLO " + name.encode("ascii", "replace"), SETUP_TIMEOUT)
        if r.code != 250:
            raise BackendUnavailable("%s answered EHLO with %s" % (self, r.text()))
        self.learn(r)

    def starttls(self, ctx: ssl.SSLContext) -> None:
        if self.reader.take_pending():
            raise BackendProtocolError("%s sent data after its STARTTLS go-ahead" % self)
        self.sock.settimeout(tlsmod.HANDSHAKE_TIMEOUT)
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=None if _is_ip(self.host) else self.host)
        except (OSError, ssl.SSLError) as e:
            raise BackendUnavailable("%s: TLS handshake failed: %s" % (self, e)) from None
        self.reader = LineReader(self.sock, MAX_STORE_LINE, SETUP_TIMEOUT)
        self.tls = True

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords


class SmtpSession(Session):
    proto = "smtp"
    max_line = MAX_COMMAND_LINE
    too_many_connections = "421 4.7.0 Too many connections from your address"

    def __init__(self, service: "SmtpService", sock: socket.socket, addr: Tuple[str, int]) -> None:
        super().__init__(service, sock, addr)
        self.link: Optional[RelayLink] = None
        self.handed_over = False
        self.in_mail = False             # between an accepted MAIL and the end of its transaction
        self.sasl_done = False           # AUTH succeeded at the relay
        self.login: Optional[str] = None  # POP-before-SMTP user told to the relay
        self.pending: Optional[Union[bytes, MMProxyError]] = None   # read ahead while batching
        self.closing = False
        self.messages = 0
        self.end_reason = "closed"
        self.link_name = ""
        self.started = time.monotonic()

    # ------------------------------------------------------------------ life cycle
    def run(self, implicit_tls: bool) -> None:
        try:
            super().run(implicit_tls)
        finally:
            self.close_link()
            self.log.info("session end: %s (relay %s, %d message(s) relayed, %ds)", self.end_reason,
                          self.link_name or "-", self.messages, time.monotonic() - self.started)

    def close_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def greet(self) -> None:
        try:
            self.link = self.open_relay()
        except MMProxyError as e:
            self.log.warning("no relay for this client: %s", e)
            self.send(self.reply_for(e))
            self.end_reason = "no relay"
            self.closing = True
            return
        self.link_name = str(self.link)
        self.send("220 %s ESMTP %s" % (self.service.hostname, _one_line(self.cfg.Banner) or BANNER))

    def on_shutdown(self) -> None:
        self.send(SHUTDOWN)

    def loop(self) -> None:
        while not self.closing:
            try:
                if self.step() is False:
                    return
            except ClientGone as e:
                self.end_reason = "client: %s" % e
                if not self.reader.eof and "timed out" in str(e):
                    try:
                        self.send(TIMEOUT)
                        self.flush()
                    except ClientGone:
                        pass
                raise
            except (BackendUnavailable, BackendProtocolError) as e:
                self.log.warning("relay %s: %s", self.link_name, e)
                self.end_reason = "relay failed"
                self.send(self.reply_for(e))
                return
            except gevent.GreenletExit:
                raise
            except Exception:
                self.log.exception("SMTP session failed")
                self.end_reason = "internal error"
                self.send(INTERNAL_ERROR)
                return

    # ------------------------------------------------------------------ reading commands
    def read_line(self) -> bytes:
        """One client line without its terminator; an overlong one is skipped (bounded) and reported."""
        if self.pending is not None:
            p, self.pending = self.pending, None
            if isinstance(p, MMProxyError):
                raise p
            return p
        self.reader.timeout = float(self.cfg.Timeout)
        piece = self.reader.read_raw(MAX_COMMAND_LINE)
        if piece.endswith(b"\n"):
            return piece[:-2] if piece.endswith(b"\r\n") else piece[:-1]
        skipped = len(piece)
        while not piece.endswith(b"\n"):
            if skipped > MAX_SKIP:
                raise ClientSyntaxError("line of more than %d octets" % MAX_SKIP)
            piece = self.reader.read_raw(MAX_COMMAND_LINE)
            skipped += len(piece)
        raise ClientTooLong("command line of %d octets" % skipped)

    def step(self) -> Optional[bool]:
        try:
            line = self.read_line()
        except ClientTooLong:
            return self.refuse(LINE_TOO_LONG)
        except ClientSyntaxError:
            self.send(SKIP_TOO_LONG)
            self.end_reason = "line far too long"
            return False
        verb, arg = _split(line)
        if verb is None:
            self.log.debug("C: %r", line[:100])
            return self.refuse(BAD_SYNTAX)
        self.log.debug("C: %s", _masked(verb, line))
        handler = getattr(self, "cmd_" + verb, None)
        if handler is not None:
            return handler(line, arg)
        if verb in BASE_VERBS or verb in self.service.extra_verbs:
            return self.forward(line)
        return self.refuse(UNKNOWN)

    def refuse(self, reply: str) -> Optional[bool]:
        """Answer a refused command; False (end) once the bad-command budget is spent."""
        self.send(reply)
        if self.count_bad():
            self.send(TOO_MANY)
            self.end_reason = "too many errors"
            return False
        return None

    # ------------------------------------------------------------------ the relay
    def open_relay(self) -> RelayLink:
        """Connect to the first relay, in round-robin order, that greets, says EHLO and takes XCLIENT."""
        svc = self.service
        timeout = float(self.cfg.FailoverTimeout or DEFAULT_FAILOVER)
        last: Optional[MMProxyError] = None
        for host, port in svc.relay_order():
            try:
                link = self.connect_relay(host, port, timeout)
            except (BackendUnavailable, BackendProtocolError) as e:
                self.log.warning("relay %s:%d failed: %s; avoided for %d minute(s)", host, port, e,
                                 self.cfg.FailoverTimeout)
                svc.relay_failed((host, port))
                last = e
                continue
            svc.relay_ok((host, port))
            return link
        raise last or BackendUnavailable("SmtpRelays names no relay")

    def connect_relay(self, host: str, port: int, timeout: float) -> RelayLink:
        link = RelayLink(host, port, timeout, self.proxy_header())
        try:
            r = link.reply(timeout)
            if r.code != 220:
                raise BackendUnavailable("%s greeted with %s" % (link, r.text()))
            link.ehlo(self.service.hostname)
            if "STARTTLS" in link.keywords:
                r = link.command(b"STARTTLS", SETUP_TIMEOUT)
                if r.code != 220:
                    raise BackendUnavailable("%s offered STARTTLS, then answered %s" % (link, r.text()))
                link.starttls(self.service.relay_tls())
                link.ehlo(self.service.hostname)
            if "XCLIENT" not in link.keywords and not link.proxied:
                raise HandOverRefused("%s does not offer XCLIENT to this proxy (is the proxy's address in its "
                                      "smtpd_authorized_xclient_hosts?)" % link)
            return link
        except BaseException:
            link.close()
            raise

    def proxy_header(self) -> bytes:
        version = self.cfg.SmtpRelayProxyProtocol
        if not version:
            return b""
        return proxy_header(version, (self.client_ip, self.client_port), (self.server_ip, self.server_port))

    def hand_over(self, helo: Optional[bytes], proto: Optional[str]) -> None:
        """Tell the relay who the client really is (XCLIENT), before the client's first command reaches it."""
        link = self.relay()
        self.handed_over = True
        self.login = self.pop_before_smtp_user()
        if "XCLIENT" not in link.keywords:
            # connect_relay accepted this relay because the PROXY protocol named the client
            if self.login:
                self.log.warning("relay %s does not offer XCLIENT: POP-before-SMTP login of %s not passed on",
                                 link, self.login)
                self.login = None
            self.log.info("handed over to relay %s by the PROXY protocol", link)
            return
        offered = set(link.keywords["XCLIENT"].upper().split())
        ip = unmapped(self.client_ip)
        attrs: List[Tuple[str, str]] = []
        if helo:
            attrs.append(("HELO", xtext(helo)))      # over 255 octets: [UNAVAILABLE] (xclient_commands)
        if proto:
            attrs.append(("PROTO", proto))
        if self.login and len(xtext(self.login.encode("utf-8", "surrogateescape"))) > XCLIENT_VALUE_MAX:
            self.log.warning("POP-before-SMTP login %r too long for XCLIENT: not passed on", self.login[:80])
            self.login = None
        if self.login:
            if "LOGIN" in offered or not offered:
                attrs.append(("LOGIN", xtext(self.login.encode("utf-8", "surrogateescape"))))
            else:
                self.log.warning("relay %s does not take XCLIENT LOGIN (smtpd_sasl_auth_enable?): "
                                 "POP-before-SMTP login of %s not passed on", link, self.login)
                self.login = None
        attrs += [("PORT", str(self.client_port)), ("DESTADDR", xtext(str(unmapped(self.server_ip)).encode())),
                  ("DESTPORT", str(self.server_port)), ("NAME", self.client_name()),
                  ("ADDR", xclient_addr(self.client_ip))]
        if offered:
            if "ADDR" not in offered:
                raise HandOverRefused("%s offers XCLIENT without ADDR" % link)
            attrs = [(k, v) for k, v in attrs if k in offered]
        for cmd in xclient_commands(attrs):
            r = link.command(cmd.encode("ascii"))
            if r.code != 220:
                raise HandOverRefused("%s answered %s with %s" % (link, cmd[:60], r.text()))
        self.log.info("handed over to relay %s as %s%s", link, ip, (" login=%s" % self.login) if self.login else "")

    def relay(self) -> RelayLink:
        if self.link is None:
            raise BackendUnavailable("relay connection gone")
        return self.link

    def ensure_handover(self) -> RelayLink:
        if not self.handed_over:
            self.hand_over(None, None)
        return self.relay()

    def pop_before_smtp_user(self) -> Optional[str]:
        if not self.cfg.PopBeforeSmtpKludgeChannel:
            return None
        rec = RECORDS.lookup(self.client_ip)
        return rec.user if rec is not None else None

    def client_name(self) -> str:
        """The client's verified host name for XCLIENT NAME (ClientLookup), else [UNAVAILABLE]/[TEMPUNAVAIL]."""
        if not self.cfg.ClientLookup:
            return "[UNAVAILABLE]"
        ip = str(unmapped(self.client_ip))
        try:
            with gevent.Timeout(LOOKUP_TIMEOUT):
                name = socket.gethostbyaddr(ip)[0].rstrip(".").lower()
                if not HOSTNAME.fullmatch(name):
                    self.log.info("reverse DNS of %s is not a host name: %r", ip, name[:100])
                    return "[UNAVAILABLE]"
                # forward-confirmed: a PTR record alone is the client's own claim
                addrs = {str(unmapped(ai[4][0])) for ai in socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)}
        except gevent.Timeout:
            return "[TEMPUNAVAIL]"
        except (OSError, UnicodeError, ValueError):
            return "[UNAVAILABLE]"
        return name if ip in addrs else "[UNAVAILABLE]"

    def forward(self, first: bytes) -> Optional[bool]:
        """Forward a command, and those the client pipelined behind it, to the relay; answer each in order."""
        link = self.ensure_handover()
        batch = [first]
        while link.pipelining and len(batch) < MAX_BATCH and self.pending is None and self.reader.has_line():
            try:
                line = self.read_line()
            except MMProxyError as e:
                self.pending = e
                break
            verb, _ = _split(line)
            if verb is not None and (verb in BASE_VERBS or verb in self.service.extra_verbs) \
                    and not hasattr(self, "cmd_" + verb):
                self.log.debug("C: %s", _masked(verb, line))
                batch.append(line)
            else:
                self.pending = line
        link.send(b"".join(line + b"\r\n" for line in batch))
        for line in batch:
            r = link.reply()
            self.answer(r)
            if self.closing:            # the relay said 421 and hangs up: no more replies come
                break
            verb = _split(line)[0]
            if verb == "MAIL" and r.code == 250:
                self.in_mail = True
            elif verb == "RSET":
                self.in_mail = False
        return False if self.closing else None

    def answer(self, r: Reply) -> None:
        """Pass a relay reply on; a 421 from the relay ends the session."""
        for line in r.lines:
            self.send(line)
        self.log.debug("R: %s", r.text())
        if r.code == 421:
            self.end_reason = "relay closed: %s" % r.text()
            self.closing = True

    # ------------------------------------------------------------------ commands
    def cmd_EHLO(self, line: bytes, arg: bytes) -> Optional[bool]:
        """RFC 5321 4.1.1.1; the reply is the relay's, its keywords filtered."""
        return self._hello(line, arg, "ESMTP")

    def cmd_HELO(self, line: bytes, arg: bytes) -> Optional[bool]:
        """RFC 5321 4.1.1.1."""
        return self._hello(line, arg, "SMTP")

    def _hello(self, line: bytes, arg: bytes, proto: str) -> Optional[bool]:
        name = arg.strip()
        if not name:
            return self.refuse("501 5.5.4 Syntax: %s hostname" % ("EHLO" if proto == "ESMTP" else "HELO"))
        if not self.handed_over:
            self.hand_over(name, proto)
        link = self.relay()
        r = link.command(line)
        if r.code == 250:
            self.in_mail = False
            if proto == "ESMTP":
                link.learn(r)
                self.answer(Reply(250, self.filter_ehlo(r)))
            else:
                self.answer(Reply(250, [b"250 " + self.service.hostname.encode()]))
            return None
        self.answer(r)
        return False if self.closing else None

    def filter_ehlo(self, r: Reply) -> List[bytes]:
        words = [self.service.hostname.encode()]
        for line in r.lines[1:]:
            text = line[4:].strip()
            kw = text.split(b" ", 1)[0].split(b"=", 1)[0].upper().decode("ascii", "replace")
            if kw == "AUTH" and self.plaintext_refused:
                continue
            if kw in self.service.keywords:
                words.append(text)
        if self.service.tls is not None and not self.tls_active:
            words.append(b"STARTTLS")
        return [b"250" + (b" " if i == len(words) - 1 else b"-") + w for i, w in enumerate(words)]

    def cmd_STARTTLS(self, line: bytes, arg: bytes) -> Optional[bool]:
        """RFC 3207; anything pipelined behind it is discarded (CVE-2011-0411)."""
        if arg.strip():
            return self.refuse("501 5.5.4 Syntax: STARTTLS")
        if self.service.tls is None:
            return self.refuse(NO_TLS)
        if self.tls_active:
            return self.refuse(TLS_ACTIVE)
        if self.in_mail or self.sasl_done:
            self.send(TLS_NOT_NOW)
            return None
        self.send(TLS_GO)
        self.starttls()
        return None

    def cmd_AUTH(self, line: bytes, arg: bytes) -> Optional[bool]:
        """RFC 4954: passed to the relay unchanged, with its challenges and the client's responses."""
        if self.plaintext_refused:
            self.send(NEED_TLS)
            return None
        link = self.ensure_handover()
        r = link.command(line)
        while r.code == 334:
            self.answer(r)
            try:
                response = self.read_line()
            except ClientTooLong:
                link.command(b"*")              # cancel (RFC 4954 4) and tell the client why
                return self.refuse(LINE_TOO_LONG)
            self.log.debug("C: ********")
            r = link.command(response)
        self.answer(r)
        if r.code == 235:
            self.sasl_done = True
            self.log.info("authenticated at relay %s", link)
        return False if self.closing else None

    def cmd_DATA(self, line: bytes, arg: bytes) -> Optional[bool]:
        """RFC 5321 4.1.1.4: the text is streamed line by line, checked for bare CR/LF (SMTP smuggling)."""
        link = self.ensure_handover()
        r = link.command(line, DATA_INIT_TIMEOUT)
        self.answer(r)
        if r.code != 354:
            return False if self.closing else None
        out = bytearray()
        size = 0
        self.reader.timeout = float(self.cfg.Timeout)
        while True:
            piece = self.reader.read_raw(MAX_DATA_LINE)
            if not piece.endswith(b"\n"):
                return self.refuse_message(DATA_LINE_TOO_LONG, "line over %d octets" % MAX_DATA_LINE)
            if not piece.endswith(b"\r\n") or b"\r" in piece[:-2]:
                return self.refuse_message(BARE_EOL, "bare CR or LF at octet %d of the message" % size)
            out += piece
            size += len(piece)
            if piece == b".\r\n":
                break
            if len(out) >= DATA_CHUNK:
                link.send(bytes(out), DATA_BLOCK_TIMEOUT)
                out.clear()
        link.send(bytes(out), DATA_BLOCK_TIMEOUT)
        r = link.reply(DATA_END_TIMEOUT)
        self.answer(r)
        self.in_mail = False
        if r.code // 100 == 2:
            self.messages += 1
            self.log.info("message relayed (%d octets): %s", size, r.text())
        else:
            self.log.info("message refused by relay (%d octets): %s", size, r.text())
        return False if self.closing else None

    def refuse_message(self, reply: str, why: str) -> bool:
        """Drop the relay (it discards an unfinished message), answer, and hang up."""
        self.log.warning("message refused: %s; relay connection dropped, nothing delivered", why)
        self.close_link()
        self.send(reply)
        self.end_reason = "message refused: %s" % why
        self.linger()
        return False

    def linger(self) -> None:
        """Flush our reply, then read what the client still sends for a moment, so that closing does not
        reset the connection (and lose the reply) while its data is still arriving."""
        self.flush()
        self.reader.take_pending()
        deadline = time.monotonic() + LINGER
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.05, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    break
        except (OSError, socket.timeout):
            pass

    def cmd_BDAT(self, line: bytes, arg: bytes) -> Optional[bool]:
        """RFC 3030, not offered: the chunk is read and dropped, so it is never taken for commands."""
        m = re.fullmatch(rb"\s*(\d{1,12})(\s+LAST)?\s*", arg, re.I)
        if m is None:
            self.send(BAD_BDAT)
            self.end_reason = "BDAT without a size"
            return False
        self.reader.timeout = float(self.cfg.Timeout)
        self.reader.discard(int(m.group(1)))
        return self.refuse(NO_BDAT)

    def cmd_XCLIENT(self, line: bytes, arg: bytes) -> Optional[bool]:
        """Postfix XCLIENT: the proxy speaks for the client; the client never does."""
        self.log.warning("client tried %s", line[:60])
        return self.refuse(NOT_PROXIED)

    cmd_XFORWARD = cmd_XCLIENT

    def cmd_QUIT(self, line: bytes, arg: bytes) -> bool:
        """RFC 5321 4.1.1.10."""
        if self.link is not None:
            try:
                self.link.command(b"QUIT", QUIT_TIMEOUT)
            except MMProxyError:
                pass
        self.send(BYE)
        self.end_reason = "quit"
        return False

    # ------------------------------------------------------------------ failures
    def reply_for(self, e: BaseException) -> str:
        """The one place where the failure taxonomy becomes SMTP replies (all of them end the session)."""
        if isinstance(e, HandOverRefused):
            return HANDOVER_REFUSED
        if isinstance(e, BackendUnavailable):
            return RELAY_DOWN if self.link is None or not self.handed_over else RELAY_ERROR
        if isinstance(e, BackendProtocolError):
            return RELAY_ERROR
        return INTERNAL_ERROR


class SmtpService(Service):
    name = "smtp"
    session_class = SmtpSession
    uses_directory = False

    def __init__(self, entry: object) -> None:
        super().__init__(entry)
        self.hostname = socket.gethostname() or "localhost"
        self.turn = 0                                   # round-robin position
        self.avoid: Dict[Tuple[str, int], float] = {}   # relay -> monotonic time it is tried again
        self._relay_tls: Optional[ssl.SSLContext] = None
        listed = {k.upper() for k in self.cfg.EhloKeywords or ()}
        ignored = listed & NEVER_PASSED
        if ignored:
            log.warning("EhloKeywords %s ignored: the proxy never passes them to clients", " ".join(sorted(ignored)))
        self.keywords = (set(SUPPORTED_KEYWORDS) | listed) - NEVER_PASSED
        # listed keywords that are commands (TURN, ATRN, ...) are forwarded like the base verbs
        self.extra_verbs = {k for k in listed - NEVER_PASSED if re.fullmatch(r"[A-Z][A-Z0-9]*", k)} - {"AUTH"}

    def relay_order(self) -> List[Tuple[str, int]]:
        """Relays to try, starting one further each session; those that failed lately come last."""
        relays = list(self.cfg.SmtpRelays or ())
        if not relays:
            return []
        start = self.turn % len(relays)
        self.turn += 1
        order = [tuple(r) for r in relays[start:] + relays[:start]]
        now = time.monotonic()
        fresh = [r for r in order if self.avoid.get(r, 0.0) <= now]
        # every relay failed lately: try them anyway, the soonest-forgiven first, rather than refuse all mail
        stale = sorted((r for r in order if r not in fresh), key=lambda r: self.avoid[r])
        return fresh + stale

    def relay_failed(self, relay: Tuple[str, int]) -> None:
        minutes = self.cfg.FailoverTimeout or 0
        if minutes > 0:
            self.avoid[relay] = time.monotonic() + 60.0 * minutes

    def relay_ok(self, relay: Tuple[str, int]) -> None:
        self.avoid.pop(relay, None)

    def relay_tls(self) -> ssl.SSLContext:
        """TLS towards relays: encryption without certificate verification (documented)."""
        if self._relay_tls is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._relay_tls = ctx
        return self._relay_tls


# ---------------------------------------------------------------------- helpers
def _split(line: bytes) -> Tuple[Optional[str], bytes]:
    """(VERB, argument) of a command line; VERB None when the line is not a command (or holds CR/NUL)."""
    verb, _, arg = line.partition(b" ")
    if not VERB.fullmatch(verb) or b"\r" in line or b"\0" in line:
        return None, b""
    return verb.decode("ascii").upper(), arg


def _masked(verb: str, line: bytes) -> str:
    """A client line for the log: AUTH arguments never appear."""
    if verb == "AUTH":
        mech = line.split(b" ")[1:2]
        return "AUTH %s ********" % (mech[0].decode("ascii", "replace") if mech else "")
    return repr(line[:200])[2:-1]


def xtext(value: bytes) -> str:
    """RFC 3461 xtext: '+', '=' and octets outside 33..126 as +HH."""
    return "".join(chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else "+%02X" % b for b in value)


def xclient_commands(attrs: Sequence[Tuple[str, str]]) -> List[str]:
    """XCLIENT commands of at most 510 octets; ADDR and NAME in the last one (the relay re-checks
    its XCLIENT authorisation against them). A value over 255 octets is sent as [UNAVAILABLE]."""
    def item(k: str, v: str) -> str:
        return " %s=%s" % (k, v if len(v) <= XCLIENT_VALUE_MAX else "[UNAVAILABLE]")

    first = [item(k, v) for k, v in attrs if k not in ("ADDR", "NAME")]
    last = "".join(item(k, v) for k, v in attrs if k in ("ADDR", "NAME"))
    cmds: List[str] = []
    cur = "XCLIENT"
    for it in first:
        if len(cur + it) > XCLIENT_MAX:
            cmds.append(cur)
            cur = "XCLIENT"
        cur += it
    if len(cur + last) > XCLIENT_MAX:
        cmds.append(cur)
        cur = "XCLIENT"
    cmds.append(cur + last)
    return [c for c in cmds if c != "XCLIENT"]


def proxy_header(version: int, client: Tuple[str, int], server: Tuple[str, int]) -> bytes:
    """The PROXY protocol header (v1 text, v2 binary) for a TCP connection from ``client`` to ``server``."""
    src, dst = unmapped(client[0]), unmapped(server[0])
    if src.version != dst.version:          # a v4 client on a v6 listener: say both in v6
        src, dst = _as_v6(src), _as_v6(dst)
    if version == 1:
        return ("PROXY TCP%d %s %s %d %d\r\n" % (src.version, src, dst, client[1], server[1])).encode()
    body = src.packed + dst.packed + struct.pack("!HH", client[1], server[1])
    family = 0x11 if src.version == 4 else 0x21         # TCP over IPv4 / IPv6
    return PROXY_V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def xclient_addr(ip: str) -> str:
    """XCLIENT ADDR: IPv4 as is, IPv6 as IPV6:..., an IPv4-mapped IPv6 address as the IPv4 one."""
    a = unmapped(ip)
    return ("IPV6:%s" % a) if a.version == 6 else str(a)


def _as_v6(a: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]) -> ipaddress.IPv6Address:
    return a if isinstance(a, ipaddress.IPv6Address) else ipaddress.IPv6Address("::ffff:%s" % a)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _one_line(text: object) -> str:
    return " ".join(str(text or "").split())
