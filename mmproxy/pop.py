"""POP3 (RFC 1939, 2449, 5034) before login, the login replay to the store, store-down spoofing.

Replies carry RFC 2449/3206 response codes: ``[AUTH]`` for bad credentials, ``[SYS/TEMP]`` for
directory or store trouble; a store's reply with a code of its own (``[IN-USE]``) passes through
unchanged, and so does a bare refusal of a password the proxy had already verified (PreAuth).

XQUERYAUTH (AuthService yes, best per virtual domain): ``XQUERYAUTH <ip>`` answers
``+OK <user> <unix time of the login>`` when a verified POP login from that address is fresher
than AuthServiceTTL, ``-ERR [AUTH] No login from <ip>`` when not, and ``-ERR XQUERYAUTH is not
enabled`` unless AuthService is on for the address the client connected to.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import List, Optional, Tuple

from mmproxy import __version__, authservice, sasl
from mmproxy.addresses import unmapped
from mmproxy.backend import Store
from mmproxy.errors import (
    AccessDenied,
    AuthFailed,
    AuthTempFail,
    AuthzFailed,
    BackendError,
    BackendProtocolError,
    BackendUnavailable,
    ClientSyntaxError,
    ClientTimeout,
    ClientTooLong,
    CommandError,
    ConfigError,
    NotNow,
    PrivacyRequired,
    ServerShutdown,
    StoreRefused,
    UnknownCommand,
)
from mmproxy.login import LoginService, LoginSession, Target, credentials
from mmproxy.session import Line, Request, Service, State, Verb, one_line

MAX_COMMAND = 255            # RFC 2449 section 4: a command line, CRLF included

ERR_AUTH = "-ERR [AUTH] Authentication failed."
ERR_AUTHZ = "-ERR [AUTH] Authorization identity differs from authentication identity"
ERR_TEMP = "-ERR [SYS/TEMP] Temporary authentication failure, try again later"
ERR_STORE = "-ERR [SYS/TEMP] Mail store not available, try again later"
ERR_INTERNAL = "-ERR [SYS/TEMP] Internal error, closing connection"
ERR_PRIVACY = "-ERR [AUTH] Plaintext authentication is disallowed without TLS"
ERR_TOO_LONG = "-ERR Line too long, closing connection"
ERR_IDLE = "-ERR Disconnected for inactivity."
ERR_DEADLINE = "-ERR Time limit for login exceeded"
ERR_NOT_NOW = "Command not valid before login"
ERR_TOO_MANY = "-ERR Too many errors, closing connection"
ERR_AUTH_FAILURES = "-ERR [AUTH] Too many authentication failures, closing connection"
ERR_SHUTDOWN = "-ERR [SYS/TEMP] Server shutting down"
ERR_KICK = "-ERR Disconnected by the administrator."       # mmproxy kick
TOO_MANY_CONNECTIONS = "-ERR [SYS/TEMP] Too many connections from your address"
ACCESS_DENIED = "-ERR [SYS/PERM] Access denied"
ERR_ACCESS = ACCESS_DENIED
NO_SUCH_MESSAGE = "No such message"

# What the proxy says in CAPA (RFC 2449); the login part only before login.
CAPABILITIES = ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING")


class PopState(State):
    AUTHORIZATION = "authorization"
    USER_GIVEN = "authorization, USER given"
    AUTHENTICATING = "authenticating"
    SPOOFED = "spoofed transaction"
    RELAYING = "relaying"
    CLOSED = "closed"


class Spool:
    """The spoofed maildrop shown while the store is down: empty, or the SpoofMessageFile message."""

    def __init__(self, message: Optional[bytes]) -> None:
        self.message = message
        self.uid = "spoof-" + hashlib.sha1(message).hexdigest()[:16] if message else ""

    @classmethod
    def from_file(cls, path: str) -> "Spool":
        """RFC 822 text ending in a '.' line: drop the terminator, CRLF line ends."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ConfigError("SpoofMessageFile %s: %s" % (path, e.strerror)) from None
        lines: List[bytes] = []
        for line in raw.splitlines():
            if line == b".":
                break
            lines.append(line)
        return cls(b"".join(line + b"\r\n" for line in lines))


class PopService(LoginService):
    kind = "pop"

    def __init__(self, entry: object, previous: Optional[Service] = None) -> None:
        super().__init__(entry, previous)
        cfg = self.cfg
        self.spool: Optional[Spool] = None
        if cfg.SpoofEmptyMailbox:
            self.spool = Spool(None)             # overrides SpoofMessageFile, as the legacy product did
        elif cfg.SpoofMessageFile:
            self.spool = Spool.from_file(cfg.SpoofMessageFile)


_LOGIN = frozenset({PopState.AUTHORIZATION, PopState.USER_GIVEN})
_SPOOF = frozenset({PopState.SPOOFED})


class PopSession(LoginSession):
    kind = "pop"
    max_line = MAX_COMMAND
    INITIAL = LOGIN_STATE = PopState.AUTHORIZATION
    NOT_NOW_IN = {PopState.SPOOFED: "Command not valid in this state"}   # not PASS's "USER first"
    AUTHENTICATING = PopState.AUTHENTICATING
    RELAYING = PopState.RELAYING
    CLOSED = PopState.CLOSED
    BYE_TOO_MANY = ERR_TOO_MANY
    BYE_AUTH_FAILURES = ERR_AUTH_FAILURES
    TOO_MANY_CONNECTIONS = TOO_MANY_CONNECTIONS
    ACCESS_DENIED = ACCESS_DENIED
    INTERNAL_ERROR = ERR_INTERNAL
    GOODBYES = {"idle": ERR_IDLE.encode() + b"\r\n", "shutdown": ERR_SHUTDOWN.encode() + b"\r\n",
                "kick": ERR_KICK.encode() + b"\r\n"}
    service: PopService

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.pending_user = b""
        self.timestamp = b"<%d.%d@mmproxy>" % (os.getpid(), time.time_ns() // 1000)
        self.deleted = False                     # the spoofed message, marked by DELE

    def greet(self) -> None:
        banner = one_line(self.cfg.Banner) or "mmproxy %s POP3 proxy ready" % __version__
        self.send("+OK %s%s" % (banner, (" " + self.timestamp.decode()) if self.cfg.CRAMs else ""))

    def read_request(self) -> Request:
        """One command line: a verb and its blank-separated arguments (RFC 1939 section 3)."""
        line = self.reader.readline()
        verb, _, rest = line.partition(b" ")
        return Request(verb.decode("ascii", "replace").upper(), rest.split(), line)

    def reply_for(self, e: BaseException) -> Tuple[List[Line], bool]:
        """The one place where the failure taxonomy becomes POP3 replies: (lines, end?)."""
        if isinstance(e, ClientTimeout):
            return [ERR_DEADLINE if e.phase else ERR_IDLE], True
        if isinstance(e, ClientTooLong):
            return (["-ERR %s" % e], False) if e.recoverable else ([ERR_TOO_LONG], True)
        if isinstance(e, PrivacyRequired):
            return [ERR_PRIVACY], False
        if isinstance(e, CommandError):
            return ["-ERR " + e.reply], False
        if isinstance(e, AuthFailed):
            return [ERR_AUTH], False
        if isinstance(e, AuthzFailed):
            return [ERR_AUTHZ], False
        if isinstance(e, AccessDenied):
            return [ERR_ACCESS], False
        if isinstance(e, StoreRefused):
            return [e.reply], False
        if isinstance(e, AuthTempFail):
            return [ERR_TEMP], False
        if isinstance(e, BackendError):
            return [ERR_STORE], False
        if isinstance(e, ServerShutdown):
            return [ERR_SHUTDOWN], True
        return [ERR_INTERNAL], True

    def capabilities(self) -> List[str]:
        """RFC 2449 CAPA; the login capabilities only while logging in."""
        caps = list(CAPABILITIES)
        if self.state in _LOGIN:
            if self.mechanisms():
                caps.append("SASL " + " ".join(self.mechanisms()))
            if not self.plaintext_refused:
                caps.append("USER")
            if self.service.tls is not None and not self.tls_active:
                caps.append("STLS")
        return caps + ["IMPLEMENTATION mmproxy"]

    # ------------------------------------------------------------------ commands before login
    def cmd_CAPA(self, req: Request) -> None:
        """RFC 2449 section 5."""
        self.send("+OK Capability list follows")
        for c in self.capabilities():
            self.send(c)
        self.send(".")

    def cmd_QUIT(self, req: Request) -> None:
        """RFC 1939 sections 5 and 6 (nothing is ever deleted by the proxy)."""
        self.send("+OK Bye")
        self.finish("quit")

    def cmd_STLS(self, req: Request) -> None:
        """RFC 2595 section 4; anything pipelined behind it is discarded."""
        if self.service.tls is None or self.tls_active:
            raise NotNow("STLS not available")
        self.send("+OK Begin TLS negotiation")
        self.state, self.pending_user = PopState.AUTHORIZATION, b""
        self.starttls()

    def cmd_USER(self, req: Request) -> None:
        """RFC 1939 section 7: the name is the rest of the line."""
        if self.plaintext_refused:
            raise PrivacyRequired("Plaintext authentication is disallowed without TLS")
        self.pending_user = req.line.partition(b" ")[2]
        self.state = PopState.USER_GIVEN
        self.send("+OK")

    def cmd_PASS(self, req: Request) -> None:
        """RFC 1939 section 7: the password is the rest of the line, blanks included."""
        user, self.pending_user = self.pending_user, b""
        self.state = PopState.AUTHORIZATION
        self.login(credentials(user, req.line.partition(b" ")[2]))

    def cmd_APOP(self, req: Request) -> None:
        """RFC 1939 section 7: needs CRAMs and a clear-text userPassword readable with BindDN."""
        if not self.cfg.CRAMs:
            raise UnknownCommand("Unknown command")
        user, digest = req.args[0], req.args[1].decode("ascii", "replace").lower()
        if len(digest) != 32:
            raise ClientSyntaxError("Syntax: APOP name digest")
        self.login(credentials(user, verify=lambda target: self.verify_challenge(
            target, lambda secret: sasl.apop_digest(self.timestamp, secret), digest)))

    def cmd_AUTH(self, req: Request) -> None:
        """RFC 5034 (PLAIN, LOGIN, CRAM-MD5, EXTERNAL with a client certificate); without a mechanism,
        the list of them (RFC 1734 style)."""
        if not req.args:
            self.send("+OK")
            for m in self.mechanisms():
                self.send(m)
            self.send(".")
            return
        self.login(self.sasl(req.args[0], req.args[1] if len(req.args) > 1 else None))

    def cmd_XQUERYAUTH(self, req: Request) -> None:
        """MMP extension: who logged in over POP from this address (POP before SMTP)."""
        if not self.cfg.AuthService:
            raise NotNow("XQUERYAUTH is not enabled")
        try:
            ip = str(unmapped(req.args[0].decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            raise ClientSyntaxError("XQUERYAUTH needs an IP address") from None
        rec = authservice.lookup(ip)
        if rec is None:
            self.send("-ERR [AUTH] No login from %s" % ip)
        else:
            self.send("+OK %s %d" % (rec.user, int(rec.when)))

    # ------------------------------------------------------------------ the spoofed maildrop
    # A consistent maildrop of zero or one message while the store is down; nothing is deleted anywhere.
    def _message(self, number: Optional[bytes] = None) -> Optional[bytes]:
        """The spoofed message, if it is there (and is ``number`` when one is given)."""
        msg = self.service.spool.message if self.service.spool else None
        if msg is None or self.deleted or (number is not None and number != b"1"):
            return None
        return msg

    def _no_such_message(self) -> None:
        self.send("-ERR " + NO_SUCH_MESSAGE)         # an ordinary answer, not a bad command

    def cmd_STAT(self, req: Request) -> None:
        """RFC 1939 section 5."""
        msg = self._message()
        self.send("+OK 1 %d" % len(msg) if msg is not None else "+OK 0 0")

    def _listing(self, req: Request, value: object) -> None:
        msg = self._message(req.args[0] if req.args else None)
        if req.args:
            if msg is None:
                return self._no_such_message()
            self.send("+OK 1 %s" % value)
            return
        self.send("+OK")
        if msg is not None:
            self.send("1 %s" % value)
        self.send(".")

    def cmd_LIST(self, req: Request) -> None:
        """RFC 1939 section 5."""
        msg = self.service.spool.message if self.service.spool else None
        self._listing(req, len(msg or b""))

    def cmd_UIDL(self, req: Request) -> None:
        """RFC 1939 section 7."""
        self._listing(req, self.service.spool.uid if self.service.spool else "")

    def cmd_RETR(self, req: Request) -> None:
        """RFC 1939 section 5."""
        msg = self._message(req.args[0])
        if msg is None:
            return self._no_such_message()
        self._send_text(msg, msg)

    def cmd_TOP(self, req: Request) -> None:
        """RFC 1939 section 7."""
        if not req.args[1].isdigit():
            raise ClientSyntaxError("Syntax: TOP msg n")
        msg = self._message(req.args[0])
        if msg is None:
            return self._no_such_message()
        self._send_text(msg, _top(msg, int(req.args[1])))

    def _send_text(self, msg: bytes, text: bytes) -> None:
        self.send("+OK %d octets" % len(msg))
        for line in text.split(b"\r\n")[:-1]:
            self.send(b"." + line if line.startswith(b".") else line)
        self.send(".")

    def cmd_DELE(self, req: Request) -> None:
        """RFC 1939 section 5 (only marked: nothing is deleted anywhere)."""
        if self._message(req.args[0]) is None:
            return self._no_such_message()
        self.deleted = True
        self.send("+OK Message deleted")

    def cmd_RSET(self, req: Request) -> None:
        """RFC 1939 section 5."""
        self.deleted = False
        self.send("+OK")

    def cmd_NOOP(self, req: Request) -> None:
        """RFC 1939 section 5."""
        self.send("+OK")

    COMMANDS = {
        "CAPA": Verb(cmd_CAPA, _LOGIN | _SPOOF),
        "QUIT": Verb(cmd_QUIT, _LOGIN | _SPOOF),
        "STLS": Verb(cmd_STLS, _LOGIN),
        "USER": Verb(cmd_USER, _LOGIN, (1, -1), "USER name"),
        "PASS": Verb(cmd_PASS, frozenset({PopState.USER_GIVEN}), (1, -1), "PASS password", not_now="USER first"),
        "APOP": Verb(cmd_APOP, _LOGIN, (2, 2), "APOP name digest"),
        "AUTH": Verb(cmd_AUTH, _LOGIN, (0, 2), "AUTH mechanism [initial-response]"),
        "XQUERYAUTH": Verb(cmd_XQUERYAUTH, _LOGIN, (1, 1), "XQUERYAUTH address"),
        "STAT": Verb(cmd_STAT, _SPOOF, not_now=ERR_NOT_NOW),
        "LIST": Verb(cmd_LIST, _SPOOF, (0, 1), "LIST [msg]", not_now=ERR_NOT_NOW),
        "UIDL": Verb(cmd_UIDL, _SPOOF, (0, 1), "UIDL [msg]", not_now=ERR_NOT_NOW),
        "RETR": Verb(cmd_RETR, _SPOOF, (1, 1), "RETR msg", not_now=ERR_NOT_NOW),
        "TOP": Verb(cmd_TOP, _SPOOF, (2, 2), "TOP msg n", not_now=ERR_NOT_NOW),
        "DELE": Verb(cmd_DELE, _SPOOF, (1, 1), "DELE msg", not_now=ERR_NOT_NOW),
        "RSET": Verb(cmd_RSET, _SPOOF, not_now=ERR_NOT_NOW),
        "NOOP": Verb(cmd_NOOP, _SPOOF, not_now=ERR_NOT_NOW),
        "LAST": Verb(None, frozenset(), not_now=ERR_NOT_NOW),
    }

    # ------------------------------------------------------------------ the login
    def logged_in(self, target: Target) -> None:
        """POP before SMTP: a verified login (directory or store) is recorded for AuthServiceTTL."""
        authservice.record(self.client_ip, target.login.canonical, target.cfg.AuthServiceTTL)

    def enter_store(self, target: Target, password: bytes, verified: bool) -> None:
        """As for every protocol, but a store that cannot be reached shows the spoofed maildrop
        when SpoofEmptyMailbox or SpoofMessageFile is set."""
        try:
            super().enter_store(target, password, verified)
        except BackendError as e:
            if self.service.spool is None:
                raise
            self.log.warning("store %s down for %s (%s): showing a spoofed mailbox", target, target.login.canonical, e)
            self.state, self.deleted = PopState.SPOOFED, False
            self.reader.idle = float(target.cfg.Timeout)     # logged in, as far as the client knows
            self.reader.set_deadline(None)
            self.send("+OK Maildrop ready")

    def replay(self, store: Store, target: Target, password: bytes, verified: bool) -> Line:
        """Tell the store the real client (XCLIENT when offered), replay USER/PASS."""
        greeting = store.readline()
        if not greeting.startswith(b"+OK"):
            raise BackendUnavailable("%s greeted with %r" % (store, greeting[:80]))
        if b"[XCLIENT]" in greeting.upper():
            # Dovecot names XCLIENT in its greeting (not in CAPA), and it pipelines: no CAPA round trip.
            caps = {b"XCLIENT", b"PIPELINING"}
        else:
            caps = set()
            store.send(b"CAPA\r\n")
            if store.readline().startswith(b"+OK"):
                while True:
                    line = store.readline()
                    if line == b".":
                        break
                    caps.add(line.split(b" ", 1)[0].upper())
        user = target.replay.encode("utf-8")
        if b"\r" in user or b"\n" in user:
            raise AuthFailed("line break in the login id replayed to the store")
        first = []
        if b"XCLIENT" in caps:
            first.append(b"XCLIENT ADDR=%s PORT=%d\r\n" % (self.client_ip.encode(), self.client_port))
        if self.store_admin is not None:
            # a certificate login: StoreAdmin logs in on the user's behalf (RFC 5034 initial response)
            pass_line = [b"AUTH PLAIN " + self.proxy_plain(target) + b"\r\n"]
        else:
            first.append(b"USER " + user + b"\r\n")
            # XCLIENT and USER go together when the store pipelines; PASS always alone: Dovecot holds a
            # PASS that arrives pipelined behind USER for 40 ms before it authenticates.
            pass_line = [b"PASS " + password + b"\r\n"]
        if not first:
            first, pass_line = pass_line, []
        batches = [first, pass_line] if b"PIPELINING" in caps else [[c] for c in first] + [pass_line]
        replies: List[bytes] = []
        for batch in filter(None, batches):
            store.send(b"".join(batch))
            replies += [store.readline() for _ in batch]
            if b"XCLIENT" in caps and not replies[0].startswith(b"+OK"):
                # never log in from the proxy's own address instead of the client's
                raise BackendProtocolError("%s refused XCLIENT: %r" % (store, replies[0][:80]))
            if not replies[-1].startswith(b"+OK"):
                break
        final = replies[-1]
        if final.startswith(b"+OK"):
            return final
        if not final.startswith(b"-ERR"):
            raise BackendProtocolError("%s answered PASS with %r" % (store, final[:80]))
        raise store_refusal(final, verified)


def store_refusal(reply: bytes, verified: bool) -> StoreRefused:
    """A store's ``-ERR`` to PASS as the client gets it, and whether it is a failed login.

    A reply with a response code (RFC 2449/3206: ``[IN-USE]``, ``[SYS/TEMP]``, ``[AUTH]``) passes
    unchanged, and so does a bare one when the proxy had verified the password (the store refuses
    for another reason: a locked mailbox).  A bare ``-ERR`` to a password nobody verified is a
    refusal of the credentials, said as ``-ERR [AUTH]``.  Only a refusal of credentials the proxy did
    not verify counts as a failed login.
    """
    code = reply[6:].split(b"]", 1)[0].upper() if reply.startswith(b"-ERR [") else None
    if code is None and not verified:
        reply = b"-ERR [AUTH]" + reply[4:]
    return StoreRefused(reply, not verified and code in (None, b"AUTH"))


def _top(msg: bytes, n: int) -> bytes:
    head, sep, body = msg.partition(b"\r\n\r\n")
    lines = body.split(b"\r\n")[:-1] if body else []
    return head + sep + b"".join(line + b"\r\n" for line in lines[:n]) if sep else msg


PopService.session_class = PopSession
