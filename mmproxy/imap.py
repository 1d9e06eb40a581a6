"""IMAP4 (RFC 3501 / 9051) before login, the login replay to the store, then the relay."""
from __future__ import annotations

import base64
import binascii
import re
from typing import Callable, List, Optional, Tuple, Union

from mmproxy import __version__
from mmproxy.backend import Store
from mmproxy.errors import (AuthFailed, AuthTempFail, BackendProtocolError, BackendUnavailable,
                            ClientSyntaxError, ClientTooLong, MMProxyError)
from mmproxy.session import Service, Session, Target, failure_kind

MAX_LITERAL = 4096          # pre-login literals carry a user name or a password (RFC 7888 LITERAL- bound)
MAX_COMMAND = 16384         # one command with all its literals
LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}$")

# Replies, as constants the tests import too.
BAD_UNKNOWN = "BAD Unknown command"
BAD_NOT_NOW = "BAD Command not valid before login"
BAD_SYNTAX = "BAD Syntax error"
BAD_TOO_LONG = "BAD [TOOBIG] Command line too long"
NO_AUTH = "NO [AUTHENTICATIONFAILED] Authentication failed."
NO_AUTHZ = "NO [AUTHORIZATIONFAILED] Authorization identity differs from authentication identity"
NO_TEMP = "NO [UNAVAILABLE] Temporary authentication failure, try again later"
NO_STORE = "NO [UNAVAILABLE] Mail store not available, try again later"
NO_PRIVACY = "NO [PRIVACYREQUIRED] Plaintext authentication is disallowed without TLS"
BYE_TOO_MANY = "* BYE Too many errors"
BYE_SHUTDOWN = "* BYE [UNAVAILABLE] Server shutting down"
BYE_TIMEOUT = "* BYE Autologout; idle for too long"

# Commands a client may send after login only: known, so they get a clearer answer than "unknown".
AUTHENTICATED_VERBS = {
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS",
    "APPEND", "CHECK", "CLOSE", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID", "IDLE",
    "NAMESPACE", "ENABLE", "GETQUOTA", "GETQUOTAROOT", "GETACL", "SETACL", "MYRIGHTS", "UNSELECT", "GETMETADATA",
}
# Capabilities mmproxy decides itself, whatever the Capability parameter says.
MANAGED = ("STARTTLS", "LOGINDISABLED", "AUTH=", "SASL-IR", "ID", "LITERAL-", "LITERAL+")

Token = Union[bytes, str]   # bytes: atom, quoted string or literal; str: "(" or ")"


class Command:
    def __init__(self, tag: str, verb: str, args: List[Token]) -> None:
        self.tag, self.verb, self.args = tag, verb, args


class TaggedError(Exception):
    """A problem with one command, answered under its tag (or '*' before the tag is known)."""

    def __init__(self, tag: str, reply: str, fatal: bool = False) -> None:
        super().__init__(reply)
        self.tag, self.reply, self.fatal = tag, reply, fatal


def tokenize(line: bytes) -> List[Token]:
    """Split an IMAP command line into atoms, quoted strings (unescaped) and parentheses."""
    out: List[Token] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i:i + 1]
        if c == b" ":
            i += 1
        elif c in (b"(", b")"):
            out.append(c.decode())
            i += 1
        elif c == b'"':
            i += 1
            buf = bytearray()
            while True:
                if i >= n:
                    raise ClientSyntaxError("unterminated quoted string")
                c = line[i:i + 1]
                if c == b"\\":
                    if i + 1 >= n or line[i + 1:i + 2] not in (b"\\", b'"'):
                        raise ClientSyntaxError("bad escape in quoted string")
                    buf += line[i + 1:i + 2]
                    i += 2
                elif c == b'"':
                    i += 1
                    break
                else:
                    buf += c
                    i += 1
            out.append(bytes(buf))
        else:
            j = i
            while j < n and line[j:j + 1] not in (b" ", b"(", b")"):
                j += 1
            out.append(line[i:j])
            i = j
    return out


def quote(value: str) -> Optional[bytes]:
    """An IMAP quoted string, or None when the value needs a literal (8-bit, CR/LF, long)."""
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > 1000 or any(b > 0x7E or b < 0x20 for b in raw):
        return None
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class ImapSession(Session):
    proto = "imap"
    bye_auth_failures = "* BYE Too many authentication failures"
    too_many_connections = "* BYE [UNAVAILABLE] Too many connections from your address"

    # ------------------------------------------------------------------ capabilities and greeting
    def capabilities(self) -> str:
        cfg = self.cfg
        base = [c for c in cfg.Capability.split() if not c.upper().startswith(MANAGED)] if cfg.Capability else ["IMAP4rev1"]
        caps = base + ["LITERAL-", "SASL-IR", "ID"]
        if self.service.tls is not None and not self.tls_active:
            caps.append("STARTTLS")
        caps.append("LOGINDISABLED" if self.plaintext_refused else "AUTH=PLAIN")
        if cfg.CRAMs:
            caps.append("AUTH=CRAM-MD5")
        return " ".join(dict.fromkeys(caps))

    def greet(self) -> None:
        banner = self.cfg.Banner or "mmproxy %s IMAP4rev1 proxy ready" % __version__
        self.send("* OK [CAPABILITY %s] %s" % (self.capabilities(), banner))

    def on_shutdown(self) -> None:
        self.send(BYE_SHUTDOWN)

    # ------------------------------------------------------------------ reading commands
    def read_command(self) -> Command:
        """One command with its literals: {n} gets a '+' only when within bounds, {n+} must be."""
        parts: List[Token] = []
        tag = "*"
        total = 0
        line = self.reader.readline()
        while True:
            total += len(line)
            m = LITERAL_AT_END.search(line)
            parts.extend(tokenize(line[:m.start()] if m else line))
            if parts and isinstance(parts[0], bytes) and tag == "*":
                tag = parts[0].decode("ascii", "replace")
                if not _valid_tag(tag):
                    raise TaggedError("*", BAD_SYNTAX)
            if not m:
                break
            size, nonsync = int(m.group(1)), bool(m.group(2))
            total += size
            if size > MAX_LITERAL or total > MAX_COMMAND:
                if nonsync:
                    # The bytes are already on their way and must never be parsed as commands.
                    raise TaggedError(tag, "BAD [TOOBIG] Literal too big", fatal=True)
                raise TaggedError(tag, "BAD [TOOBIG] Literal too big")     # no '+': the client sends nothing
            if not nonsync:
                self.send("+ Ready for literal data")
            parts.append(self.reader.read_exact(size))
            line = self.reader.readline()
        if len(parts) < 2 or not all(isinstance(p, bytes) for p in parts[:2]):
            raise TaggedError(tag, BAD_SYNTAX)
        return Command(tag, parts[1].decode("ascii", "replace").upper(), parts[2:])

    def loop(self) -> None:
        while True:
            try:
                cmd = self.read_command()
            except TaggedError as e:
                self.send("%s %s" % (e.tag, e.reply))
                if e.fatal or self.count_bad():
                    self.send(BYE_TOO_MANY if not e.fatal else "* BYE Closing connection")
                    return
                continue
            except ClientSyntaxError:
                # Unparsable line: we may not even know the tag.
                self.send("* " + BAD_SYNTAX)
                if self.count_bad():
                    self.send(BYE_TOO_MANY)
                    return
                continue
            except ClientTooLong:
                self.send("* " + BAD_TOO_LONG)
                self.send("* BYE Closing connection")
                return
            handler = getattr(self, "cmd_" + cmd.verb, None) if cmd.verb.isalpha() else None
            if handler is None:
                self.send("%s %s" % (cmd.tag, BAD_NOT_NOW if cmd.verb in AUTHENTICATED_VERBS else BAD_UNKNOWN))
                if self.count_bad():
                    self.send(BYE_TOO_MANY)
                    return
                continue
            if handler(cmd) is False or self.handed_off:
                return

    # ------------------------------------------------------------------ commands
    def cmd_CAPABILITY(self, cmd: Command) -> None:
        """RFC 9051 6.1.1."""
        self.send("* CAPABILITY " + self.capabilities())
        self.send(cmd.tag + " OK Capability completed")

    def cmd_NOOP(self, cmd: Command) -> None:
        """RFC 9051 6.1.2."""
        self.send(cmd.tag + " OK NOOP completed")

    def cmd_LOGOUT(self, cmd: Command) -> bool:
        """RFC 9051 6.1.3."""
        self.send("* BYE Logging out")
        self.send(cmd.tag + " OK Logout completed")
        return False

    def cmd_ID(self, cmd: Command) -> None:
        """RFC 2971: answered by the proxy before login (the store hears about the client from us)."""
        self.send('* ID ("name" "mmproxy" "version" "%s")' % __version__)
        self.send(cmd.tag + " OK ID completed")

    def cmd_STARTTLS(self, cmd: Command) -> None:
        """RFC 9051 6.2.1; anything pipelined behind it is discarded (CVE-2011-0411)."""
        if self.service.tls is None or self.tls_active:
            self.send(cmd.tag + " BAD STARTTLS not available")
            return
        self.send(cmd.tag + " OK Begin TLS negotiation now")
        self.starttls()

    def cmd_LOGIN(self, cmd: Command) -> Optional[bool]:
        """RFC 9051 6.2.3."""
        if len(cmd.args) != 2 or not all(isinstance(a, bytes) for a in cmd.args):
            self.send(cmd.tag + " BAD LOGIN expects a user name and a password")
            return None
        if self.plaintext_refused:
            self.send(cmd.tag + " " + NO_PRIVACY)
            return None
        user, password = (a.decode("utf-8", "surrogateescape") for a in cmd.args)
        return self.login(cmd.tag, user, password)

    def cmd_AUTHENTICATE(self, cmd: Command) -> Optional[bool]:
        """RFC 9051 6.2.2 with SASL PLAIN (RFC 4616) and SASL-IR (RFC 4959)."""
        if not cmd.args or not isinstance(cmd.args[0], bytes) or len(cmd.args) > 2:
            self.send(cmd.tag + " BAD AUTHENTICATE expects a mechanism")
            return None
        mech = cmd.args[0].upper()
        if mech == b"CRAM-MD5" and self.cfg.CRAMs and len(cmd.args) == 1:
            # RFC 2195: no clear-text password on the wire, so allowed before TLS too
            try:
                exchange = self.cram_md5()
            except ClientSyntaxError:
                self.send(cmd.tag + " BAD Malformed CRAM-MD5 response")
                return None
            if exchange is None:
                self.send(cmd.tag + " BAD Authentication cancelled")
                return None
            return self.login(cmd.tag, exchange[0], None, exchange[1])
        if mech != b"PLAIN":
            self.send(cmd.tag + " NO Unsupported authentication mechanism")
            return None
        if self.plaintext_refused:
            self.send(cmd.tag + " " + NO_PRIVACY)
            return None
        if len(cmd.args) == 2:
            response = cmd.args[1]
            if not isinstance(response, bytes):
                self.send(cmd.tag + " " + BAD_SYNTAX)
                return None
        else:
            self.send("+ ")
            response = self.reader.readline()
        if response.strip() == b"*":
            self.send(cmd.tag + " BAD Authentication cancelled")
            return None
        try:
            data = b"" if response == b"=" else base64.b64decode(response, validate=True)
            authzid, authcid, password = (p.decode("utf-8", "surrogateescape") for p in data.split(b"\0"))
        except (binascii.Error, ValueError):
            self.send(cmd.tag + " BAD Malformed SASL PLAIN response")
            return None
        if authzid and authzid != authcid:
            self.send(cmd.tag + " " + NO_AUTHZ)
            return None
        return self.login(cmd.tag, authcid, password)

    # ------------------------------------------------------------------ login
    def login(self, tag: str, user: str, password: Optional[str], check: Optional[Callable] = None) -> Optional[bool]:
        """Find the store, log in there, answer the client; False ends the session.

        ``check(target) -> password`` verifies a challenge-response login (CRAM-MD5) instead of PreAuth.
        """
        store: Optional[Store] = None
        try:
            target, password = self.authorise(user, password, check)
            store = self.connect_store(target)
            ok, reply = self.replay(store, target, tag, password)
        except MMProxyError as e:
            if store is not None:
                store.close()
            self.log.info("login failed user=%r: %s: %s", user, failure_kind(e), e)
            self.send(self.reply_for(tag, e))
            return self.auth_failed(isinstance(e, AuthFailed))
        return self.finish_login(user, store, target, ok, reply)

    def reply_for(self, tag: str, e: BaseException) -> str:
        """The one place where the failure taxonomy becomes IMAP replies."""
        if isinstance(e, AuthFailed):
            return "%s %s" % (tag, NO_AUTH)
        if isinstance(e, AuthTempFail):
            return "%s %s" % (tag, NO_TEMP)
        if isinstance(e, (BackendUnavailable, BackendProtocolError)):
            # One response code per response: the alert goes in an untagged OK of its own.
            self.send("* OK [ALERT] " + _one_line(self.cfg.ServerDownAlert))
            return "%s %s" % (tag, NO_STORE)
        return "%s %s" % (tag, NO_TEMP)

    def replay(self, store: Store, target: Target, tag: str, password: str) -> Tuple[bool, bytes]:
        """Tell the store the real client, replay LOGIN; (logged in?, the reply for the client)."""
        ident = ('X0 ID ("x-originating-ip" "%s" "x-originating-port" "%d" "x-connected-ip" "%s" "x-connected-port" "%d")'
                 % (self.client_ip, self.client_port, self.server_ip, self.server_port)).encode()
        user_q, pass_q = quote(target.replay), quote(password)
        quoted = user_q is not None and pass_q is not None
        if quoted:
            # One round trip: the commands wait in the store's socket until it has greeted.
            store.send(ident + b"\r\nX1 LOGIN " + user_q + b" " + pass_q + b"\r\n")
        greeting = store.readline()
        if not greeting.upper().startswith(b"* OK"):
            raise BackendUnavailable("store greeted with %r" % greeting[:80])
        if not quoted:
            store.send(ident + b"\r\nX1 LOGIN ")
            for i, (value, q) in enumerate(((target.replay, user_q), (password, pass_q))):
                if i:
                    store.send(b" ")
                if q is not None:
                    store.send(q)
                    continue
                raw = value.encode("utf-8", "surrogateescape")
                store.send(b"{%d}\r\n" % len(raw))
                self._await_continuation(store)
                store.send(raw)
            store.send(b"\r\n")
        caps: Optional[bytes] = None
        untagged: List[bytes] = []
        while True:
            line = store.readline()
            if line.startswith(b"X0 "):
                continue
            if line.startswith(b"* "):
                if line[2:].upper().startswith(b"CAPABILITY "):
                    caps = line[13:]
                elif not line[2:].upper().startswith(b"ID "):
                    untagged.append(line)
                continue
            if line.startswith(b"X1 "):
                break
            raise BackendProtocolError("unexpected store line %r" % line[:80])
        status, _, rest = line[3:].partition(b" ")
        status = status.upper()
        for u in untagged:
            self.send(u)
        if status != b"OK":
            if status != b"NO":
                raise BackendProtocolError("store answered LOGIN with %r" % line[:80])
            return False, tag.encode() + b" NO " + rest
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
        return True, tag.encode() + b" OK " + rest

    def _await_continuation(self, store: Store) -> None:
        while True:
            line = store.readline()
            if line.startswith(b"+"):
                return
            if line.startswith(b"X1 "):
                raise BackendProtocolError("store refused the login literal: %r" % line[:80])


def _valid_tag(tag: str) -> bool:
    return bool(tag) and all(33 <= ord(c) < 127 and c not in '(){%*"\\+' for c in tag)


def _one_line(text: str) -> str:
    return " ".join(str(text or "").split())


class ImapService(Service):
    name = "imap"
    session_class = ImapSession
