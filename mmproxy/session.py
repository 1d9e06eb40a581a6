"""What every protocol session shares: reading commands within limits, TLS, finding the user's store,
and handing the connection to the relay.

A protocol module subclasses :class:`Session`: it writes the greeting, parses its own command syntax,
implements ``cmd_<VERB>`` handlers in straight-line blocking style, and maps the failure taxonomy to
its own replies in one place (``reply_for``).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent

from mmproxy import tls
from mmproxy.backend import Store
from mmproxy.directory import Directory, User
from mmproxy.errors import AuthFailed, AuthTempFail, BackendUnavailable, ClientGone, ClientSyntaxError
from mmproxy.formats import LoginId, has_control_chars, replay_id, split_login
from mmproxy.guard import ConnLimits
from mmproxy.logs import DETAIL
from mmproxy.relay import Relay
from mmproxy.wire import LineReader


PRELOGIN_TIMEOUT = 120.0   # idle seconds allowed before a login; Timeout applies after it
MAX_BAD_COMMANDS = 10      # then the session is closed (nginx max_errors, aiosmtpd BOGUS_LIMIT)
MAX_AUTH_FAILURES = 3      # failed logins per connection before it is closed
SEND_TIMEOUT = 60.0        # a client that does not read its answers is dropped after this

_ids = itertools.count(1)


class Service:
    """One ServiceList entry at run time: its settings, directory, TLS context and listeners."""

    name = "service"
    session_class: type
    uses_directory = True          # SMTP finds no users: it has relays, not stores

    def __init__(self, entry: Any) -> None:
        self.entry = entry
        self.cfg = entry.cfg
        self.directory: Optional[Directory] = Directory(self.cfg) if self.uses_directory else None
        self.tls: Optional[ssl.SSLContext] = tls.server_context(self.cfg) if self._needs_tls() else None
        self.ssl_ports = {(e.host, e.port) for e in (self.cfg.SSLPorts or [])}
        self.sessions: set = set()
        self.limits = ConnLimits(self.cfg.ConnLimits or ())

    def _needs_tls(self) -> bool:
        return bool(self.cfg.SSLEnable)

    def implicit_tls(self, host: str, port: int) -> bool:
        return (host, port) in self.ssl_ports or ("", port) in self.ssl_ports

    def handle(self, sock: socket.socket, addr: Tuple[str, int], implicit_tls: bool) -> None:
        ip = addr[0]
        if not self.limits.acquire(ip):
            self.refuse(sock, addr, implicit_tls)
            return
        session = self.session_class(self, sock, addr)
        session.release = lambda: self.limits.release(ip)
        self.sessions.add(session)
        try:
            session.run(implicit_tls)
        finally:
            self.sessions.discard(session)
            if not session.handed_off:
                session.release()

    def refuse(self, sock: socket.socket, addr: Tuple[str, int], implicit_tls: bool) -> None:
        """ConnLimits: say why in the protocol's words (in clear text only: no TLS for this one) and close."""
        logging.getLogger("mmproxy." + self.name).warning(
            "[%s:%d] refused: more than %s connections from this address (ConnLimits)",
            addr[0], addr[1], self.limits.limit_for(addr[0]))
        try:
            if not implicit_tls:
                sock.settimeout(5)
                sock.sendall(self.session_class.too_many_connections.encode() + b"\r\n")
        except OSError:
            pass
        finally:
            sock.close()

    def overrides_for(self, server_ip: str) -> Dict[str, Any]:
        vd = getattr(self.entry, "vdomains", None)
        return vd.for_address(server_ip) if vd is not None else {}

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()


@dataclass
class Target:
    """Where a verified (or to-be-verified) login goes."""

    login: LoginId
    user: User
    cfg: Any
    host: str
    replay: str


class Session:
    proto = "?"
    max_line = 8192

    def __init__(self, service: Service, sock: socket.socket, addr: Tuple[str, int]) -> None:
        self.service = service
        self.sock = sock
        self.client_ip, self.client_port = addr[0], addr[1]
        local = sock.getsockname()
        self.server_ip, self.server_port = local[0], local[1]
        self.id = next(_ids)
        self.greenlet = gevent.getcurrent()
        self.log = logging.LoggerAdapter(logging.getLogger("mmproxy." + self.proto), {"ctx": "%s %s:%d #%d" % (self.proto, self.client_ip, self.client_port, self.id)})
        self.cfg = service.cfg
        over = service.overrides_for(self.server_ip)
        if over:
            self.cfg = self.cfg.override(over)
        self.out: List[bytes] = []
        self.reader = LineReader(sock, self.max_line, PRELOGIN_TIMEOUT, self.flush)
        self.tls_active = False
        self.bad = 0
        self.auth_failures = 0
        self.handed_off = False
        self.user = ""

    # ------------------------------------------------------------------ output
    def send(self, line: str | bytes) -> None:
        """Queue one reply line; it goes out before the next blocking read (or at flush)."""
        self.out.append((line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line) + b"\r\n")

    def flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        try:
            self.sock.settimeout(SEND_TIMEOUT)
            self.sock.sendall(data)
        except (OSError, socket.timeout) as e:
            raise ClientGone("write failed: %s" % e) from None

    # ------------------------------------------------------------------ life cycle
    def run(self, implicit_tls: bool) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if implicit_tls:
                self._wrap_tls()
            self.greet()
            self.loop()
            self.flush()
        except ClientGone as e:
            self.log.debug("client gone: %s", e)
        except gevent.GreenletExit:
            try:
                self.on_shutdown()
                self.flush()
            except Exception:
                pass
            raise
        except Exception:
            self.log.exception("session failed")
        finally:
            if not self.handed_off:
                try:
                    self.sock.close()
                except OSError:
                    pass

    def greet(self) -> None:
        raise NotImplementedError

    def loop(self) -> None:
        raise NotImplementedError

    def on_shutdown(self) -> None:
        """The daemon is stopping: say goodbye in protocol terms."""

    bye_auth_failures = ""      # the protocol's goodbye after MAX_AUTH_FAILURES refused logins
    too_many_connections = ""   # the protocol's greeting-time refusal (ConnLimits)
    release: Callable[[], None] = staticmethod(lambda: None)   # gives the ConnLimits slot back

    def auth_failed(self, bad_credentials: bool) -> Optional[bool]:
        """Count a refused login (not a temporary failure); False ends the session."""
        if bad_credentials:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.send(self.bye_auth_failures)
                return False
        return None

    def count_bad(self) -> bool:
        """One more bad command; True when the budget is spent and the session must end."""
        self.bad += 1
        return self.bad >= MAX_BAD_COMMANDS

    # ------------------------------------------------------------------ TLS
    def _wrap_tls(self) -> None:
        ctx = self.service.tls
        if ctx is None:
            raise ClientGone("TLS requested but not configured")
        self.sock.settimeout(tls.HANDSHAKE_TIMEOUT)   # a client that never sends ClientHello
        try:
            self.sock = ctx.wrap_socket(self.sock, server_side=True)
        except (OSError, ssl.SSLError, socket.timeout) as e:
            raise ClientGone("TLS handshake failed: %s" % e) from None
        self.tls_active = True
        self.reader = LineReader(self.sock, self.max_line, PRELOGIN_TIMEOUT, self.flush)

    def starttls(self) -> None:
        """After the protocol's go-ahead: drop anything pipelined in plaintext, then handshake."""
        self.flush()
        dropped = self.reader.take_pending()
        if dropped:
            self.log.warning("discarded %d bytes pipelined after STARTTLS", len(dropped))
        self._wrap_tls()

    @property
    def plaintext_refused(self) -> bool:
        return bool(self.cfg.RestrictPlainPasswords) and not self.tls_active

    # ------------------------------------------------------------------ finding the user
    def locate(self, login: str, password: str, preauth: bool = True) -> Target:
        """Split the login id, find the domain and user, PreAuth if asked: the shared login path.

        Raises AuthFailed (bad credentials or unknown user), AuthTempFail (directory trouble) or
        BackendUnavailable (the user has no store).  ``preauth=False``: the caller verifies the
        credentials itself (a challenge-response login).
        """
        if not login or has_control_chars(login) or has_control_chars(password):
            raise AuthFailed("control characters or empty user name")
        cfg = self.cfg
        lid = split_login(login, cfg.VirtualDomainDelim or "", cfg.DefaultDomain, cfg.CanonicalVirtualDomainDelim or "@")
        if cfg.HostedDomains and not lid.domain:
            raise AuthFailed("%r has no domain and DefaultDomain is not set" % login)
        extra = [cfg.TCPAccessAttr] if cfg.TCPAccessAttr else []
        domain, user = self.service.directory.find_user(lid, cfg.SearchFormat, extra, self.client_ip, self.server_ip)
        if domain is None:
            raise AuthFailed("unknown domain %r" % lid.domain)
        if user is None:
            raise AuthFailed("unknown user %r" % lid.canonical)
        over = domain.overrides()
        if over:
            try:
                cfg = cfg.override(over)
            except ValueError as e:
                self.log.warning("ignoring a per-domain setting of %s: %s", domain.dn, e)
        if cfg.PreAuth and preauth:
            self.service.directory.authenticate(user, password)
        if not user.mailhost:
            raise BackendUnavailable("%s has none of %s" % (user.dn, " ".join(cfg.MailHostAttrs)))
        return Target(lid, user, cfg, user.mailhost, replay_id(cfg.ReplayFormat, lid, user.attrs))

    def authorise(self, user: str, password: Optional[str],
                  check: Optional[Callable[[Target], str]] = None) -> Tuple[Target, str]:
        """locate() with PreAuth; or, for a challenge-response login, locate() and then
        ``check(target)``, which verifies the response and returns the password to replay."""
        if check is None:
            return self.locate(user, password or ""), password or ""
        target = self.locate(user, "", preauth=False)
        return target, check(target)

    def finish_login(self, user: str, store: Store, target: Target, ok: bool, reply: bytes,
                     bad_credentials: bool = True) -> Optional[bool]:
        """Pass the store's answer on; hand the session to the relay, or count a refused login."""
        self.send(reply)
        if not ok:
            store.close()
            self.log.info("login refused by store user=%r", user)
            return self.auth_failed(bad_credentials)
        self.log.info("login user=%s store=%s:%d", target.login.canonical, target.host, target.cfg.BacksidePort)
        self.hand_off(store, target.login.canonical, target.cfg.Timeout)
        return False

    def verify_challenge(self, target: Target, expected: Callable[[str], str], digest: str) -> str:
        """Challenge-response logins (APOP, CRAM-MD5): the user's clear-text directory password
        must produce ``digest``.  Returns that password, which the store login then replays."""
        secret = self.service.directory.read_password(target.user)
        if secret is None:
            raise AuthFailed("%s has no clear-text userPassword for a challenge-response login" % target.user.dn)
        if not hmac.compare_digest(expected(secret), digest.lower()):
            raise AuthFailed("challenge-response digest does not match")
        return secret

    def cram_md5(self) -> Optional[Tuple[str, Callable[[Target], str]]]:
        """The RFC 2195 exchange after ``AUTHENTICATE``/``AUTH CRAM-MD5``: (user, check), or None
        when the client cancels with ``*``.  ClientSyntaxError for a response that does not parse."""
        challenge = "<%d.%d@mmproxy>" % (int.from_bytes(os.urandom(6), "big"), time.time_ns() // 1000)
        self.send("+ " + base64.b64encode(challenge.encode()).decode())
        response = self.reader.readline()
        if response.strip() == b"*":
            return None
        try:
            user, _, digest = base64.b64decode(response, validate=True).decode("utf-8", "surrogateescape").rpartition(" ")
        except (binascii.Error, ValueError):
            raise ClientSyntaxError("malformed CRAM-MD5 response") from None
        if not user or len(digest) != 32:
            raise ClientSyntaxError("malformed CRAM-MD5 response")

        def check(target: Target) -> str:
            return self.verify_challenge(target, lambda secret: hmac.new(
                secret.encode("utf-8", "surrogateescape"), challenge.encode(), hashlib.md5).hexdigest(), digest)
        return user, check

    def connect_store(self, target: Target) -> Store:
        return Store(target.host, target.cfg.BacksidePort)

    # ------------------------------------------------------------------ relay
    def hand_off(self, store: Store, user: str, idle: float) -> None:
        """Login done: the client and store sockets now belong to the relay; this greenlet ends.

        Bytes either side already sent past the login go first: the client's to the store, the
        store's to the client.
        """
        self.flush()
        to_store = self.reader.take_pending()
        to_client = store.reader.take_pending()
        self.handed_off = True
        started = gevent.get_hub().loop.now()
        lg = self.log

        release = self.release

        def closed(r: Relay) -> None:
            release()
            lg.log(DETAIL, "logout user=%s: %s (%ds, client->store %d B, store->client %d B)", user, r.reason or "closed",
                    gevent.get_hub().loop.now() - started, r.bytes_up, r.bytes_down)
        Relay(self.sock, store.sock, float(idle), closed, to_store, to_client)


def failure_kind(e: BaseException) -> str:
    """A word for logs: why a login did not go through."""
    return {AuthFailed: "auth failed", AuthTempFail: "directory unavailable",
            BackendUnavailable: "store unavailable"}.get(type(e), type(e).__name__)
