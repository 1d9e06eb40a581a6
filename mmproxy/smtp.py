"""SMTP (RFC 5321): a front end for mail submission that hands every client to a relay as itself.

Unlike IMAP and POP, an SMTP session has no login to replay and no store to find: every client
goes to one of ``SmtpRelays`` (round robin; a relay that failed is avoided for ``FailoverTimeout``
minutes), and the relay must apply its policy to the *client*, not to the proxy: a relay that
trusts the proxy's address would otherwise be an open relay.  The legacy product used a
password-authenticated extension of the Messaging Server MTA for that (``SmtpProxyPassword`` was
its PROXY_PASSWORD); mmproxy uses what today's relays offer:

* Postfix's XCLIENT (ADDR, PORT, NAME, HELO, PROTO, LOGIN, DESTADDR, DESTPORT as the relay lists
  them, values xtext-encoded), sent once, at the client's first EHLO/HELO (or before its first
  other command), never inside a mail transaction: the proxy *introduces* the client.  The relay
  answers 220 as to a new connection, the client's EHLO then goes to the relay, and the client is
  answered from the relay's reply.  A relay that does not offer XCLIENT to the proxy
  (``smtpd_authorized_xclient_hosts``) is not used: the client gets 421 when no relay takes it.
  Postfix re-checks its XCLIENT authorisation against the address XCLIENT set, so when the
  attributes need more than one command (512 octets each), ADDR and NAME go in the last one.
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
pump after EHLO, as IMAP and POP do after login: the proxy must see the message text.  A bare LF or
bare CR in a message is how SMTP smuggling (CVE-2023-51764 and relatives) makes one relay see two
messages where another saw one; the proxy refuses it for every relay behind it, whatever the
relay's own setting.  And the client must never reach XCLIENT/XFORWARD.  So:

* commands are read with the bounded line reader and forwarded one by one; when the relay offers
  PIPELINING, the commands a client pipelined (already in the buffer) go to the relay in one write
  and the same number of replies is read back, in order.  Replies to the client are batched the
  same way (they are flushed when the session would wait for the client).
* DATA is streamed line by line, never buffered whole: each line must end in CR LF with no other
  CR in it; lines may be up to 64 KiB (RFC 5321 allows 1000 octets, but real mail has longer
  lines and relays cope with them; a longer one is refused).  BDAT chunks (CHUNKING, RFC 3030) are
  read by their size, never parsed as commands, and the message they assemble meets the same
  line-ending rule across chunk boundaries.
* a refused message cannot be taken back from the relay, which has its first part: the relay
  connection is dropped (a relay discards a message whose DATA did not end), the client gets the
  5xx for its message and then ``421`` for whatever it sends next, and the connection closes (as
  Postfix does for a bare LF): nobody can say any more where that client's message ends and its
  next command begins.

EHLO: the relay's keywords are filtered to the supported set (8BITMIME PIPELINING
ENHANCEDSTATUSCODES EXPN HELP XLOOP ETRN SIZE AUTH DSN SMTPUTF8 CHUNKING) plus ``EhloKeywords``;
STARTTLS is offered when the proxy itself can do it; BINARYMIME, XCLIENT and XFORWARD never reach a
client.  DSN, SMTPUTF8 and CHUNKING pass since mmproxy 0.2 (the legacy default hid them); a relay
that does not offer them keeps them from clients, and a client's BDAT then gets 502 with its chunk
skipped.  AUTH is passed to the relay unchanged (the relay verifies it); ``RestrictPlainPasswords``
keeps the mechanisms that carry a password in clear (PLAIN, LOGIN) from clients before TLS.  When
the relay offers STARTTLS, the proxy-to-relay leg uses it (relays with ``smtpd_tls_auth_only``
offer AUTH only then); the relay's certificate is not verified.

Timeouts: until its first EHLO/HELO a client has ``LoginIdleTimeout`` seconds per read and
``LoginTimeout`` in all; then ``Timeout`` seconds idle before each command, and once a command's
first octet is in, the whole line within ``Timeout``; the text of one message (DATA, or the BDAT
chunks of one message) within ``SmtpMessageTimeout``.  The relay must accept and greet within
``FailoverTimeout`` seconds, and then give each whole reply within RFC 5321 4.5.3.2's limits.
"""
from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from typing import Dict, List, Optional, Tuple

import gevent

from mmproxy import __version__, authservice, hostnames, sasl, tls
from mmproxy.addresses import unmapped
from mmproxy.errors import (
    BackendError,
    BackendUnavailable,
    ClientError,
    ClientSyntaxError,
    ClientTimeout,
    ClientTooLong,
    CommandError,
    HandOverRefused,
    MMProxyError,
    NotNow,
    PrivacyRequired,
    ServerShutdown,
    UnknownCommand,
)
from mmproxy.proxyproto import Origin
from mmproxy.session import Line, Request, Service, Session, State, Verb, one_line
from mmproxy.smtpclient import REPLY_TIMEOUT, SETUP_TIMEOUT, RelayConnection, Reply
from mmproxy.xclient import XCLIENT_VALUE_MAX, proxy_header, xclient_addr, xclient_commands, xtext

MAX_COMMAND_LINE = 16384    # RFC 5321 says 512, but AUTH initial responses may be 12288 (RFC 4954)
MAX_DATA_LINE = 65536       # RFC 5321 4.5.3.1.6 says 1000 octets; be lenient, stay bounded
MAX_SKIP = 1 << 20          # an overlong command line is skipped up to this much, then we hang up
MAX_BATCH = 100             # pipelined commands forwarded in one write
DATA_CHUNK = 65536          # message text goes to the relay in writes of about this size
YIELD_LINES = 256           # message lines read in a row before the other sessions get their turn

# Towards the relay (RFC 5321 4.5.3.2), beyond smtpclient's SETUP_TIMEOUT and REPLY_TIMEOUT; the
# greeting comes within FailoverTimeout instead.
DATA_INIT_TIMEOUT = 120.0   # 4.5.3.2.4
DATA_BLOCK_TIMEOUT = 180.0  # 4.5.3.2.5: each write of message text
DATA_END_TIMEOUT = 600.0    # 4.5.3.2.6
QUIT_TIMEOUT = 10.0
DEFAULT_FAILOVER = 10       # FailoverTimeout 0 still needs a connect timeout

SUPPORTED_KEYWORDS = ("8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "EXPN", "HELP", "XLOOP", "ETRN", "SIZE",
                      "STARTTLS", "AUTH", "DSN", "SMTPUTF8", "CHUNKING")
# Never passed to a client, even when EhloKeywords lists them: STARTTLS is the proxy's own; the
# others would let the client past the proxy's checks or speak for someone else.
NEVER_PASSED = frozenset({"STARTTLS", "BINARYMIME", "XCLIENT", "XFORWARD", "BDAT"})
FORWARDED_VERBS = frozenset({"MAIL", "RCPT", "RSET", "NOOP", "VRFY", "EXPN", "HELP", "ETRN"})
VERB = re.compile(rb"[A-Za-z][A-Za-z0-9]{0,19}")
SASL_MECH = re.compile(r"[A-Z0-9_-]{1,20}")          # RFC 4422 3.1 mechanism names
BDAT_ARGS = re.compile(rb"[ \t]+(\d{1,12})(?:[ \t]+(LAST))?[ \t]*", re.I)
BDAT_LINE = re.compile(rb"BDAT(?![A-Za-z0-9])", re.I)     # any line a relay might take for BDAT

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
AFTER_REFUSAL = "421 4.7.0 Closing connection after a refused message"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address"
ACCESS_DENIED = "421 4.7.0 Access denied"
LINE_TOO_LONG = "500 5.5.2 Line too long"
UNKNOWN = "502 5.5.2 Error: command not recognized"
BAD_SYNTAX = "501 5.5.2 Syntax error in command line"
BAD_SEQUENCE = "503 5.5.1 Bad sequence of commands"
NOT_PROXIED = "550 5.7.0 XCLIENT and XFORWARD are not available through this proxy"
NO_BDAT = "502 5.5.1 BDAT not available (no CHUNKING)"
BAD_BDAT = "501 5.5.4 Syntax: BDAT chunk-size [LAST]"
BDAT_LOST = "421 4.7.0 Closing connection: a chunk of unknown size follows"
NO_TLS = "502 5.5.1 STARTTLS not available"
TLS_ACTIVE = "554 5.5.1 TLS already active"
TLS_NOT_NOW = "503 5.5.1 STARTTLS not allowed now (mail transaction or authentication in progress)"
AUTH_NOT_NOW = "503 5.5.1 AUTH not allowed in a mail transaction"
DATA_NOT_NOW = "503 5.5.1 Error: need MAIL command"
EHLO_FIRST = "503 5.5.1 Error: send HELO/EHLO first"
TLS_GO = "220 2.0.0 Ready to start TLS"
NEED_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
BARE_EOL = "550 5.6.11 Message refused: bare CR or LF in message text (SMTP smuggling protection)"
DATA_LINE_TOO_LONG = "552 5.3.4 Message refused: line longer than %d octets" % MAX_DATA_LINE
BYE = "221 2.0.0 Bye"


class SmtpState(State):
    GREETING = "greeting"          # connected to a relay; the client is not introduced yet
    TLS_STARTED = "tls started"    # after STARTTLS: EHLO again first (RFC 3207 4.2)
    RELAYING = "relaying"          # introduced: commands go to the relay, no mail transaction
    ENVELOPE = "envelope"          # MAIL accepted: RCPT, DATA or BDAT next
    DATA = "data"                  # message text on its way
    CLOSED = "closed"


_COMMAND_STATES = frozenset({SmtpState.GREETING, SmtpState.RELAYING, SmtpState.ENVELOPE})
_OUTSIDE_MAIL = frozenset({SmtpState.GREETING, SmtpState.RELAYING})
_IN_MAIL = frozenset({SmtpState.ENVELOPE, SmtpState.DATA})
_RELAYED = frozenset({SmtpState.RELAYING, SmtpState.ENVELOPE, SmtpState.DATA})
_ANY = _COMMAND_STATES | {SmtpState.TLS_STARTED}


class LineEndings:
    """Checks that message text ends every line in CR LF and has no other CR or LF, across the
    pieces it arrives in (lines of DATA, BDAT chunks).  ``feed`` returns False at the first fault."""

    def __init__(self) -> None:
        self.cr = False          # the last piece ended in a CR
        self.size = 0            # octets fed so far

    def feed(self, piece: bytes) -> bool:
        if not piece:
            return True
        if self.cr and piece[:1] != b"\n":
            return False
        start = 1 if self.cr else 0
        self.size += len(piece)
        body = piece[start:]
        self.cr = body.endswith(b"\r")
        if self.cr:
            body = body[:-1]
        return body.count(b"\r") == body.count(b"\r\n") == body.count(b"\n")

    def complete(self) -> bool:
        """Nothing is left half-way (a final CR without its LF)."""
        return not self.cr


class SmtpSession(Session):
    kind = "smtp"
    max_line = MAX_COMMAND_LINE
    INITIAL = SmtpState.GREETING
    NOT_NOW_IN = {SmtpState.TLS_STARTED: EHLO_FIRST}
    CLOSED = SmtpState.CLOSED
    BYE_TOO_MANY = TOO_MANY
    TOO_MANY_CONNECTIONS = TOO_MANY_CONNECTIONS
    ACCESS_DENIED = ACCESS_DENIED
    INTERNAL_ERROR = INTERNAL_ERROR
    LOGIN_PHASE = "the dialogue before EHLO"
    service: "SmtpService"

    def __init__(self, service: "SmtpService", sock: socket.socket, addr: Tuple[str, int],
                 origin: Optional[Origin] = None) -> None:
        super().__init__(service, sock, addr, origin)
        self.relay: Optional[RelayConnection] = None
        self.relay_name = ""
        self.authenticated = False       # AUTH succeeded at the relay
        self.login: Optional[str] = None  # POP-before-SMTP user told to the relay
        self.messages = 0
        self.endings = LineEndings()     # of the message that BDAT chunks are assembling
        self.message_by: Optional[float] = None   # the monotonic time its text must be in by

    # ------------------------------------------------------------------ life cycle

    @property
    def relaying(self) -> bool:
        """Introduced (EHLO): the relay answers the commands now."""
        return self.state in _RELAYED

    def run(self, implicit_tls: bool) -> None:
        try:
            super().run(implicit_tls)
        finally:
            self.close_relay()

    def close_relay(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None

    def describe(self) -> str:
        return "relay %s, %d message(s) relayed" % (self.relay_name or "-", self.messages)

    def busy(self) -> bool:
        """A mail transaction under way (after MAIL): a stopping daemon lets it finish within ShutdownGrace."""
        return self.state in _IN_MAIL

    def greet(self) -> None:
        self.relay = self.open_relay()
        self.relay_name = str(self.relay)
        self.send("220 %s ESMTP %s" % (self.service.hostname, one_line(self.cfg.Banner) or BANNER))

    # ------------------------------------------------------------------ reading commands
    def read_line(self, limit: int = MAX_COMMAND_LINE) -> bytes:
        """One client line without its terminator: before the first EHLO within the login phase's
        limits, then after at most Timeout idle seconds, and all of it within Timeout of its first
        octet.  An overlong one is skipped to its end (ClientTooLong, recoverable) unless it runs
        past MAX_SKIP (not recoverable)."""
        if self.state is not SmtpState.GREETING:
            timeout = float(self.cfg.Timeout)
            self.reader.idle = timeout
            self.reader.set_deadline(None)
            self.reader.wait_for_input()            # an idle client is an idle timeout, not a slow command
            self.reader.set_deadline(timeout, "an SMTP command")
        piece = self.reader.read_raw(limit)
        if piece.endswith(b"\n"):
            return piece[:-2] if piece.endswith(b"\r\n") else piece[:-1]
        skipped = len(piece)
        while not piece.endswith(b"\n"):
            if skipped > MAX_SKIP:
                raise ClientTooLong("line of more than %d octets" % MAX_SKIP)
            piece = self.reader.read_raw(limit)
            skipped += len(piece)
        raise ClientTooLong("command line of %d octets" % skipped, recoverable=True)

    def read_request(self) -> Request:
        line = self.read_line()
        if BDAT_LINE.match(line.lstrip(b" \t")):
            # whatever follows BDAT, a chunk may follow the line: cmd_BDAT reads it or hangs up
            line = line.lstrip(b" \t")
            self.log_command("BDAT", line)
            return Request("BDAT", [line[4:]], line)
        verb, arg = _split(line)
        self.log_command(verb, line)
        if verb is None:
            raise ClientSyntaxError(BAD_SYNTAX)
        return Request(verb, [arg], line)

    def log_command(self, verb: Optional[str], line: bytes) -> None:
        """A client command at LogLevel 5, AUTH arguments masked.  What is no known command may be
        the rest of a refused AUTH exchange (a password): only its length is logged."""
        if self.log.isEnabledFor(logging.DEBUG):
            known = verb in self.service.commands
            self.log.debug("C: %s", _masked(verb, line) if known else "(%d octets, no known command)" % len(line))

    # ------------------------------------------------------------------ failures
    def reply_for(self, e: BaseException) -> Tuple[List[Line], bool]:
        """The one place where the failure taxonomy becomes SMTP replies: (lines, end?)."""
        if isinstance(e, ClientTimeout):
            return [TIMEOUT], True
        if isinstance(e, ClientTooLong):
            return ([LINE_TOO_LONG], False) if e.recoverable else ([SKIP_TOO_LONG], True)
        if isinstance(e, CommandError):
            if e.reply[:3].isdigit():
                return [e.reply], False
            if isinstance(e, PrivacyRequired):
                return [NEED_TLS], False
            if isinstance(e, UnknownCommand):
                return [UNKNOWN], False
            return [BAD_SEQUENCE if isinstance(e, NotNow) else BAD_SYNTAX], False
        if isinstance(e, HandOverRefused):
            return [HANDOVER_REFUSED], True
        if isinstance(e, BackendUnavailable):
            return [RELAY_DOWN if self.state is SmtpState.GREETING else RELAY_ERROR], True
        if isinstance(e, BackendError):
            return [RELAY_ERROR], True
        if isinstance(e, ServerShutdown):
            return [SHUTDOWN], True
        return [INTERNAL_ERROR], True

    def log_login_failure(self, e: BaseException) -> str:
        if not self.relay_name:
            self.log.warning("no relay for this client: %s", e)
            return "no relay"
        self.log.warning("relay %s: %s", self.relay_name, e)
        return "relay failed"

    # ------------------------------------------------------------------ the relay
    def open_relay(self) -> RelayConnection:
        """Connect to the first relay, in round-robin order, that greets, says EHLO and takes XCLIENT."""
        svc = self.service
        timeout = float(self.cfg.FailoverTimeout or DEFAULT_FAILOVER)
        last: Optional[MMProxyError] = None
        order = svc.relay_order()
        for host, port in order:
            try:
                relay = self.connect_relay(host, port, timeout)
            except BackendError as e:
                self.log.warning("relay %s:%d failed: %s; avoided for %d minute(s)", host, port, e,
                                 self.cfg.FailoverTimeout)
                svc.relay_failed((host, port))
                last = e
                continue
            svc.relay_ok((host, port))
            return relay
        if last is None:
            raise BackendUnavailable("SmtpRelays names no relay")
        # each failure is logged above: this one says only that none is left (of the same kind)
        raise type(last)("none of %d relay(s) took the client" % len(order))

    def connect_relay(self, host: str, port: int, timeout: float) -> RelayConnection:
        relay = RelayConnection(host, port, timeout, self.proxy_header())
        taken = False
        try:
            r = relay.reply(timeout)
            if r.code != 220:
                raise BackendUnavailable("%s greeted with %s" % (relay, r.text()))
            relay.ehlo(self.service.hostname)
            if "STARTTLS" in relay.keywords:
                r = relay.command(b"STARTTLS", SETUP_TIMEOUT)
                if r.code != 220:
                    raise BackendUnavailable("%s offered STARTTLS, then answered %s" % (relay, r.text()))
                relay.starttls(self.service.relay_tls(), float(self.cfg.HandshakeTimeout))
                relay.ehlo(self.service.hostname)
            if "XCLIENT" not in relay.keywords and not relay.proxied:
                raise HandOverRefused("%s does not offer XCLIENT to this proxy (is the proxy's address in its "
                                      "smtpd_authorized_xclient_hosts?)" % relay)
            taken = True
            return relay
        finally:
            if not taken:
                relay.close()

    def proxy_header(self) -> bytes:
        version = self.cfg.SmtpRelayProxyProtocol
        if not version:
            return b""
        return proxy_header(version, (self.client_ip, self.client_port), (self.server_ip, self.server_port))

    def connected_relay(self) -> RelayConnection:
        if self.relay is None:
            raise BackendUnavailable("relay connection gone")
        return self.relay

    def introduced_relay(self) -> RelayConnection:
        """The relay, after the client has been introduced to it (once, before its first command)."""
        if self.state is SmtpState.GREETING:
            self.introduce(None, None)
        return self.connected_relay()

    def introduce(self, helo: Optional[bytes], proto: Optional[str]) -> None:
        """Tell the relay who the client really is (XCLIENT), before the client's first command reaches it."""
        relay = self.connected_relay()
        self.state = SmtpState.RELAYING
        self.login = self.pop_before_smtp_user()
        if "XCLIENT" not in relay.keywords:
            # connect_relay accepted this relay because the PROXY protocol named the client
            if self.login:
                self.log.warning("relay %s does not offer XCLIENT: POP-before-SMTP login of %s not passed on",
                                 relay, self.login)
                self.login = None
            self.log.info("client introduced to relay %s by the PROXY protocol", relay)
            return
        offered = set(relay.keywords["XCLIENT"].upper().split())
        ip = unmapped(self.client_ip)
        attrs: List[Tuple[str, str]] = []
        # over 255 octets: [UNAVAILABLE] (xclient_commands); none yet: unknown, so that the relay
        # forgets a name from before STARTTLS (RFC 3207 4.2)
        attrs.append(("HELO", xtext(helo) if helo else "[UNAVAILABLE]"))
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
                                 "POP-before-SMTP login of %s not passed on", relay, self.login)
                self.login = None
        attrs += [("PORT", str(self.client_port)), ("DESTADDR", xtext(xclient_addr(self.server_ip).encode())),
                  ("DESTPORT", str(self.server_port)), ("NAME", self.client_name()),
                  ("ADDR", xclient_addr(self.client_ip))]
        if offered:
            if "ADDR" not in offered:
                raise HandOverRefused("%s offers XCLIENT without ADDR" % relay)
            attrs = [(k, v) for k, v in attrs if k in offered]
        for cmd in xclient_commands(attrs):
            r = relay.command(cmd.encode("ascii"))
            if r.code != 220:
                raise HandOverRefused("%s answered %s with %s" % (relay, cmd[:60], r.text()))
        self.log.info("client introduced to relay %s as %s%s", relay, ip,
                      (" login=%s" % self.login) if self.login else "")

    def pop_before_smtp_user(self) -> Optional[str]:
        if not self.cfg.PopBeforeSmtpKludgeChannel:
            return None
        rec = authservice.lookup(self.client_ip)
        return rec.user if rec is not None else None

    def client_name(self) -> str:
        """The client's verified host name for XCLIENT NAME (ClientLookup), else [UNAVAILABLE]/[TEMPUNAVAIL]."""
        return hostnames.xclient_name(self.client_ip) if self.cfg.ClientLookup else "[UNAVAILABLE]"

    def batchable(self, line: bytes) -> bool:
        """A pipelined command that can go to the relay in the same write as the one before it: one
        the table forwards, in the present state."""
        verb, _ = _split(line)
        if verb is None:
            return False
        try:
            return self.lookup(verb).handler is SmtpSession.cmd_forward
        except CommandError:
            return False

    def forward(self, req: Request) -> None:
        """Forward a command, and those the client pipelined behind it, to the relay; answer each in order."""
        relay = self.introduced_relay()
        batch = [req.line]
        while relay.pipelining and len(batch) < MAX_BATCH:
            line = self.reader.peek_line(MAX_COMMAND_LINE)
            if line is None or not self.batchable(line):
                break
            self.read_line()
            self.log_command(_split(line)[0], line)
            batch.append(line)
        relay.send(b"".join(line + b"\r\n" for line in batch))
        for line in batch:
            r = relay.reply()
            self.answer(r)
            if self.state is SmtpState.CLOSED:       # the relay said 421 and hangs up: no more replies come
                return
            verb = _split(line)[0]
            if verb == "MAIL" and r.code == 250:
                self.state, self.endings, self.message_by = SmtpState.ENVELOPE, LineEndings(), None
            elif verb == "RSET" and r.code == 250 and self.state is not SmtpState.TLS_STARTED:
                self.state = SmtpState.RELAYING       # (after STARTTLS only EHLO ends that state)

    def answer(self, r: Reply) -> None:
        """Pass a relay reply on; a 421 from the relay ends the session."""
        for line in r.lines:
            self.send(line)
        self.log.debug("R: %s", r.text())
        if r.code == 421:
            self.finish("relay closed: %s" % r.text())

    # ------------------------------------------------------------------ commands
    def cmd_forward(self, req: Request) -> None:
        """MAIL, RCPT, RSET, NOOP, VRFY, EXPN, HELP, ETRN (RFC 5321 4.1.1) and EhloKeywords verbs:
        the relay answers; pipelined ones go together."""
        self.forward(req)

    def cmd_EHLO(self, req: Request) -> None:
        """RFC 5321 4.1.1.1; the reply is the relay's, its keywords filtered."""
        self._hello(req, "ESMTP")

    def cmd_HELO(self, req: Request) -> None:
        """RFC 5321 4.1.1.1."""
        self._hello(req, "SMTP")

    def _hello(self, req: Request, proto: str) -> None:
        name = req.args[0].strip()
        if not name:
            raise ClientSyntaxError("501 5.5.4 Syntax: %s hostname" % req.verb)
        if self.state is SmtpState.GREETING:
            self.introduce(name, proto)
        relay = self.connected_relay()
        r = relay.command(req.line)
        if r.code == 250:
            self.state = SmtpState.RELAYING       # also after TLS_STARTED: the EHLO that was asked for
            if proto == "ESMTP":
                relay.learn(r)
                self.answer(Reply(250, self.filter_ehlo(r)))
            else:
                self.answer(Reply(250, [b"250 " + self.service.hostname.encode()]))
            return
        self.answer(r)

    def filter_ehlo(self, r: Reply) -> List[bytes]:
        words = [self.service.hostname.encode()]
        for line in r.lines[1:]:
            text = line[4:].strip()
            kw = text.split(b" ", 1)[0].split(b"=", 1)[0].upper().decode("ascii", "replace")
            if kw not in self.service.keywords:
                continue
            if kw == "AUTH" and self.plaintext_refused:
                mechs = [m for m in text[5:].split() if not sasl.secret_in_clear(m.upper().decode("ascii", "replace"))]
                if not mechs:
                    continue
                text = text[:5] + b" ".join(mechs)          # "AUTH " or the old "AUTH=" form
            words.append(text)
        if self.service.tls is not None and not self.tls_active:
            words.append(b"STARTTLS")
        return [b"250" + (b" " if i == len(words) - 1 else b"-") + w for i, w in enumerate(words)]

    def offered(self, keyword: str) -> bool:
        """Whether the client was offered ``keyword`` (the relay has it and the proxy passes it)."""
        relay = self.relay
        return relay is not None and keyword in relay.keywords and keyword in self.service.keywords

    def cmd_STARTTLS(self, req: Request) -> None:
        """RFC 3207; anything pipelined behind it is discarded (CVE-2011-0411)."""
        if req.args[0].strip():
            raise ClientSyntaxError("501 5.5.4 Syntax: STARTTLS")
        if self.service.tls is None:
            raise NotNow(NO_TLS)
        if self.tls_active:
            raise NotNow(TLS_ACTIVE)
        if self.authenticated:
            raise NotNow(TLS_NOT_NOW)
        self.send(TLS_GO)
        self.starttls()
        # RFC 3207 4.2: what was learnt before TLS is forgotten, and the client says EHLO again
        # (its new EHLO also replaces the name the relay heard before TLS).
        if self.state is not SmtpState.GREETING:
            self.state = SmtpState.TLS_STARTED

    def cmd_AUTH(self, req: Request) -> None:
        """RFC 4954: passed to the relay unchanged, with its challenges and the client's responses."""
        words = req.args[0].split(None, 1)
        mech = words[0].upper().decode("ascii", "replace") if words else ""
        if not SASL_MECH.fullmatch(mech):
            raise ClientSyntaxError("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        if self.plaintext_refused and sasl.secret_in_clear(mech):
            raise PrivacyRequired(NEED_TLS)
        relay = self.introduced_relay()
        r = relay.command(req.line)
        while r.code == 334:
            self.answer(r)
            try:
                response = self.read_line()
            except ClientError:
                try:
                    relay.command(b"*")          # cancel (RFC 4954 4) before the client is told why
                except MMProxyError:
                    pass
                raise
            self.log.debug("C: ********")
            r = relay.command(response)
        self.bad_guys(failed=r.code == 535, forgive=r.code == 235)    # every final answer waits alike
        self.answer(r)
        if r.code == 235:
            self.authenticated = True
            self.log.info("authenticated at relay %s", relay)

    def cmd_DATA(self, req: Request) -> None:
        """RFC 5321 4.1.1.4: the text is streamed line by line, checked for bare CR/LF (SMTP smuggling)."""
        relay = self.introduced_relay()
        r = relay.command(req.line, DATA_INIT_TIMEOUT)
        self.answer(r)
        if r.code != 354:
            return
        self.state = SmtpState.DATA
        out = bytearray()
        self.message_deadline()
        lines = 0
        while True:
            lines += 1
            if lines % YIELD_LINES == 0:
                gevent.idle()                     # a fast client must not starve the other sessions
            piece = self.reader.read_raw(MAX_DATA_LINE)
            if not piece.endswith(b"\n"):
                return self.refuse_message(DATA_LINE_TOO_LONG, "line over %d octets" % MAX_DATA_LINE)
            if not piece.endswith(b"\r\n") or b"\r" in piece[:-2]:
                return self.refuse_message(BARE_EOL, "bare CR or LF in the message")
            if piece == b".\r\n":
                break
            out += piece
            if len(out) >= DATA_CHUNK:
                relay.send(bytes(out), DATA_BLOCK_TIMEOUT)
                out.clear()
        relay.send(bytes(out) + b".\r\n", DATA_BLOCK_TIMEOUT)
        self.message_done(relay.reply(DATA_END_TIMEOUT))

    def message_deadline(self) -> None:
        """Reads of message text: Timeout idle seconds each, and the whole text of the message (all
        its BDAT chunks) within SmtpMessageTimeout of the first read."""
        limit = float(self.cfg.SmtpMessageTimeout)
        if self.message_by is None:
            self.message_by = time.monotonic() + limit
        self.reader.idle = float(self.cfg.Timeout)
        self.reader.set_deadline(limit, "the message text", self.message_by)

    def message_done(self, r: Reply) -> None:
        """The relay's answer to a whole message (end of DATA, BDAT LAST)."""
        self.message_by = None
        self.answer(r)
        if self.state is not SmtpState.CLOSED:
            self.state = SmtpState.RELAYING
        if r.code // 100 == 2:
            self.messages += 1
            self.log.info("message relayed: %s", r.text())
        else:
            self.log.info("message refused by relay: %s", r.text())

    def cmd_BDAT(self, req: Request) -> None:
        """RFC 3030 chunks, when the relay offers CHUNKING: read by size (never as commands), checked
        for bare CR/LF across chunks, streamed to the relay.  Not offered: the chunk is skipped, 502."""
        m = BDAT_ARGS.fullmatch(req.args[0])
        if m is None:
            self.send(BAD_BDAT)          # nobody can tell where the chunk ends: hang up
            self.send(BDAT_LOST)
            self.finish("BDAT without a chunk size")
            return
        size, last = int(m.group(1)), bool(m.group(2))
        if not self.offered("CHUNKING"):
            self.reader.discard(size)
            raise UnknownCommand(NO_BDAT)
        if self.state is SmtpState.TLS_STARTED:
            self.reader.discard(size)
            raise NotNow(EHLO_FIRST)
        relay = self.introduced_relay()
        relay.send(b"BDAT %d%s\r\n" % (size, b" LAST" if last else b""), DATA_BLOCK_TIMEOUT)
        self.state = SmtpState.DATA
        self.message_deadline()
        left = size
        while left:
            piece = self.reader.read_some(min(left, DATA_CHUNK))
            left -= len(piece)
            if not self.endings.feed(piece):
                return self.refuse_message(BARE_EOL, "bare CR or LF in a BDAT chunk")
            relay.send(piece, DATA_BLOCK_TIMEOUT)
            gevent.idle()
        if last and not self.endings.complete():
            return self.refuse_message(BARE_EOL, "a bare CR at the end of the message")
        if last:
            return self.message_done(relay.reply(DATA_END_TIMEOUT))
        r = relay.reply(REPLY_TIMEOUT)
        self.answer(r)
        if self.state is SmtpState.DATA and r.code // 100 != 2:
            self.state = SmtpState.RELAYING          # the relay has dropped the transaction
        elif self.state is SmtpState.DATA:
            self.state = SmtpState.ENVELOPE

    def refuse_message(self, reply: str, why: str) -> None:
        """Drop the relay (it discards an unfinished message), refuse the message, then ``421`` for
        whatever the client sends next, and hang up."""
        self.log.warning("message refused: %s; relay connection dropped, nothing delivered", why)
        self.close_relay()
        self.send(reply)
        self.send(AFTER_REFUSAL)
        self.finish("message refused: %s" % why)

    def cmd_XCLIENT(self, req: Request) -> None:
        """Postfix XCLIENT and XFORWARD: the proxy speaks for the client; the client never does."""
        self.log.warning("client tried %s", req.verb)
        raise NotNow(NOT_PROXIED)

    def cmd_QUIT(self, req: Request) -> None:
        """RFC 5321 4.1.1.10."""
        if self.relay is not None:
            try:
                self.relay.command(b"QUIT", QUIT_TIMEOUT)
            except MMProxyError:
                pass
        self.send(BYE)
        self.finish("quit")

    COMMANDS = {
        "EHLO": Verb(cmd_EHLO, _ANY, (0, -1)),
        "HELO": Verb(cmd_HELO, _ANY, (0, -1)),
        "STARTTLS": Verb(cmd_STARTTLS, _OUTSIDE_MAIL | {SmtpState.TLS_STARTED}, (0, -1), not_now=TLS_NOT_NOW),
        "AUTH": Verb(cmd_AUTH, _OUTSIDE_MAIL, (0, -1), not_now=AUTH_NOT_NOW),
        "DATA": Verb(cmd_DATA, frozenset({SmtpState.ENVELOPE}), (0, -1), not_now=DATA_NOT_NOW),
        "BDAT": Verb(cmd_BDAT, _ANY, (0, -1)),          # always: its chunk must be read, whatever the answer
        "XCLIENT": Verb(cmd_XCLIENT, _ANY, (0, -1)),
        "XFORWARD": Verb(cmd_XCLIENT, _ANY, (0, -1)),
        "QUIT": Verb(cmd_QUIT, _ANY, (0, -1)),
        **dict.fromkeys(FORWARDED_VERBS, Verb(cmd_forward, _COMMAND_STATES, (0, -1), not_now=EHLO_FIRST)),
        **dict.fromkeys(("NOOP", "RSET"), Verb(cmd_forward, _ANY, (0, -1))),
    }




class SmtpService(Service):
    kind = "smtp"
    session_class = SmtpSession

    def __init__(self, entry: object, previous: Optional[Service] = None) -> None:
        super().__init__(entry, previous)
        self.hostname = socket.gethostname() or "localhost"
        self.turn = 0                                   # round-robin position
        self.avoid: Dict[Tuple[str, int], float] = {}   # relay -> monotonic time it is tried again
        self._relay_tls: Optional[ssl.SSLContext] = None
        listed = {k.upper() for k in self.cfg.EhloKeywords or ()}
        ignored = listed & NEVER_PASSED
        if ignored:
            self.log.warning("EhloKeywords %s ignored: the proxy never passes them to clients",
                             " ".join(sorted(ignored)))
        self.keywords = (set(SUPPORTED_KEYWORDS) | listed) - NEVER_PASSED
        # listed keywords that are commands (TURN, ATRN, ...) are forwarded like the base verbs
        extra_verbs = {k for k in listed - NEVER_PASSED if re.fullmatch(r"[A-Z][A-Z0-9]*", k)} - set(self.commands)
        forward = self.commands["MAIL"]                 # the row of every forwarded verb
        self.commands = {**self.commands, **dict.fromkeys(extra_verbs, forward)}

    def counts_failures(self) -> bool:
        return bool(self.cfg.SmtpBadGuys)

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
            self._relay_tls = tls.client_context(self.cfg)
        return self._relay_tls


# ---------------------------------------------------------------------- helpers
def _split(line: bytes) -> Tuple[Optional[str], bytes]:
    """(VERB, argument) of a command line; VERB None when the line is not a command (or holds CR/NUL)."""
    verb, _, arg = line.partition(b" ")
    if not VERB.fullmatch(verb) or b"\r" in line or b"\0" in line:
        return None, b""
    return verb.decode("ascii").upper(), arg


def _masked(verb: Optional[str], line: bytes) -> str:
    """A command line for the log: AUTH arguments never appear."""
    if verb == "AUTH":
        words = line.split(None, 2)[1:2]
        mech = words[0].decode("ascii", "replace").upper() if words else ""
        return "AUTH %s ********" % (mech if SASL_MECH.fullmatch(mech) else "?")
    return repr(line[:200])[2:-1]
