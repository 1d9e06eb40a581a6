"""IMAP4 (RFC 3501 / 9051) before login, the login replay to the store, then the pump.

Before login the proxy answers CAPABILITY, NOOP, ID, STARTTLS and LOGOUT itself and takes LOGIN
and AUTHENTICATE (PLAIN, LOGIN, CRAM-MD5 with CRAMs; SASL-IR); the verbs that need a login are known
(``BAD Command not valid before login``), everything else is unknown.  Whenever a command's tag can
be read, its completion is tagged.

Limits sit on what can grow, sized so that every RFC-legal pre-login command fits (an RFC 2971 ID
of 30 pairs with 1024-octet values is about 32 KB on one line): a line, a string (quoted or
literal), the number of arguments, the whole command.  An over-limit command gets one
``BAD [TOOBIG]`` and a clean close; a synchronizing literal that is too big is refused before the
client sends it, and the session goes on.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple, Union

from mmproxy import __version__, sasl
from mmproxy.backend import Store
from mmproxy.errors import (
    AccessDenied,
    AuthFailed,
    AuthTempFail,
    AuthzFailed,
    BackendError,
    BackendProtocolError,
    BackendUnavailable,
    ClientError,
    ClientSyntaxError,
    ClientTimeout,
    ClientTooLong,
    CommandError,
    MechanismUnsupported,
    NotNow,
    PrivacyRequired,
    ServerShutdown,
    StoreRefused,
    UnknownCommand,
)
from mmproxy.login import LoginService, LoginSession, Target, credentials
from mmproxy.session import Line, Request, Service, State, Verb, one_line

MAX_LINE = 65536            # one line of a command (Dovecot's imap_max_line_length is 64k too)
MAX_COMMAND = 65536         # a command with all its lines and literals
MAX_STRING = 8192           # one atom, quoted string or literal (a user name, a password, an ID value)
MAX_NONSYNC_LITERAL = 4096  # RFC 7888 LITERAL-
MAX_ARGS = 256              # arguments, list members included (an ID of 30 pairs has 62)
MAX_DEPTH = 4               # nested parentheses

TAG = re.compile(rb"[\x21-\x7e]+")            # RFC 9051 sets no length; the line limit bounds it
_TAG_SPECIALS = re.compile(rb'[(){%*"\\+]')
VERB = re.compile(rb"[A-Za-z]{1,32}")
LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}\Z")     # RFC 9051 number: 1*DIGIT, leading zeros allowed
# one token: "(", ")", the opening quote of a quoted string, an atom, or any other octet (an error)
_TOKEN = re.compile(rb' *(?:(\()|(\))|(")|([^ ()"\x00-\x1f\x7f]+)|(.))', re.S)

# Replies, as constants the tests import too.
BAD_UNKNOWN = "Unknown command"
BAD_NOT_NOW = "Command not valid before login"
BAD_UNTAGGED = "* BAD Error in IMAP command received by server"
NO_AUTH = "NO [AUTHENTICATIONFAILED] Authentication failed."
NO_AUTHZ = "NO [AUTHORIZATIONFAILED] Authorization identity differs from authentication identity"
NO_TEMP = "NO [UNAVAILABLE] Temporary authentication failure, try again later"
NO_STORE = "NO [UNAVAILABLE] Mail store not available, try again later"
NO_INTERNAL = "NO [UNAVAILABLE] Internal error, try again later"
NO_PRIVACY = "NO [PRIVACYREQUIRED] Plaintext authentication is disallowed without TLS"
NO_MECHANISM = "NO [CANNOT] Unsupported authentication mechanism"
BYE_TOO_MANY = "* BYE Too many invalid commands"
BYE_AUTH_FAILURES = "* BYE Too many authentication failures"
BYE_TOO_BIG = "* BYE Command too long, closing connection"
BYE_IDLE = "* BYE Disconnected for inactivity."
BYE_DEADLINE = "* BYE Time limit for login exceeded"
BYE_SHUTDOWN = "* BYE [UNAVAILABLE] Server shutting down"
BYE_KICK = "* BYE Disconnected by the administrator."      # mmproxy kick (Dovecot's: "Kicked by admin")
BYE_INTERNAL = "* BYE [UNAVAILABLE] Internal error, closing connection"
BYE_LOGOUT = "* BYE Logging out"
TOO_MANY_CONNECTIONS = "* BYE [UNAVAILABLE] Too many connections from your address"
ACCESS_DENIED = "* BYE Access denied"
NO_ACCESS = "NO [CONTACTADMIN] Access denied"

# Capabilities the proxy decides itself before login, whatever the Capability parameter says
# (it supplies the rest, e.g. IMAP4rev1 IMAP4rev2; after login the store's own list is passed on).
OWN_CAPABILITIES = frozenset({"LITERAL-", "LITERAL+", "SASL-IR", "ID", "STARTTLS", "LOGINDISABLED"})

Arg = Union[bytes, List[Any]]     # an atom or string (bytes), or a parenthesised list


class ImapState(State):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATING = "authenticating"
    RELAYING = "relaying"
    LOGOUT = "logout"


_PRE = frozenset({ImapState.NOT_AUTHENTICATED})
_AUTH = frozenset({ImapState.RELAYING})


class ArgParser:
    """The arguments of one command (RFC 9051 section 4) as they arrive: line segments and literals.

    Atoms and strings are ``bytes``, parenthesised lists are lists.  A quoted string may escape
    only ``\\`` and ``"`` and cannot span lines.  ClientSyntaxError for what does not parse,
    ClientTooLong past MAX_STRING, MAX_ARGS or MAX_DEPTH.
    """

    def __init__(self) -> None:
        self.stack: List[List[Arg]] = [[]]
        self.count = 0
        self.lists = False

    def _add(self, value: Arg) -> None:
        self.count += 1
        if self.count > MAX_ARGS:
            raise ClientTooLong("Too many arguments")
        self.stack[-1].append(value)

    def feed(self, text: bytes) -> None:
        """A piece of a command line (between literals)."""
        pos, n = 0, len(text)
        while pos < n:
            m = _TOKEN.match(text, pos)
            assert m is not None        # the last alternative matches any byte
            pos = m.end()
            opened, closed, quote, atom, bad = m.groups()
            if opened:
                if len(self.stack) > MAX_DEPTH:
                    raise ClientTooLong("Lists nested too deep")
                inner: List[Arg] = []
                self._add(inner)
                self.lists = True
                self.stack.append(inner)
            elif closed:
                if len(self.stack) == 1:
                    raise ClientSyntaxError("Unexpected ')'")
                self.stack.pop()
            elif quote:
                value, pos = _quoted(text, pos)
                self._add(value)
            elif atom:
                if len(atom) > MAX_STRING:
                    raise ClientTooLong("Argument too long")
                self._add(atom)
            elif bad and bad != b" ":
                raise ClientSyntaxError("Invalid characters in command")

    def literal(self, data: bytes) -> None:
        self._add(data)

    def finish(self) -> List[Arg]:
        if len(self.stack) != 1:
            raise ClientSyntaxError("Missing ')'")
        return self.stack[0]


def _quoted(text: bytes, start: int) -> Tuple[bytes, int]:
    """The quoted string whose content begins at ``start`` (after its opening quote): (its value,
    the position after its closing quote).  Searched with bytes operations, not octet by octet: an
    escape-heavy string costs no more than a plain one."""
    end = start
    while True:
        end = text.find(b'"', end)
        if end < 0:
            raise ClientSyntaxError("Missing '\"'")
        if _backslashes_before(text, start, end) % 2 == 0:
            break                                                # not escaped: the closing quote
        end += 1
    content = text[start:end]
    if len(content) > MAX_STRING:
        raise ClientTooLong("String too long")
    if b"\0" in content or b"\r" in content:
        raise ClientSyntaxError("Invalid characters in quoted string")      # RFC 9051: TEXT-CHAR
    if b"\\" in content:
        # escapes pair from the left: split at the escaped backslashes, then only \" may be left
        parts = [p.replace(b'\\"', b'"') for p in content.split(b"\\\\")]
        if any(b"\\" in p for p in parts):
            raise ClientSyntaxError("Only \\\\ and \\\" may be escaped in a quoted string")
        content = b"\\".join(parts)
    return content, end + 1


def _backslashes_before(text: bytes, start: int, end: int) -> int:
    """How many backslashes stand right before ``end`` (not before ``start``), in windows that
    double: a long run costs its length once, a short one almost nothing."""
    width = 64
    while True:
        low = max(start, end - width)
        window = text[low:end]
        kept = window.rstrip(b"\\")
        if kept or low == start:
            return len(window) - len(kept)
        width *= 2


def parse_args(text: bytes) -> List[Arg]:
    """The arguments of a one-line command (no literals)."""
    p = ArgParser()
    p.feed(text)
    return p.finish()


_NOT_QUOTABLE = re.compile(rb"[^\x20-\x7e]")


def quote(value: bytes) -> Optional[bytes]:
    """An IMAP quoted string, or None when the value needs a literal (8-bit, CR/LF, long)."""
    if len(value) > 1000 or _NOT_QUOTABLE.search(value):
        return None
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class ImapSession(LoginSession):
    kind = "imap"
    service: "ImapService"
    max_line = MAX_LINE
    INITIAL = LOGIN_STATE = ImapState.NOT_AUTHENTICATED
    AUTHENTICATING = ImapState.AUTHENTICATING
    RELAYING = ImapState.RELAYING
    CLOSED = ImapState.LOGOUT
    BYE_TOO_MANY = BYE_TOO_MANY
    BYE_AUTH_FAILURES = BYE_AUTH_FAILURES
    TOO_MANY_CONNECTIONS = TOO_MANY_CONNECTIONS
    ACCESS_DENIED = ACCESS_DENIED
    INTERNAL_ERROR = BYE_INTERNAL
    GOODBYES = {"idle": BYE_IDLE.encode() + b"\r\n", "shutdown": BYE_SHUTDOWN.encode() + b"\r\n",
                "kick": BYE_KICK.encode() + b"\r\n"}

    # ------------------------------------------------------------------ capabilities and greeting
    def capabilities(self) -> str:
        """What the client is told before login (made once per service and TLS state)."""
        shared = self.cfg is self.service.cfg          # no virtual-domain settings of its own
        key = (self.tls_active, self.peer_cert is not None and self.certificate_mapped)
        text = self.service.capabilities.get(key) if shared else None
        if text is None:
            text = self._capabilities()
            if shared:
                self.service.capabilities[key] = text
        return text

    def _capabilities(self) -> str:
        cfg = self.cfg
        base = [c for c in (cfg.Capability or "IMAP4rev1").split()
                if c.upper() not in OWN_CAPABILITIES and not c.upper().startswith("AUTH=")]
        caps = base + ["LITERAL-", "SASL-IR", "ID"]
        if self.service.tls is not None and not self.tls_active:
            caps.append("STARTTLS")
        if self.plaintext_refused:
            caps.append("LOGINDISABLED")
        caps += ["AUTH=" + m for m in self.mechanisms()]
        return " ".join(dict.fromkeys(caps))

    def greet(self) -> None:
        banner = one_line(self.cfg.Banner) or "mmproxy %s IMAP4rev1 proxy ready" % __version__
        self.send("* OK [CAPABILITY %s] %s" % (self.capabilities(), banner))

    # ------------------------------------------------------------------ reading commands
    def read_request(self) -> Request:
        """One command with its literals.  A ``{n}`` literal gets ``+`` only when it is within
        bounds; a command that fails to parse is still read to its end (non-synchronizing
        literals skipped) before it is answered, so nothing of it is ever taken for a command."""
        self.tag = ""
        try:
            line = self.reader.readline()
        except ClientTooLong:
            self.tag = _tag_of(bytes(self.reader.buf[:MAX_LINE]))    # answer a too-long command under its tag
            raise
        tag, _, rest = line.partition(b" ")
        if not TAG.fullmatch(tag) or _TAG_SPECIALS.search(tag):
            raise ClientSyntaxError("Error in IMAP command received by server", "no valid tag")
        self.tag = tag.decode("ascii")
        verb_raw, _, rest = rest.partition(b" ")
        if LITERAL_AT_END.search(verb_raw):
            rest, verb_raw = verb_raw, b""        # "a1 {5}": no command, a literal still to skip
        verb = verb_raw.decode("ascii", "replace").upper()
        error: Optional[ClientError] = None
        try:
            if not verb:
                raise ClientSyntaxError("Missing command")
            if not VERB.fullmatch(verb_raw):
                raise UnknownCommand("Unknown command")
            self.lookup(verb)                     # refused now: its literals are never invited
            if self.plaintext_refused and _sends_password(verb, rest):
                # refused before any literal is invited: the password is never sent in clear
                raise PrivacyRequired("Plaintext authentication is disallowed without TLS")
        except CommandError as e:
            error = e
        parser = ArgParser()
        total = len(line)
        while True:
            m = LITERAL_AT_END.search(rest)
            if error is None:
                try:
                    parser.feed(rest[:m.start()] if m else rest)
                except ClientSyntaxError as e:
                    error = e
            if m is None:
                break
            digits = m.group(1).lstrip(b"0")
            size = int(digits or b"0") if len(digits) <= 12 else MAX_COMMAND + 1   # never int() of 64 KB
            nonsync = bool(m.group(2))
            if nonsync and size > MAX_NONSYNC_LITERAL:
                raise ClientTooLong("Literal too big (LITERAL- allows %d octets)" % MAX_NONSYNC_LITERAL)
            if size > MAX_STRING or total + size > MAX_COMMAND:
                if nonsync:
                    raise ClientTooLong("Command too long")
                raise ClientTooLong("Literal too big", recoverable=True)     # no '+': the client sends nothing
            if error is not None:
                if not nonsync:
                    raise error                   # no '+': the rest of the command never comes
                self.reader.discard(size)
            else:
                if not nonsync:
                    self.send("+ Ready for literal data")
                parser.literal(self.reader.read_exact(size))
            rest = self.reader.readline()
            total += size + len(rest)
            if total > MAX_COMMAND:
                raise ClientTooLong("Command too long")
        if error is not None:
            raise error
        return Request(verb, parser.finish(), line, parser.lists)

    # ------------------------------------------------------------------ failures
    def reply_for(self, e: BaseException) -> Tuple[List[Line], bool]:
        """The one place where the failure taxonomy becomes IMAP replies: (lines, end?)."""
        tag = self.tag or "*"
        if isinstance(e, ClientTimeout):
            return [BYE_DEADLINE if e.phase else BYE_IDLE], True
        if isinstance(e, ClientTooLong):
            bad = "%s BAD [TOOBIG] %s" % (tag, e)
            return ([bad], False) if e.recoverable else ([bad, BYE_TOO_BIG], True)
        if isinstance(e, PrivacyRequired):
            return ["%s %s" % (tag, NO_PRIVACY)], False
        if isinstance(e, MechanismUnsupported):
            return ["%s %s" % (tag, NO_MECHANISM)], False
        if isinstance(e, CommandError):
            return [("%s BAD %s" % (tag, e.reply)) if self.tag else BAD_UNTAGGED], False
        if isinstance(e, AuthFailed):
            return ["%s %s" % (tag, NO_AUTH)], False
        if isinstance(e, AuthzFailed):
            return ["%s %s" % (tag, NO_AUTHZ)], False
        if isinstance(e, AccessDenied):
            return ["%s %s" % (tag, NO_ACCESS)], False
        if isinstance(e, StoreRefused):
            return [e.reply], False
        if isinstance(e, AuthTempFail):
            return ["%s %s" % (tag, NO_TEMP)], False
        if isinstance(e, BackendError):
            # One response code per response: the alert goes in an untagged OK of its own.
            return ["* OK [ALERT] " + one_line(self.cfg.ServerDownAlert), "%s %s" % (tag, NO_STORE)], False
        if isinstance(e, ServerShutdown):
            return [BYE_SHUTDOWN], True
        lines: List[Line] = ["%s %s" % (tag, NO_INTERNAL)] if self.tag else []
        return lines + [BYE_INTERNAL], True

    # ------------------------------------------------------------------ commands
    def cmd_CAPABILITY(self, req: Request) -> None:
        """RFC 9051 6.1.1."""
        self.send("* CAPABILITY " + self.capabilities())
        self.send(self.tag + " OK Capability completed")

    def cmd_NOOP(self, req: Request) -> None:
        """RFC 9051 6.1.2."""
        self.send(self.tag + " OK NOOP completed")

    def cmd_LOGOUT(self, req: Request) -> None:
        """RFC 9051 6.1.3."""
        self.send(BYE_LOGOUT)
        self.send(self.tag + " OK Logout completed")
        self.finish("logout")

    def cmd_ID(self, req: Request) -> None:
        """RFC 2971: answered by the proxy before login (the store hears about the client from us)."""
        arg = req.args[0]
        if not ((isinstance(arg, bytes) and arg.upper() == b"NIL") or (isinstance(arg, list) and len(arg) % 2 == 0
                                  and all(isinstance(a, bytes) for a in arg))):
            raise ClientSyntaxError("Syntax: ID (field value ...) or ID NIL")
        self.send('* ID ("name" "mmproxy" "version" "%s")' % __version__)
        self.send(self.tag + " OK ID completed")

    def cmd_STARTTLS(self, req: Request) -> None:
        """RFC 9051 6.2.1; anything pipelined behind it is discarded (CVE-2011-0411)."""
        if self.service.tls is None or self.tls_active:
            raise NotNow("STARTTLS not available")
        self.send(self.tag + " OK Begin TLS negotiation now")
        self.starttls()

    def cmd_LOGIN(self, req: Request) -> None:
        """RFC 9051 6.2.3 (refused in read_request while LOGINDISABLED)."""
        self.login(credentials(req.args[0], req.args[1]))

    def cmd_AUTHENTICATE(self, req: Request) -> None:
        """RFC 9051 6.2.2 with SASL PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195), EXTERNAL (RFC 4422
        appendix A: a client certificate, CertmapFile) and SASL-IR (RFC 4959)."""
        self.login(self.sasl(req.args[0], req.args[1] if len(req.args) > 1 else None))

    COMMANDS = {
        "CAPABILITY": Verb(cmd_CAPABILITY, _PRE),
        "NOOP": Verb(cmd_NOOP, _PRE),
        "LOGOUT": Verb(cmd_LOGOUT, _PRE),
        "ID": Verb(cmd_ID, _PRE, (1, 1), "ID (field value ...)", strings=False),
        "STARTTLS": Verb(cmd_STARTTLS, _PRE),
        "LOGIN": Verb(cmd_LOGIN, _PRE, (2, 2), "LOGIN user password"),
        "AUTHENTICATE": Verb(cmd_AUTHENTICATE, _PRE, (1, 2), "AUTHENTICATE mechanism [initial-response]"),
        # Served by the store after login: known, so they get a clearer answer than "unknown".
        **{v: Verb(None, _AUTH, (0, -1), strings=False, not_now=BAD_NOT_NOW) for v in (
            "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
            "STATUS", "APPEND", "CHECK", "CLOSE", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID",
            "IDLE", "NAMESPACE", "ENABLE", "GETQUOTA", "GETQUOTAROOT", "GETACL", "SETACL", "MYRIGHTS",
            "UNSELECT", "GETMETADATA", "SETMETADATA", "COMPRESS", "NOTIFY", "ESEARCH", "UNAUTHENTICATE")},
    }

    # ------------------------------------------------------------------ the login replay
    def replay(self, store: Store, target: Target, password: bytes, verified: bool) -> Line:
        """Tell the store the real client (ID, RFC 2971, as Dovecot takes it from
        login_trusted_networks), replay LOGIN; the tagged OK with the store's capabilities.
        StoreRefused with the store's NO; counts as bad credentials when it carries no response
        code or [AUTHENTICATIONFAILED]."""
        ident = ('X0 ID ("x-originating-ip" "%s" "x-originating-port" "%d" '
                 '"x-connected-ip" "%s" "x-connected-port" "%d")'
                 % (self.client_ip, self.client_port, self.server_ip, self.server_port)).encode()
        user = target.replay.encode("utf-8")
        user_q, pass_q = quote(user), quote(password)
        # Untagged lines before the ID's completion belong to the store's greeting (Dovecot may
        # send "* OK Waiting for authentication process" before its real greeting): never the
        # client's.  Those after it answer the LOGIN ([ALERT]) and are passed on.
        answered_id = False
        if self.store_admin is not None:
            # a certificate login: StoreAdmin logs in on the user's behalf (SASL-IR, RFC 4959)
            store.send(ident + b"\r\nX1 AUTHENTICATE PLAIN " + self.proxy_plain(target) + b"\r\n")
            _greeting(store)
        elif user_q is not None and pass_q is not None:
            # One round trip: the commands wait in the store's socket until it has greeted.
            store.send(ident + b"\r\nX1 LOGIN " + user_q + b" " + pass_q + b"\r\n")
            _greeting(store)
        else:
            _greeting(store)
            store.send(ident + b"\r\nX1 LOGIN ")
            for i, (value, q) in enumerate(((user, user_q), (password, pass_q))):
                if i:
                    store.send(b" ")
                if q is not None:
                    store.send(q)
                    continue
                store.send(b"{%d}\r\n" % len(value))
                answered_id |= _await_continuation(store)
                store.send(value)
            store.send(b"\r\n")
        caps: Optional[bytes] = None
        while True:
            line = store.readline()
            if line.startswith(b"X0 "):
                answered_id = True
                continue
            if line.startswith(b"* "):
                if line[2:].upper().startswith(b"CAPABILITY "):
                    caps = line[13:]
                elif answered_id and not line[2:].upper().startswith(b"ID "):
                    self.send(line)               # e.g. an [ALERT] from the store
                continue
            if line.startswith(b"X1 "):
                break
            raise BackendProtocolError("%s: unexpected line %r" % (store, line[:80]))
        status, _, rest = line[3:].partition(b" ")
        status = status.upper()
        tag = self.tag.encode()
        if status != b"OK":
            if status != b"NO":
                raise BackendProtocolError("%s answered LOGIN with %r" % (store, line[:80]))
            raise store_refusal(tag + b" NO " + rest, verified)
        if not rest.upper().startswith(b"[CAPABILITY "):
            if caps is None:
                store.send(b"X2 CAPABILITY\r\n")
                while True:
                    line = store.readline()
                    if line.upper().startswith(b"* CAPABILITY "):
                        caps = line[13:]
                    elif line.startswith(b"X2 "):
                        break
            if caps:
                rest = b"[CAPABILITY " + caps + b"] " + rest
        return tag + b" OK " + rest


def store_refusal(reply: bytes, verified: bool) -> StoreRefused:
    """A store's tagged NO to the replayed LOGIN, passed on as it is.  A failed login only when the
    proxy did not verify the password itself and the NO carries no response code or
    [AUTHENTICATIONFAILED] (after PreAuth, the store refuses for another reason)."""
    rest = reply.split(b" NO ", 1)[1] if b" NO " in reply else b""
    code = rest[1:].split(b"]", 1)[0].upper() if rest.startswith(b"[") else None
    return StoreRefused(reply, not verified and code in (None, b"AUTHENTICATIONFAILED"))


def _greeting(store: Store) -> None:
    greeting = store.readline()
    if not greeting.upper().startswith(b"* OK"):
        raise BackendUnavailable("%s greeted with %r" % (store, greeting[:80]))


def _await_continuation(store: Store) -> bool:
    """Read up to the store's "+" for a LOGIN literal; whether the ID's completion came on the way."""
    answered_id = False
    while True:
        line = store.readline()
        if line.startswith(b"+"):
            return answered_id
        answered_id |= line.startswith(b"X0 ")
        if line.startswith(b"X1 "):
            raise BackendProtocolError("%s refused the login literal: %r" % (store, line[:80]))


def _sends_password(verb: str, rest: bytes) -> bool:
    """Whether a command carries a password in clear: LOGIN, AUTHENTICATE PLAIN or LOGIN or any
    mechanism not known to keep it secret (sasl.secret_in_clear; RestrictPlainPasswords refuses
    them before TLS, RFC 9051 6.2.3 and 7.1: LOGINDISABLED)."""
    if verb == "LOGIN":
        return True
    mech = (rest.split(None, 1) or [b""])[0].strip(b'"').decode("ascii", "replace").upper()
    return verb == "AUTHENTICATE" and bool(mech) and sasl.secret_in_clear(mech)


def _tag_of(start: bytes) -> str:
    """The tag at the start of a command, if it is one ("" otherwise)."""
    tag = start.split(b" ", 1)[0] if b" " in start else b""
    return tag.decode("ascii") if TAG.fullmatch(tag) and not _TAG_SPECIALS.search(tag) else ""


class ImapService(LoginService):
    kind = "imap"
    session_class = ImapSession

    def __init__(self, entry: Any, previous: Optional[Service] = None) -> None:
        super().__init__(entry, previous)
        self.capabilities: Dict[Tuple[bool, bool], str] = {}   # (TLS active, EXTERNAL) -> the pre-login CAPABILITY
