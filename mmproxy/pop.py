"""POP3 (RFC 1939, 2449, 5034) before login, the login replay to the store, store-down spoofing.

Replies carry RFC 2449/3206 response codes: ``[AUTH]`` for bad credentials, ``[SYS/TEMP]`` for
directory or store trouble, the store's own ``[IN-USE]`` passed through.

XQUERYAUTH (AuthService yes, best per virtual domain): ``XQUERYAUTH <ip>`` answers
``+OK <user> <unix time of the login>`` when a verified POP login from that address is fresher
than AuthServiceTTL, ``-ERR [AUTH] No login from <ip>`` when not, and ``-ERR XQUERYAUTH is not
enabled`` unless AuthService is on for the address the client connected to.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import time
from typing import List, Optional

from mmproxy import __version__
from mmproxy.authservice import RECORDS
from mmproxy.backend import Store
from mmproxy.errors import (AuthFailed, BackendProtocolError, BackendUnavailable, ClientSyntaxError,
                            ClientTooLong, ConfigError, MMProxyError)
from mmproxy.session import Service, Session, Target, failure_kind

MAX_COMMAND = 255            # RFC 2449 section 4: a command line, CRLF included
MAX_SASL_LINE = 8192         # a SASL response line (RFC 5034 sets no lower bound)

ERR_AUTH = "-ERR [AUTH] Authentication failed."
ERR_TEMP = "-ERR [SYS/TEMP] Temporary authentication failure, try again later"
ERR_STORE = "-ERR [SYS/TEMP] Mail store not available, try again later"
ERR_PRIVACY = "-ERR [AUTH] Plaintext authentication is disallowed without TLS"
ERR_UNKNOWN = "-ERR Unknown command"
ERR_NOT_NOW = "-ERR Command not valid before login"
ERR_TOO_MANY = "-ERR Too many errors, closing connection"
ERR_SHUTDOWN = "-ERR [SYS/TEMP] Server shutting down"

TRANSACTION_VERBS = {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "LAST"}


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
        return cls(b"".join(l + b"\r\n" for l in lines))


class PopService(Service):
    name = "pop"

    def __init__(self, entry: object) -> None:
        super().__init__(entry)
        cfg = self.cfg
        self.spool: Optional[Spool] = None
        if cfg.SpoofEmptyMailbox:
            self.spool = Spool(None)             # overrides SpoofMessageFile, as the legacy product did
        elif cfg.SpoofMessageFile:
            self.spool = Spool.from_file(cfg.SpoofMessageFile)


class PopSession(Session):
    proto = "pop"
    max_line = MAX_COMMAND
    bye_auth_failures = ERR_TOO_MANY
    too_many_connections = "-ERR [SYS/TEMP] Too many connections from your address"
    service: PopService

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.pending_user: Optional[str] = None
        self.timestamp = "<%d.%d@%s>" % (os.getpid(), time.time_ns() // 1000, "mmproxy")

    # ------------------------------------------------------------------ greeting and loop
    def greet(self) -> None:
        banner = self.cfg.Banner or "mmproxy %s POP3 proxy ready" % __version__
        self.send("+OK %s%s" % (banner, (" " + self.timestamp) if self.cfg.CRAMs else ""))

    def on_shutdown(self) -> None:
        self.send(ERR_SHUTDOWN)

    def loop(self) -> None:
        while True:
            try:
                line = self.reader.readline()
            except ClientTooLong:
                self.send("-ERR Line too long")
                return
            verb, _, arg = line.decode("utf-8", "surrogateescape").partition(" ")
            verb = verb.upper()
            handler = getattr(self, "cmd_" + verb, None) if verb.isalpha() else None
            if handler is None:
                self.send(ERR_NOT_NOW if verb in TRANSACTION_VERBS else ERR_UNKNOWN)
                if self.count_bad():
                    self.send(ERR_TOO_MANY)
                    return
                continue
            if handler(arg) is False or self.handed_off:
                return

    def sasl_mechanisms(self) -> List[str]:
        return (["PLAIN"] if not self.plaintext_refused else []) + (["CRAM-MD5"] if self.cfg.CRAMs else [])

    # ------------------------------------------------------------------ commands
    def cmd_CAPA(self, arg: str) -> None:
        """RFC 2449 section 5."""
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.sasl_mechanisms():
            caps.append("SASL " + " ".join(self.sasl_mechanisms()))
        if not self.plaintext_refused:
            caps.append("USER")
        if self.service.tls is not None and not self.tls_active:
            caps.append("STLS")
        caps.append("IMPLEMENTATION mmproxy")
        self.send("+OK Capability list follows")
        for c in caps:
            self.send(c)
        self.send(".")

    def cmd_QUIT(self, arg: str) -> bool:
        """RFC 1939 section 5 (AUTHORIZATION state)."""
        self.send("+OK Bye")
        return False

    def cmd_NOOP(self, arg: str) -> None:
        self.send(ERR_NOT_NOW)

    def cmd_STLS(self, arg: str) -> None:
        """RFC 2595 section 4; anything pipelined behind it is discarded."""
        if self.service.tls is None or self.tls_active:
            self.send("-ERR STLS not available")
            return
        self.send("+OK Begin TLS negotiation")
        self.starttls()

    def cmd_USER(self, arg: str) -> None:
        """RFC 1939 section 7."""
        if self.plaintext_refused:
            self.send(ERR_PRIVACY)
            return
        if not arg:
            self.send("-ERR USER needs a name")
            return
        self.pending_user = arg
        self.send("+OK")

    def cmd_PASS(self, arg: str) -> Optional[bool]:
        """RFC 1939 section 7: the password is the rest of the line, spaces included."""
        if self.pending_user is None:
            self.send("-ERR USER first")
            return None
        user, self.pending_user = self.pending_user, None
        return self.login(user, arg)

    def cmd_APOP(self, arg: str) -> Optional[bool]:
        """RFC 1939 section 7: needs CRAMs and a clear-text userPassword readable with BindDN."""
        if not self.cfg.CRAMs:
            self.send(ERR_UNKNOWN)
            return None
        user, _, digest = arg.rpartition(" ")
        if not user or len(digest) != 32:
            self.send("-ERR APOP needs a name and a digest")
            return None

        def check(target: Target) -> str:
            return self.verify_challenge(target, lambda secret: hashlib.md5(
                (self.timestamp + secret).encode("utf-8", "surrogateescape")).hexdigest(), digest)
        return self.login(user, None, check)

    def cmd_AUTH(self, arg: str) -> Optional[bool]:
        """RFC 5034 with SASL PLAIN (RFC 4616)."""
        mech, _, initial = arg.partition(" ")
        if not mech:
            self.send("+OK")
            for m in self.sasl_mechanisms():
                self.send(m)
            self.send(".")
            return None
        if mech.upper() == "CRAM-MD5" and self.cfg.CRAMs and not initial:
            try:
                exchange = self.cram_md5()
            except ClientSyntaxError:
                self.send("-ERR Malformed CRAM-MD5 response")
                return None
            if exchange is None:
                self.send("-ERR Authentication cancelled")
                return None
            return self.login(exchange[0], None, exchange[1])
        if mech.upper() != "PLAIN":
            self.send("-ERR Unsupported authentication mechanism")
            return None
        if self.plaintext_refused:
            self.send(ERR_PRIVACY)
            return None
        if initial:
            response = initial.encode("utf-8", "surrogateescape")
        else:
            self.send("+ ")
            self.reader.max_line = MAX_SASL_LINE
            try:
                response = self.reader.readline()
            finally:
                self.reader.max_line = MAX_COMMAND
        if response.strip() == b"*":
            self.send("-ERR Authentication cancelled")
            return None
        try:
            data = b"" if response == b"=" else base64.b64decode(response, validate=True)
            authzid, authcid, password = (p.decode("utf-8", "surrogateescape") for p in data.split(b"\0"))
        except (binascii.Error, ValueError):
            self.send("-ERR Malformed SASL PLAIN response")
            return None
        if authzid and authzid != authcid:
            self.send("-ERR [AUTH] Authorization identity differs from authentication identity")
            return None
        return self.login(authcid, password)

    def cmd_XQUERYAUTH(self, arg: str) -> None:
        """MMP extension: who logged in over POP from this address (POP before SMTP)."""
        if not self.cfg.AuthService:
            self.send("-ERR XQUERYAUTH is not enabled")
            return
        try:
            ip = str(ipaddress.ip_address(arg.strip()))
        except ValueError:
            self.send("-ERR XQUERYAUTH needs an IP address")
            return
        rec = RECORDS.lookup(ip)
        if rec is None:
            self.send("-ERR [AUTH] No login from %s" % ip)
        else:
            self.send("+OK %s %d" % (rec.user, int(rec.when)))

    # ------------------------------------------------------------------ login
    def login(self, user: str, password: Optional[str], check=None) -> Optional[bool]:
        """Find the store, log in there, answer the client; False ends the session.

        ``check(target) -> password`` verifies a challenge-response login (APOP) instead of PreAuth.
        """
        store: Optional[Store] = None
        try:
            target, password = self.authorise(user, password, check)
            try:
                store = self.connect_store(target)
                ok, reply = self.replay(store, target, password)
            except (BackendUnavailable, BackendProtocolError):
                if self.service.spool is None:
                    raise
                if store is not None:
                    store.close()
                self.log.warning("store %s down for %s: showing a spoofed mailbox", target.host, target.login.canonical)
                return self.spoof(self.service.spool)
        except MMProxyError as e:
            if store is not None:
                store.close()
            self.log.info("login failed user=%r: %s: %s", user, failure_kind(e), e)
            self.send(self.reply_for(e))
            return self.auth_failed(isinstance(e, AuthFailed))
        if ok:                                       # the directory or the store verified the password
            RECORDS.record(self.client_ip, target.login.canonical, target.cfg.AuthServiceTTL)
        return self.finish_login(user, store, target, ok, reply,
                                 bad_credentials=b"[IN-USE]" not in reply and b"[SYS/" not in reply)

    def reply_for(self, e: BaseException) -> str:
        """The one place where the failure taxonomy becomes POP3 replies."""
        if isinstance(e, AuthFailed):
            return ERR_AUTH
        if isinstance(e, (BackendUnavailable, BackendProtocolError)):
            return ERR_STORE
        return ERR_TEMP

    def replay(self, store: Store, target: Target, password: str) -> tuple:
        """Tell the store the real client (XCLIENT when offered), replay USER/PASS."""
        greeting = store.readline()
        if not greeting.startswith(b"+OK"):
            raise BackendUnavailable("store greeted with %r" % greeting[:80])
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
        user = target.replay.encode("utf-8", "surrogateescape")
        pw = password.encode("utf-8", "surrogateescape")
        if b"\r" in user + pw or b"\n" in user + pw:
            raise AuthFailed("line break in credentials")
        first = []
        if b"XCLIENT" in caps:
            first.append(b"XCLIENT ADDR=%s PORT=%d\r\n" % (self.client_ip.encode(), self.client_port))
        first.append(b"USER " + user + b"\r\n")
        # XCLIENT and USER go together when the store pipelines; PASS always alone: Dovecot holds a
        # PASS that arrives pipelined behind USER for 40 ms before it authenticates.
        batches = [first, [b"PASS " + pw + b"\r\n"]] if b"PIPELINING" in caps else [[c] for c in first] + [[b"PASS " + pw + b"\r\n"]]
        replies: List[bytes] = []
        for batch in batches:
            store.send(b"".join(batch))
            replies += [store.readline() for _ in batch]
            if len(first) == 2 and not replies[0].startswith(b"+OK"):
                # never log in from the proxy's own address instead of the client's
                raise BackendProtocolError("store refused XCLIENT: %r" % replies[0][:80])
            if not replies[-1].startswith(b"+OK"):
                break
        final = replies[-1]
        if final.startswith(b"+OK"):
            return True, final
        if not final.startswith(b"-ERR"):
            raise BackendProtocolError("store answered PASS with %r" % final[:80])
        if not final.startswith(b"-ERR ["):
            final = b"-ERR [AUTH]" + final[4:]       # a bare -ERR to PASS is a refusal (RFC 3206)
        return False, final

    # ------------------------------------------------------------------ spoofed maildrop
    def spoof(self, spool: Spool) -> bool:
        """A consistent maildrop of zero or one message; nothing is deleted anywhere."""
        msg = spool.message
        deleted = False
        self.send("+OK Maildrop ready")
        while True:
            try:
                line = self.reader.readline()
            except ClientTooLong:
                self.send("-ERR Line too long")
                return False
            verb, _, arg = line.decode("utf-8", "surrogateescape").partition(" ")
            verb, args = verb.upper(), arg.split()
            live = msg is not None and not deleted
            if verb == "QUIT":
                self.send("+OK Bye")
                return False
            if verb == "STAT":
                self.send("+OK %d %d" % ((1, len(msg)) if live else (0, 0)))
            elif verb in ("LIST", "UIDL"):
                value = (len(msg) if verb == "LIST" else spool.uid) if live else None
                if args:
                    if args == ["1"] and live:
                        self.send("+OK 1 %s" % value)
                    else:
                        self.send("-ERR No such message")
                else:
                    self.send("+OK")
                    if live:
                        self.send("1 %s" % value)
                    self.send(".")
            elif verb in ("RETR", "TOP"):
                if not args or args[0] != "1" or not live or (verb == "TOP" and (len(args) != 2 or not args[1].isdigit())):
                    self.send("-ERR No such message")
                    continue
                body = msg if verb == "RETR" else _top(msg, int(args[1]))
                self.send("+OK %d octets" % len(msg))
                for l in body.split(b"\r\n")[:-1]:
                    self.send(b"." + l if l.startswith(b".") else l)
                self.send(".")
            elif verb == "DELE":
                if args == ["1"] and live:
                    deleted = True
                    self.send("+OK Message deleted")
                else:
                    self.send("-ERR No such message")
            elif verb == "RSET":
                deleted = False
                self.send("+OK")
            elif verb == "NOOP":
                self.send("+OK")
            elif verb == "CAPA":
                self.send("+OK Capability list follows")
                for c in ("TOP", "UIDL", "RESP-CODES", "PIPELINING", "IMPLEMENTATION mmproxy"):
                    self.send(c)
                self.send(".")
            else:
                self.send(ERR_UNKNOWN)
                if self.count_bad():
                    self.send(ERR_TOO_MANY)
                    return False


def _top(msg: bytes, n: int) -> bytes:
    head, sep, body = msg.partition(b"\r\n\r\n")
    lines = body.split(b"\r\n")[:-1] if body else []
    return head + sep + b"".join(l + b"\r\n" for l in lines[:n]) if sep else msg


PopService.session_class = PopSession
