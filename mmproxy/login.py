"""What the protocols that log users in (IMAP, POP) share: credentials, finding the user's store,
PreAuth or a challenge-response check, the SASL exchange, and handing the connection to the pump.

SMTP has no login to replay and does not use this module.
"""
from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

from mmproxy import access, hostnames, sasl, stats, tls
from mmproxy.authserver import AuthServer, Request
from mmproxy.backend import Store
from mmproxy.certmap import Certmap, normalise_dn, subject_dn
from mmproxy.directory import Directory, User
from mmproxy.errors import (
    AccessDenied,
    AccountDisabled,
    AccountHeld,
    AuthCancelled,
    AuthFailed,
    AuthzFailed,
    BackendUnavailable,
    ClientSyntaxError,
    MechanismUnsupported,
    PrivacyRequired,
    UnknownUser,
)
from mmproxy.loginid import LoginId, replay_id, split_login
from mmproxy.logs import DETAIL
from mmproxy.pump import Pump
from mmproxy.session import (
    LOGIN_OUTCOMES,
    Line,
    Service,
    Session,
    failure_kind,
    is_login_failure,
    log_end_line,
    outcome_of,
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_LOGIN_ID = 256           # octets of a login id (RFC 4616 lets PLAIN carry 255 UTF-8 characters)
MAX_SASL_LINE = 12288        # one base64 client response of a SASL exchange (RFC 4954's AUTH line)


@dataclass(frozen=True)
class Credentials:
    """What a client logs in with, checked once (:func:`credentials`).

    ``user`` is valid UTF-8 without control characters; ``password`` is octets, as an LDAP simple
    bind takes them (RFC 4511 section 4.2).  ``verify(target) -> password`` checks a
    challenge-response login against the directory (CRAM-MD5, APOP) instead of PreAuth.
    """

    user: str
    password: bytes = b""
    verify: Optional[Callable[["Target"], bytes]] = None
    external: bool = False       # SASL EXTERNAL: the TLS client certificate; ``user`` the authzid or ""


def credentials(user: bytes, password: bytes = b"",
                verify: Optional[Callable[["Target"], bytes]] = None) -> Credentials:
    """The one gate every login id and password passes before it reaches LDAP, a log, a store or
    XCLIENT.  AuthFailed (a failed login, as a wrong password would be) naming the real cause."""
    if not user:
        raise AuthFailed("empty login id")
    if len(user) > MAX_LOGIN_ID:
        raise AuthFailed("login id of %d octets (at most %d)" % (len(user), MAX_LOGIN_ID))
    try:
        text = user.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthFailed("login id %r is not UTF-8" % user[:80]) from None
    if _CONTROL.search(text):
        raise AuthFailed("login id %r holds control characters" % text[:80])
    if b"\0" in password or b"\r" in password or b"\n" in password:
        raise AuthFailed("password of %r holds a NUL, CR or LF" % text[:80])
    return Credentials(text, password, verify)


@functools.lru_cache(maxsize=1024)
def user_filter(text: str) -> Union[access.Filter, access.FilterSyntaxError]:
    """A per-user filter value, parsed once (the same few values recur), or why it does not parse."""
    try:
        return access.parse(text)
    except access.FilterSyntaxError as e:
        return e


@dataclass
class Target:
    """Where a login goes: the split login id, the user's entry, the settings that apply to it
    (service, virtual domain, directory domain), the store, and the id to replay there."""

    login: LoginId
    user: User
    cfg: Any
    host: str
    replay: str
    rewritten: bool = False      # ``replay`` is the AuthenticationServer's rewritten user id

    @property
    def port(self) -> int:
        """The store's port: SSLBacksidePort (implicit TLS) when set, else BacksidePort."""
        return int(self.cfg.SSLBacksidePort or self.cfg.BacksidePort)

    def __str__(self) -> str:
        return "%s:%d" % (self.host, self.port)


class LoginService(Service):
    """A service that logs users in to stores: it has a directory (and one per virtual domain that
    sets directory parameters in vdmap.cfg)."""

    def __init__(self, entry: Any, previous: Optional[Service] = None) -> None:
        super().__init__(entry, previous)
        # a refresh keeps a directory whose settings did not change: its caches, its connections
        kept = {d.settings: d for d in (previous.resources() if previous is not None else ())
                if isinstance(d, Directory)}

        def directory(cfg: Any) -> Directory:
            return kept.get(Directory.settings_of(cfg, entry.mta)) or Directory(cfg, entry.mta)
        self.directory = directory(self.cfg)
        self.directories: Dict[str, Directory] = {}      # virtual domain name -> its own directory
        vdomains = getattr(entry, "vdomains", None)
        for vd in vdomains.domains if vdomains is not None else ():
            # a virtual domain that sets a parameter Directory reads gets a directory of its own
            if any(name in vd.settings for name in Directory.PARAMS):
                self.directories[vd.name] = directory(self.cfg.override(vd.settings))
        self.store_tls = tls.store_context(self.cfg)      # SSLBacksidePort; None: plaintext
        self.certmap = Certmap.load(self.cfg.CertmapFile) if self.cfg.CertmapFile else None
        server = self.cfg.AuthenticationServer
        self.authserver = AuthServer(server[0], server[1], float(self.cfg.AuthenticationServerTimeout)) \
            if server else None

    def directory_for(self, server_ip: str) -> Directory:
        """The directory of sessions accepted on ``server_ip``: their virtual domain's, else the service's."""
        if self.directories:
            vd = self.entry.vdomains.domain_for(server_ip)
            if vd is not None and vd.name in self.directories:
                return self.directories[vd.name]
        return self.directory

    def resources(self) -> List[Any]:
        return [self.directory, *self.directories.values()]


class LoginSession(Session):
    """A session that ends in a login replayed to the user's store and the pump (IMAP, POP).

    Protocols set the states below and provide ``replay``; ``login`` does the rest.
    """

    service: LoginService
    LOGIN_STATE: Any = None          # waiting for credentials (IMAP not authenticated, POP authorization)
    AUTHENTICATING: Any = None       # a SASL exchange or a login in progress
    RELAYING: Any = None             # the pump has the connection
    GOODBYES: Mapping[str, bytes] = {}   # the pump's goodbyes: "idle" (Timeout), "shutdown", "kick"

    @classmethod
    def final_states(cls) -> FrozenSet[Any]:
        return frozenset({cls.CLOSED, cls.RELAYING})

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.user = ""               # the login id of the present or last attempt, for the log
        self.target: Optional[Target] = None
        self.store_tried = False     # a store was contacted (the session-end line names it only then)
        self.store_admin: Optional[Tuple[str, str]] = None   # a certificate login: (StoreAdmin, StoreAdminPass)
        self.waited = False          # this login attempt has waited its BadGuys sentence
        self.directory = self.service.directory_for(self.server_ip)

    # ------------------------------------------------------------------ what a protocol provides
    def replay(self, store: Store, target: Target, password: bytes, verified: bool) -> Line:
        """Tell the store who the client is and log in there; the reply for the client.  StoreRefused
        (with the store's words; a failed login only if ``verified`` is false) when it says no;
        Backend* errors when it fails."""
        raise NotImplementedError

    def logged_in(self, target: Target) -> None:
        """A login went through (verified by the directory or the store)."""

    # ------------------------------------------------------------------ failures
    def fail(self, e: BaseException) -> None:
        if is_login_failure(e):
            stats.login(self.kind, outcome_of(e))
            self.bad_guys(failed=True, wait=not self.waited)
        elif self.state is self.AUTHENTICATING and isinstance(e, LOGIN_OUTCOMES):
            stats.login(self.kind, outcome_of(e))
            self.bad_guys(failed=False, forgive=False, wait=not self.waited)    # any answer to a login waits alike
        super().fail(e)
        if self.state is self.AUTHENTICATING:
            self.state = self.LOGIN_STATE

    def log_login_failure(self, e: BaseException) -> str:
        kind = failure_kind(e)
        self.log.info("login failed user=%r: %s: %s", self.user, kind, e)
        return "login failed: %s" % kind

    def describe(self) -> str:
        parts = []
        if self.user:
            parts.append("user %s" % self.user)
        if self.target is not None and self.store_tried:
            parts.append("store %s" % self.target)
        return ", ".join(parts)

    # ------------------------------------------------------------------ SASL
    def mechanisms(self) -> List[str]:
        """The SASL mechanisms offered now: PLAIN and LOGIN unless plaintext is refused, CRAM-MD5 with CRAMs."""
        mechs = [] if self.plaintext_refused else ["PLAIN", "LOGIN"]
        return mechs + (["CRAM-MD5"] if self.cfg.CRAMs else []) + (["EXTERNAL"] if self.certificate_mapped else [])

    @property
    def certificate_mapped(self) -> bool:
        """A verified client certificate that CertmapFile has a mapping for (its issuer's, or the
        default): then EXTERNAL is offered.  Whose it is, the directory says at AUTHENTICATE."""
        cm = self.service.certmap
        if cm is None or self.peer_cert is None:
            return False
        try:
            return cm.mapping_for(self.peer_cert) is not None
        except ValueError:
            return False

    def sasl(self, mechanism: bytes, initial: Optional[bytes]) -> Credentials:
        """The exchange of IMAP AUTHENTICATE / POP AUTH (RFC 4422; challenges as ``+ base64``),
        with an optional initial response (RFC 4959, RFC 5034).  The credentials it yields."""
        mech = mechanism.decode("ascii", "replace").upper()
        if mech not in self.mechanisms():
            if sasl.secret_in_clear(mech) and self.plaintext_refused:
                raise PrivacyRequired("Plaintext authentication is disallowed without TLS")
            raise MechanismUnsupported("Unsupported authentication mechanism", "mechanism %r" % mech[:40])
        self.state = self.AUTHENTICATING
        if mech == "EXTERNAL":
            # RFC 4422 appendix A: the client sends only the authorization identity, empty to be
            # whoever its certificate says (RFC 4959: "=" as an empty initial response)
            authzid = self.sasl_response(b"", initial)
            return Credentials(credentials(authzid).user if authzid else "", external=True)
        if mech == "PLAIN":
            authzid, authcid, password = sasl.plain(self.sasl_response(b"", initial))
            if authzid and authzid != authcid:
                self.user = authcid.decode("utf-8", "replace")[:80]
                raise AuthzFailed("authorization identity %r differs" % authzid[:80])
            return credentials(authcid, password)
        if mech == "LOGIN":
            user = self.sasl_response(sasl.LOGIN_CHALLENGES[0], initial)
            return credentials(user, self.sasl_response(sasl.LOGIN_CHALLENGES[1], None))
        # CRAM-MD5 (RFC 2195): the server speaks first, so there is no initial response
        if initial is not None:
            raise ClientSyntaxError("CRAM-MD5 takes no initial response")
        challenge = sasl.challenge()
        user, digest = sasl.cram_md5_response(self.sasl_response(challenge, None))
        return credentials(user, verify=lambda target: self.verify_challenge(
            target, lambda secret: sasl.cram_md5_digest(secret, challenge), digest))

    def sasl_response(self, challenge: bytes, initial: Optional[bytes]) -> bytes:
        """The client's (decoded) response to ``challenge``, or its initial response when it gave one."""
        if initial is not None:
            if sasl.is_cancel(initial):
                raise AuthCancelled("Authentication cancelled")
            return sasl.decode(initial)
        self.send(b"+ " + sasl.encode(challenge))
        line = self.reader.readline(MAX_SASL_LINE)
        if sasl.is_cancel(line):
            raise AuthCancelled("Authentication cancelled")
        return sasl.decode(line)

    def verify_challenge(self, target: Target, expected: Callable[[bytes], str], digest: str) -> bytes:
        """Challenge-response logins (APOP, CRAM-MD5): the user's clear-text directory password must
        produce ``digest``.  Returns that password, which the store login then replays."""
        secret = self.directory.read_password(target.user)
        if secret is None:
            raise AuthFailed("%s has no clear-text userPassword for a challenge-response login" % target.user.dn)
        if not sasl.digest_matches(expected(secret), digest):
            raise AuthFailed("challenge-response digest does not match")
        return secret

    # ------------------------------------------------------------------ the login
    def locate(self, user: str) -> Target:
        """Split the login id, find the domain and user, apply per-domain settings.

        Raises AuthFailed (unknown user or domain) or AuthTempFail (directory trouble).  A user
        with no store gets a Target without host: ``authorise`` says so only after the password.
        """
        cfg = self.cfg
        lid = split_login(user, cfg.VirtualDomainDelim or "", cfg.DefaultDomain, cfg.CanonicalVirtualDomainDelim or "@")
        if cfg.HostedDomains and not lid.domain:
            raise AuthFailed("%r has no domain and DefaultDomain is not set" % user)
        extra = [cfg.TCPAccessAttr] if cfg.TCPAccessAttr else []
        if self.service.authserver is not None:
            extra += cfg.AuthenticationLdapAttributes      # in the same search as the user
        domain, entry = self.directory.find_user(lid, cfg.SearchFormat, extra, self.client_ip, self.server_ip)
        if domain is None:
            raise UnknownUser("unknown domain %r" % lid.domain)
        if entry is None:
            raise UnknownUser("unknown user %r" % lid.canonical)
        lid = domain.login_id(lid)        # an alias domain's user is replayed in the canonical domain (%V, %s)
        over = domain.overrides()
        if over:
            try:
                cfg = cfg.override(over)
            except ValueError as e:
                self.log.warning("ignoring a per-domain setting of %s: %s", domain.dn, e)
        return Target(lid, entry, cfg, entry.mailhost or "", replay_id(cfg.ReplayFormat, lid, entry.attrs))

    def certificate_target(self, authzid: str) -> Target:
        """SASL EXTERNAL: the directory entry the client certificate maps to (CertmapFile, under
        UserGroupDN), as a Target, and the store login as StoreAdmin on the user's behalf.

        The login id is ``authzid`` when the client gave one (AuthzFailed unless it is the same
        entry), else the entry's uid (with the domain of its mail address for hosted domains).
        AuthFailed when the certificate maps to no entry or to several."""
        cfg, directory = self.cfg, self.directory
        assert self.service.certmap is not None and self.peer_cert is not None    # EXTERNAL is offered only then
        subject = subject_dn(self.peer_cert)
        self.user = authzid or subject
        if not (cfg.StoreAdmin and cfg.StoreAdminPass):
            raise AuthFailed("certificate login for %s: StoreAdmin and StoreAdminPass are not set" % subject)
        base = cfg.UserGroupDN or cfg.CertMapDN or directory.base
        mapping, searches = self.service.certmap.searches(self.peer_cert, base)
        rows: list = []
        for search in searches:
            rows = directory.certificate_entries(search.base, search.base_only, search.terms,
                                                 self.peer_cert if mapping and mapping.verifycert else None)
            if rows:
                break
        if len(rows) != 1:
            raise AuthFailed("certificate %s maps to %s (certmap %s)" % (
                subject, "several entries" if rows else "no entry", mapping.name if mapping else "-"))
        dn, attrs = rows[0]
        login = authzid or _login_of(attrs, cfg.HostedDomains)
        if not login:
            raise AuthFailed("certificate %s maps to %s, which has no uid" % (subject, dn))
        self.user = login
        target = self.locate(login)
        if normalise_dn(target.user.dn) != normalise_dn(dn):
            if authzid:
                raise AuthzFailed("authorization identity %r is not %s, the certificate's entry" % (authzid[:80], dn))
            raise AuthFailed("certificate %s maps to %s, but %s is %s" % (subject, dn, login, target.user.dn))
        self.store_admin = (cfg.StoreAdmin, cfg.StoreAdminPass)
        return target

    def proxy_plain(self, target: Target) -> bytes:
        """The base64 SASL PLAIN message of a certificate login at the store (RFC 4616): authzid
        the user's store login, authcid StoreAdmin, StoreAdminPass (a Dovecot master user)."""
        assert self.store_admin is not None
        admin, password = self.store_admin
        return sasl.encode(b"\0".join(v.encode("utf-8") for v in (target.replay, admin, password)))

    def login(self, creds: Credentials) -> None:
        """Find the store, verify (PreAuth or challenge-response), replay the login, answer the
        client and hand the connection to the pump.  Every failure is raised for ``fail``."""
        target, password, verified = self.authorise(creds)
        self.enter_store(target, password, verified)

    def authorise(self, creds: Credentials) -> Tuple[Target, bytes, bool]:
        """Find the user's store and check the password where the settings say so: (where the
        login goes, the password to replay, whether the proxy verified it)."""
        self.state = self.AUTHENTICATING
        self.user, self.target, self.store_admin, self.waited = creds.user, None, None, False
        if creds.external:
            target = self.target = self.certificate_target(creds.user)
            password, verified = b"", True
        else:
            target = self.target = self.locate(creds.user)
        if creds.external:
            pass                                   # the certificate, mapped by the directory
        elif creds.verify is not None:
            password, verified = creds.verify(target), True
        elif target.cfg.PreAuth and self.service.authserver is not None:
            self.ask_authserver(target, creds.password)
            password, verified = creds.password, True
        elif target.cfg.PreAuth:
            self.directory.authenticate(target.user, creds.password)
            password, verified = creds.password, True
        else:
            password, verified = creds.password, False
        self.check_status(target)
        self.check_access(target, verified)
        if not target.host:
            # only now: before the password is checked, this answer would tell who exists
            raise BackendUnavailable("%s has none of %s" % (target.user.dn, " ".join(target.cfg.MailHostAttrs)))
        return target, password, verified

    def ask_authserver(self, target: Target, password: bytes) -> None:
        """PreAuth by the AuthenticationServer instead of an LDAP bind (plain-text logins only, as
        the legacy tpauthsdk README says): it gets the login, the entry's DN and the values of
        AuthenticationLdapAttributes (read in the user's search); a user id it answers replaces
        the one replayed to the store.  AuthFailed when it refuses, AuthServerUnavailable when it
        cannot say (docs/authentication-server.md)."""
        assert self.service.authserver is not None
        attrs = [(name, value) for name in target.cfg.AuthenticationLdapAttributes for value in target.user.get(name)]
        new_id = self.service.authserver.verify(Request(
            self.kind, self.tls_active, target.login.original, target.login.canonical, target.user.dn, password,
            (self.client_ip, self.client_port), (self.server_ip, self.server_port), attrs))
        if new_id is not None:
            target.replay, target.rewritten = new_id, True

    def check_status(self, target: Target) -> None:
        """The account's status (account_status: the domain's and the user's, read in the user's
        search): inactive, disabled, deleted or removed refuse the login as a wrong password would
        (the log says why); hold is a temporary failure; active and overquota log in."""
        status = target.user.status
        if status in ("active", "overquota"):
            return
        if status == "hold":
            raise AccountHeld("%s is on hold" % target.user.dn)
        raise AccountDisabled("%s is %s" % (target.user.dn, status))

    def check_access(self, target: Target, verified: bool) -> None:
        """The user's own access filter, the value of the attribute ``TCPAccessAttr`` names (values
        joined by ``$``), for this client and service (``imaps``/``pops`` on an implicit-TLS port);
        a value that does not parse refuses (fail closed).  A refusal is AccessDenied once the
        password is verified; before that (PreAuth off) an AuthFailed, so that the answer tells
        no more than a wrong password would (the log says which it was)."""
        attr = target.cfg.TCPAccessAttr
        values = target.user.get(attr) if attr else []
        if not values:
            return
        service = self.kind + ("s" if self.implicit_tls else "")
        flt = user_filter("$".join(values))
        if isinstance(flt, access.FilterSyntaxError):
            why = "denied: %r does not parse: %s" % ("$".join(values)[:200], flt)
        else:
            lookup = hostnames.lookup
            allowed, why = flt.decide(service, access.Host(self.client_ip, lookup), access.Host(self.server_ip, lookup),
                                      target.login.canonical)
            if allowed:
                return
        error = AccessDenied if verified else AuthFailed
        stats.refused(self.kind, "access_filter")
        raise error("%s of %s: %s %s" % (attr, target.user.dn, service, why))

    def enter_store(self, target: Target, password: bytes, verified: bool) -> None:
        """Connect to the store, replay the login there, answer the client, start the pump.  A
        password the proxy verified waits its BadGuys sentence first: no store connection is held
        meanwhile (the store's verdict on an unverified one is only known after the replay)."""
        if verified:
            self.bad_guys(failed=False, forgive=False)
            self.waited = True
        start = time.monotonic()
        reply = None
        try:
            store = self.connect_store(target)
            try:
                reply = self.replay(store, target, password, verified)
            finally:
                if reply is None:                      # refused, failed, or the session was killed
                    store.close()
        finally:
            stats.store_time(self.kind, time.monotonic() - start)
        self.bad_guys(failed=False, wait=not verified)
        self.logged_in(target)
        stats.login(self.kind, "ok")
        self.send(reply)
        self.log.info("login user=%s store=%s%s", target.login.canonical, target,
                      " as=%s" % target.replay if target.rewritten else "")
        self.start_pump(store, target)

    def connect_store(self, target: Target) -> Store:
        self.store_tried = True
        return Store(target.host, target.port, float(target.cfg.StoreTimeout), tls=self.service.store_tls,
                     attempts=target.cfg.MaxConcurrentConnectionAttempts, log=self.log)

    def start_pump(self, store: Store, target: Target) -> None:
        """Login done: the client and store sockets now belong to the pump; this greenlet ends.

        Bytes either side already sent past the login go first: the client's to the store, the
        store's to the client.  The pump keeps no reference to this session (memory per idle
        session is the figure that matters): what ``who`` and the end line need is copied into a
        :class:`Relayed`.
        """
        self.reader.set_deadline(None)          # logged in: the login's deadline is over
        self.flush()
        to_store = self.reader.take_pending()
        to_client = store.reader.take_pending()
        self.state, self.pumping = self.RELAYING, True
        self.user = target.login.canonical
        closed = Relayed(self, target, len(to_client))
        Pump(self.sock, store.sock, float(target.cfg.Timeout), closed, to_store, to_client, self.GOODBYES)


class Relayed:
    """A relayed session as the pump's ``on_close``: who it is (for ``mmproxy who``/``kick``,
    control.py) and what its end line says.  Slots, and only references to what the login made
    already: an idle session's memory is the figure that matters."""

    __slots__ = ("log", "release", "started", "state", "user", "host", "port", "client_ip", "client_port",
                 "service", "instance", "received", "sent")

    def __init__(self, session: LoginSession, target: Target, to_client: int) -> None:
        self.log, self.release, self.started = session.log, session.release, session.started
        self.state = session.RELAYING.value
        self.user, self.host, self.port = target.login.canonical, target.host, target.port
        self.client_ip, self.client_port = session.client_ip, session.client_port
        self.service, self.instance = session.kind, session.service.entry.spec.instance
        self.received, self.sent = session.reader.received, session.sent + to_client

    def __call__(self, p: Pump) -> None:
        """The pump closed: the ConnLimits slot back, the bytes counted, the end line."""
        self.release()
        stats.relayed(self.service, p.bytes_up, p.bytes_down)
        if self.log.isEnabledFor(DETAIL):
            log_end_line(self.log, p.reason or "closed", self.state, "user %s, store %s:%d"
                         % (self.user, self.host, self.port), self.started,
                         self.received + p.bytes_up, self.sent + p.bytes_down)


def _login_of(attrs: Mapping[str, List[str]], hosted: bool) -> str:
    """The login id of a directory entry: its uid, with the domain of its mail address when domains
    are hosted and the uid has none ("alice" + "alice@example.com" -> "alice@example.com")."""
    uid = (attrs.get("uid") or [""])[0]
    mail = (attrs.get("mail") or [""])[0]
    if uid and hosted and "@" not in uid and "@" in mail:
        return uid + "@" + mail.rpartition("@")[2]
    return uid
