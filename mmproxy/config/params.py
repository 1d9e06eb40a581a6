"""The one registry of every legacy MMP parameter.

Parsing, typing, defaults, which file a key belongs in, ``check-config``, the ``*-def.cfg``
templates and ``docs/parameters.md`` all come from ``PARAMS``; nothing else knows a parameter by
name.  ``files`` is where the legacy product documents the key; ``honoured_in`` lists other files
where mmproxy still uses it (real legacy trees carry keys in more files than the manual lists).
Turning a feature on is a single ``supported=True`` flip here.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from mmproxy.config import kinds
from mmproxy.config import types as t

FILE_CODES = tuple(kinds.BY_CODE)                               # "A", "I", "P", "S"
FILE_NAMES = {k.code: k.file for k in kinds.BY_NAME.values()}     # "I" -> "ImapProxyAService"
KIND_CODES = {k.name: k.code for k in kinds.SERVICES.values()}    # "imap" -> "I"


@dataclass(frozen=True)
class Param:
    name: str                         # legacy spelling, e.g. "LdapURL"
    type: t.Type
    default: Any                      # typed value, None (unset) or a types.Deferred
    files: Tuple[str, ...]            # legacy files: "A", "I", "P", "S"
    doc: str                          # one line
    per_domain: bool = False          # may be set per virtual domain (vdmap.cfg)
    supported: bool = False           # implemented by mmproxy now
    security: bool = False            # an access control: set while unsupported is an error
    obsolete: Optional[str] = None    # the name that replaces it
    reload: bool = True               # a refresh applies it (False: restart needed)
    honoured_in: Tuple[str, ...] = ()  # files beyond ``files`` where mmproxy uses it
    group: str = ""

    @property
    def key(self) -> str:
        return self.name.lower()

    def honoured(self, code: str) -> bool:
        return code in self.files or code in self.honoured_in

    def convert(self, raw: str, ctx: Any = None) -> Any:
        """The typed value of ``raw``; ValueError("<Name>: what is wrong") when it does not parse."""
        try:
            return self.type.convert(raw, ctx)
        except ValueError as e:
            raise ValueError("%s: %s" % (self.name, e)) from None


_ALL: List[Param] = []   # in declaration order: templates and docs follow it


def _group(group: str, *rows: Tuple[Any, ...]) -> None:
    """Register rows (name, type, default, files, doc[, options]); text defaults are converted here,
    so each default is written as the legacy manual gives it and proven to parse."""
    for name, type_, default, files, doc, *rest in rows:
        opts = dict(rest[0]) if rest else {}
        opts["honoured_in"] = tuple(opts.get("honoured_in", "").split())
        if isinstance(default, str):
            default = type_.convert(default, t.Ctx())
        _ALL.append(Param(name, type_, default, tuple(files.split()), doc, group=group, **opts))


_SUP = {"supported": True}
# may be set per virtual domain in vdmap.cfg: the list of the Messaging Server 6 Administration Guide,
# "MMP Virtual Domains" (its CertMap is CertMapDN, now UserGroupDN; its DomainDelim VirtualDomainDelim)
_VD = dict(_SUP, per_domain=True)
_IPS = "I P S"
_BG = dict(_SUP, honoured_in="S")         # BadGuys: SMTP too with SmtpBadGuys

_group(
    "Services and process",
    ("ServiceList", t.ServiceList(),
     "msg_svr_base/lib/ImapProxyAService@143|993 msg_svr_base/lib/PopProxyAService@110", "A",
     "services to start: DLLPATH[|INSTANCE]@[IP:]PORT|[IP:]PORT..., blank separated; the basename of "
     "DLLPATH picks the service, INSTANCE.cfg holds its settings; a refresh opens and closes listeners to match", _SUP),
    ("NumThreads", t.Int(min=1), 1, "A",
     "worker processes (one per processor is optimal), sharing the listeners", dict(_SUP, reload=False)),
    ("BeTheUser", t.Str(), None, "A", "user to run as once the ports are bound", dict(_SUP, reload=False)),
    ("BeTheGroup", t.Str(), None, "A", "group to run as once the ports are bound", dict(_SUP, reload=False)),
    ("ShutdownGrace", t.Int(min=0), 5, "A",
     "mmproxy extension: seconds relayed sessions get to finish when the daemon stops (listeners close at "
     "once, sessions before login get the protocol's goodbye at once, a relayed session quiet for 2 s is "
     "told at once); then IMAP * BYE / POP -ERR / SMTP 421 where it cannot cut a response in two, and a "
     "close. A second stop signal ends it at once", _SUP),
    ("MetricsAddress", t.HostPort(), None, "A",
     "mmproxy extension: host:port where Prometheus metrics are served over HTTP (every worker's figures "
     "added up); unset: no metrics endpoint", dict(_SUP, reload=False)),
)
_group(
    "Several proxies (a fleet)",
    ("InstanceName", t.Name(), None, "A",
     "mmproxy extension: this proxy's name among several (status, who, metrics, log lines of the fleet): "
     "1 to 64 letters, digits, '.', '-' or '_'; unset: the host name", dict(_SUP, reload=False)),
    ("StateRedisURL", t.RedisURL(), None, "A",
     "mmproxy extension: the Redis every proxy of a fleet shares ConnLimits counts, BadGuys sentences and "
     "POP-before-SMTP records through, and which carries flush, kick and --all requests to them all: "
     "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... for TLS, unix:///PATH (percent-encode # / ? @ : % "
     "in the password; no ?options); unset: the state stays in this box. "
     "While it does not answer, each process keeps its own state (one warning per change)",
     dict(_SUP, reload=False)),
    ("StateRedisPrefix", t.Str(), "mmproxy:", "A",
     "mmproxy extension: what every Redis key and channel of this fleet starts with", dict(_SUP, reload=False)),
    ("StateRedisCAFile", t.Path(must_exist="file"), None, "A",
     "mmproxy extension: PEM file of the CA certificates a rediss:// server's certificate must chain to "
     "(unset: the system's)", dict(_SUP, reload=False)),
)
_group(
    "Logging",
    ("LogDir", t.Path(), t.InstallPath("data/log"), "A I P S",
     "directory for the log files (ImapProxy_yyyymmdd.log...); default msg_svr_base/data/log", _SUP),
    ("LogLevel", t.Int(0, 10), 1, "A I P S",
     "log verbosity, 0 (least) to 10 (most): 0 errors only; 1 also warnings, each login and failed login with "
     "its cause, refusals; 2-4 also one line per session end (reason, state, user, store, duration, bytes), "
     "idle clients timed out and the directory's stale answers; 5-10 (all alike) also debugging detail "
     "(SMTP command and reply lines, bad commands, directory retries, tracebacks); no level logs a password, "
     "SASL response or store secret",
     _SUP),
)
_group(
    "Greeting and session",
    ("Banner", t.Str(), None, _IPS, "greeting text (default: product name and version)", _SUP),
    ("Capability", t.Capability(), None, "I",
     "CAPABILITY string shown to IMAP clients before login (default: mmproxy's own list); "
     "list only what every store supports", _SUP),
    ("ServerDownAlert", t.Str(), "Your IMAP server appears to be temporarily out of service.", "I",
     "[ALERT] text sent to IMAP clients when their store cannot be reached", _SUP),
    ("Timeout", t.Timeout(), 1800, _IPS,
     "idle seconds before a session is closed with the protocol's goodbye; before login (SMTP: before "
     "EHLO) the lower of this and LoginIdleTimeout (RFCs: IMAP 1800, POP/SMTP 600 at least)", _SUP),
    ("LoginTimeout", t.Int(min=1), t.PerService(imap=180, pop=180, smtp=300), _IPS,
     "mmproxy extension: seconds the whole dialogue before login may take (IMAP, POP: up to the login's answer; "
     "SMTP: up to the client's first EHLO/HELO), however the client trickles its bytes; then the protocol's "
     "goodbye (IMAP, POP: Dovecot's 3-minute login limit; SMTP: RFC 5321 4.5.3.2.7's 5 minutes)", _SUP),
    ("LoginIdleTimeout", t.Int(min=1), t.PerService(imap=60, pop=60, smtp=300), _IPS,
     "mmproxy extension: idle seconds allowed per read in that dialogue (the lower of this and Timeout; SMTP: "
     "RFC 5321 4.5.3.2.7 asks servers to wait at least 5 minutes for a command)", _SUP),
    ("HandshakeTimeout", t.Int(min=1), 30, _IPS,
     "mmproxy extension: seconds a whole TLS handshake may take (implicit TLS, STARTTLS/STLS, and towards an "
     "SMTP relay); the client is then disconnected; before login it also ends when LoginTimeout does", _SUP),
    ("StoreTimeout", t.Int(min=1), 30, "I P",
     "mmproxy extension: seconds the store may take for its part of a login, in all: connect, greeting, "
     "telling it the client, the login's answer; then the client is told the store is unavailable", _SUP),
    ("SmtpMessageTimeout", t.Int(min=1), 1800, "S",
     "mmproxy extension: seconds the text of one message may take (DATA, or the BDAT chunks of one message); "
     "then 421 and the connection closes", _SUP),
)
_group(
    "Directory (LDAP)",
    ("LdapURL", t.LdapURLType(), "ldap://localhost/o=internet", "I P",
     "directory URL: ldap[s]://host[:port][ host2[:port]...]/BASE, several hosts tried in order (a host that "
     "fails is skipped until it answers again); quote it when it holds a blank. ldaps:// is TLS from the first "
     "byte; ldap://HOST/BASE????!StartTLS (RFC 4516 extension) asks for StartTLS, never skipped. The "
     "certificate is verified (LdapCAFile)", dict(_VD, honoured_in="S")),
    ("LdapCAFile", t.Path(must_exist="file"), None, "I P",
     "mmproxy extension: PEM file of the CA certificates the directory's certificate must chain to (ldaps:// "
     "or StartTLS); unset: the system's (/etc/ldap/ldap.conf TLS_CACERT)", dict(_SUP, honoured_in="S")),
    ("BindDN", t.DN(), None, "I P", "DN to bind as for searches", dict(_VD, honoured_in="S")),
    ("BindPass", t.Str(), None, "I P", "password of BindDN", dict(_VD, honoured_in="S")),
    ("LdapCacheSize", t.Int(min=0), 10000, "I P", "entries in the user lookup cache", _VD),
    ("LdapCacheTTL", t.Int(min=0), 900, "I P", "seconds a user lookup stays cached", _VD),
    ("LdapNegativeCacheTTL", t.Int(min=0), 60, "I P",
     "mmproxy extension: seconds an unknown user or domain is remembered, so a flood of logins for one "
     "unknown name reaches the directory once per this time (0: not remembered)", _SUP),
    ("LdapStaleGrace", t.Int(min=0), 3600, "I P",
     "mmproxy extension: seconds past LdapCacheTTL (and AuthCacheTTL) that a cached user lookup (and PreAuth "
     "result) is still used while no directory host answers (0: never; nor from a cache whose TTL is 0); the "
     "cache holds no more entries for it",
     _SUP),
    ("LdapRefreshInterval", t.Int(min=0), 2100, "I P", "seconds before an LDAP connection is reopened", _SUP),
)
_group(
    "Users and domains",
    ("HostedDomains", t.Bool(), "yes", "I P",
     "yes: hosted domains (a DC tree, or Schema 2 organisations: option.dat); no: one flat user tree "
     "under LdapURL", _VD),
    ("DefaultDomain", t.Str(), None, "I P", "domain appended to user ids given without one",
     _VD),
    ("VirtualDomainDelim", t.Str(), "@", "I P",
     "characters accepted between user id and domain (searched from the end; the legacy manual's "
     "vdmap list calls it DomainDelim)", _VD),
    ("CanonicalVirtualDomainDelim", t.Str(length=1), "@", "I P",
     "delimiter used towards LDAP and the store", _SUP),
    ("SearchFormat", t.Format("osUVCSD", filter=True), t.IfParam("HostedDomains", "uid=%U", "uid=%s"), "I P",
     "user search filter: %o login as typed, %s user+domain, %U user, %V domain, %C client IP, "
     "%S server IP, %D client certificate DN", _VD),
    ("MailHostAttrs", t.Words(), "mailHost", "I P",
     "attributes naming the user's store, tried in order", _VD),
    ("UserGroupDN", t.DN(), None, "I P",
     "base DN of domain and user searches in Schema 2 (LDAP_SCHEMALEVEL 2 in option.dat) and of certificate "
     "mapping searches (CertmapFile); default: the LdapURL base", _VD),
    ("CertMapDN", t.DN(), None, "I P", "old name of UserGroupDN (UserGroupDN takes precedence); the legacy "
     "manual's vdmap list calls it CertMap", dict(_VD, obsolete="UserGroupDN")),
    ("VirtualDomainFile", t.Path(must_exist="file"), None, _IPS,
     "vdmap.cfg: per-server-address settings (`vdmap NAME IP`, then `NAME:Param value` lines)", _SUP),
)
_group(
    "Authentication",
    ("PreAuth", t.Bool(), "no", "I P", "authenticate against LDAP before contacting the store",
     _VD),
    ("AuthCacheSize", t.Int(min=0), 10000, "I P", "entries in the PreAuth result cache", _VD),
    ("AuthCacheTTL", t.Int(min=0), 900, "I P", "seconds a PreAuth result stays cached", _VD),
    ("RestrictPlainPasswords", t.Bool(), "no", _IPS, "refuse plaintext passwords until TLS is active",
     dict(_SUP, per_domain=True, security=True)),
    ("CRAMs", t.Bool(), "no", "I P", "APOP and CRAM-MD5 (needs clear-text userPassword readable by BindDN)", _VD),
    ("AuthenticationServer", t.HostPort(), None, "I P",
     "host:port of a third-party authentication server that checks plain-text passwords instead of an LDAP "
     "bind and may rewrite the user id replayed to the store; ignored unless PreAuth is on; on this machine "
     "(the protocol is not encrypted): docs/authentication-server.md", _SUP),
    ("AuthenticationLdapAttributes", t.Words(), "", "I P",
     "attributes of the user's entry (read in the user's own search) sent to the AuthenticationServer with "
     "their values", _SUP),
    ("AuthenticationServerTimeout", t.Int(min=1), 10, "I P",
     "mmproxy extension: seconds a whole AuthenticationServer exchange may take (connect, request, answer); "
     "then the login gets the temporary failure", _SUP),
    ("CertmapFile", t.Path(must_exist="file"), None, _IPS,
     "certmap.conf: maps a client certificate to a user (`certmap NAME ISSUERDN`, `NAME:DNComps`, "
     "`NAME:FilterComps`, `NAME:VerifyCert`, `NAME:CmapLdapAttr`) for IMAP AUTHENTICATE EXTERNAL and POP "
     "AUTH EXTERNAL; needs SSLClientCAFile, StoreAdmin and StoreAdminPass",
     dict(_SUP, security=True)),
)
_group(
    "Store",
    ("BacksidePort", t.PORT, t.PerService(imap=143, pop=110), "I P", "store port", _SUP),
    ("ReplayFormat", t.Format("UVso", attr=True), "%U", "I P",
     "login id replayed to the store: %U user, %V domain, %A[attr] user attribute, %s user+domain, "
     "%o login as typed", _VD),
    ("StoreAdmin", t.Str(), None, "I P",
     "store administrator for proxy authorization: certificate logins reach the store as SASL PLAIN with "
     "authzid=<user>, authcid=StoreAdmin (a Dovecot master user)", _VD),
    ("StoreAdminPass", t.Str(), None, "I P", "password of StoreAdmin", _VD),
    ("MaxConcurrentConnectionAttempts", t.Int(min=1), 32, "I P",
     "connection attempts (from the connect to the store's greeting) allowed at once per store host:port, "
     "counted in each worker process; a login beyond them gets the store-down reply at once (Messaging "
     "Server 7u3; default 10 until 7.0.5, then 32)", _SUP),
    ("SpoofEmptyMailbox", t.Bool(), "off", "P", "store down: show an empty POP mailbox", _SUP),
    ("SpoofMessageFile", t.Path(must_exist="file"), None, "P",
     "store down: show a POP mailbox holding this one RFC 822 message", _SUP),
)
_group(
    "Access control and limits",
    ("TCPAccess", t.AccessFilter(), None, _IPS,
     "access filter checked at connect, before the greeting: +|-service,...:client ... [EXCEPT client ...] "
     "rules separated by $ (Messaging Server syntax; README, Access filters), or the absolute name of a "
     "file of rules", dict(_SUP, per_domain=True, security=True)),
    ("TCPAccessAttr", t.Str(), "mailAllowedServiceAccess", "I P",
     "user attribute holding a per-user access filter, checked after the directory lookup, before the "
     "store is contacted (empty: none)", _SUP),
    ("ClientLookup", t.Bool(), "no", _IPS,
     "reverse DNS lookup of every client; SMTP tells the relay the forward-confirmed name (XCLIENT NAME, "
     "else [UNAVAILABLE]); no benefit for IMAP and POP, as the legacy manual says",
     _VD),
    ("ConnLimits", t.ConnLimits(), "0.0.0.0|0.0.0.0:20", _IPS,
     "simultaneous connections per client address: IP|MASK:NUM,... or a file, most specific first "
     "(counted for all worker processes together)", _SUP),
    ("BGMax", t.Int(min=0), 10000, "I P", "BadGuys: how many failing client addresses are remembered (the "
     "oldest last failure forgotten first)", _BG),
    ("BGPenalty", t.Int(min=0), 2, "I P", "BadGuys: seconds added to an address's delay per authentication failure",
     _BG),
    ("BGMaxBadness", t.Int(min=0), 60, "I P", "BadGuys: longest delay in seconds", _BG),
    ("BGDecay", t.Int(min=0), 900, "I P", "BadGuys: seconds after the last failure until the delay is forgiven", _BG),
    ("BGLinear", t.Bool(), "no", "I P", "BadGuys: the delay falls linearly to 0 over BGDecay (no: all at once "
     "when BGDecay has passed)", _BG),
    ("BGExcluded", t.Networks(), "", "I P", "BadGuys: client IP|MASK pairs never penalised, or a file of them", _BG),
    ("SmtpBadGuys", t.Bool(), "no", "S", "mmproxy extension: BadGuys for SMTP AUTH too (a relay's 535 counts as a "
     "failure; the BG parameters of SmtpProxyAService.cfg apply); the legacy feature does not cover SMTP", _SUP),
)
_group(
    "POP before SMTP",
    ("AuthService", t.Bool(), "no", "P",
     "answer XQUERYAUTH about logged-in clients; enable it per virtual domain, not globally",
     _VD),
    ("AuthServiceTTL", t.Int(min=-1), -1, "P",
     "seconds a verified POP login is remembered for POP before SMTP (-1: off)", _SUP),
    ("PopBeforeSmtpKludgeChannel", t.Str(), None, "S",
     "set (to any channel name; legacy: tcp_intranet) to tell the relay that a client with a fresh POP login "
     "is authenticated (XCLIENT LOGIN=<user>; Postfix: smtpd_sasl_auth_enable and permit_sasl_authenticated)",
     _SUP),
)
_group(
    "SMTP relay",
    ("SmtpRelays", t.HostPorts(25), "", "S",
     "relays used round robin: host[:port] ...; each must offer XCLIENT to the proxy (Postfix "
     "smtpd_authorized_xclient_hosts) or take the PROXY protocol (mandatory when ServiceList names SMTP)", _SUP),
    ("SmtpProxyPassword", t.Str(), None, "S",
     "PROXY_PASSWORD of the legacy Messaging Server MTA; read for compatibility, never sent (relays learn the "
     "client by XCLIENT or the PROXY protocol; mandatory when ServiceList names SMTP)", _SUP),
    ("EhloKeywords", t.Words(), "", "S",
     "EHLO keywords a relay offers that clients may see besides those mmproxy passes itself (README, SMTP: "
     "since 0.2 also DSN, SMTPUTF8 and CHUNKING); BINARYMIME, XCLIENT, XFORWARD are never passed", _SUP),
    ("FailoverTimeout", t.Int(min=0), 10, "S",
     "seconds to wait for a relay to accept and greet; a failed relay is then avoided as many minutes", _SUP),
    ("ProxyProtocolPorts", t.Endpoints(), (), _IPS,
     "mmproxy extension: [IP:]PORT|... (ServiceList listeners) where every connection starts with a PROXY "
     "protocol v1 or v2 header from a load balancer in ProxyProtocolFrom, naming the client: its address is "
     "then the client's everywhere (ConnLimits, BadGuys, access filters, logs, what stores and relays are "
     "told); a connection from elsewhere, or without a header, is refused; a v2 header saying the balancer "
     "took the client's TLS counts as TLS. Read within HandshakeTimeout, before TLS on SSLPorts ports",
     dict(_SUP, security=True)),
    ("ProxyProtocolFrom", t.Networks(hosts=True), "", _IPS,
     "mmproxy extension: the load balancers' addresses (IP, IP/LEN or IP|MASK, comma or blank separated, or "
     "a file of them) whose PROXY headers ProxyProtocolPorts believes", dict(_SUP, security=True)),
    ("SmtpRelayProxyProtocol", t.Int(0, 2), 0, "S",
     "mmproxy extension: 1 or 2 sends a PROXY protocol v1/v2 header naming the client to each relay (Postfix "
     "smtpd_upstream_proxy_protocol = haproxy); 0: XCLIENT only", _SUP),
)
_group(
    "TLS",
    ("SSLEnable", t.Bool(), "no", _IPS, "offer STARTTLS/STLS; required for SSLPorts", dict(_SUP, security=True)),
    ("SSLPorts", t.Endpoints(), (), _IPS, "[IP:]PORT|... where TLS starts on accept (must also be in ServiceList)",
     dict(_SUP, security=True)),
    ("SSLCacheDir", t.Path(must_exist="dir"), None, _IPS,
     "directory holding the certificate files <SSLCertPrefix><nickname>.pem or .p12", dict(_SUP, security=True)),
    ("SSLCertPrefix", t.Str(), "", _IPS, "file-name prefix of the certificate files in SSLCacheDir",
     dict(_SUP, security=True)),
    ("SSLCertNicknames", t.Words(), "", _IPS, "certificate name(s) to present (legacy value: Server-Cert)",
     dict(_SUP, security=True)),
    ("SSLCertFile", t.Path(must_exist="file", nss_check=True), None, _IPS,
     "a PEM or PKCS#12 certificate file (superseded by SSLCertPrefix)",
     dict(_SUP, security=True, obsolete="SSLCertPrefix")),
    ("SSLKeyFile", t.Path(must_exist="file", nss_check=True), None, _IPS,
     "private key file, when not in the certificate file", dict(_SUP, security=True)),
    ("SSLKeyPasswdFile", t.Path(must_exist="file"), t.InstallPath("config/sslpassword.conf"), _IPS,
     "key password(s), lines `Internal (Software) Token:secret`; the default file may be absent",
     dict(_SUP, security=True)),
    ("SSLCipherSpecs", t.Ciphers(), "all", _IPS, "all (a modern default) or an OpenSSL cipher string",
     dict(_SUP, security=True)),
    ("SSLSecmodFile", t.NotUsed("hardware crypto modules are an NSS feature; mmproxy uses OpenSSL"), None,
     _IPS, "NSS security module list (accepted, not used)", dict(_SUP, security=True)),
    ("SSLBacksidePort", t.Int(0, 65535), None, "I P",
     "store port reached with TLS from the first byte (993, 995) instead of BacksidePort; unset or 0: "
     "plaintext to the store. The store's certificate is verified only with SSLBacksideCAFile",
     dict(_SUP, security=True)),
    ("SSLBacksideCAFile", t.Path(must_exist="file"), None, "I P",
     "mmproxy extension: PEM file of the CA certificates the stores' certificates must chain to; set, "
     "SSLBacksidePort connections verify the certificate and that it names the store (its mailHost); "
     "unset, they are not verified (as the legacy product)", dict(_SUP, security=True)),
    ("SSLClientCAFile", t.Path(must_exist="file"), None, "I P",
     "mmproxy extension: PEM file of the CA certificates client certificates must chain to; set (with "
     "CertmapFile), TLS clients are asked for a certificate (not required)", dict(_SUP, security=True)),
    ("SSLMinVersion", t.TLSVersion(), "TLSv1.2", _IPS,
     "mmproxy extension: the lowest TLS version accepted from clients and used with stores and relays "
     "(TLSv1, TLSv1.1, TLSv1.2, TLSv1.3); below TLSv1.2 only for clients that cannot do better, knowingly",
     dict(_SUP, security=True)),
)

PARAMS: Dict[str, Param] = {p.key: p for p in _ALL}


def lookup(name: str) -> Optional[Param]:
    """The parameter called ``name`` in any case, or None."""
    return PARAMS.get(name.strip().lower())


def suggest(name: str) -> Optional[str]:
    """The closest known name, for "did you mean" hints."""
    close = difflib.get_close_matches(name.lower(), PARAMS, n=1, cutoff=0.75)
    return PARAMS[close[0]].name if close else None


def support_problem(p: Param, value: Any) -> Optional[Tuple[str, str]]:
    """(severity, message) for an explicitly set parameter mmproxy does not implement yet.

    An access control that would be dropped is an error: a migrated security setting never
    silently stops working.  Setting it to its (inactive) default is harmless.
    """
    if p.supported:
        return None
    if p.security and value != p.default:
        return ("error", "%s is recognised, not supported yet; mmproxy refuses to start rather than drop "
                         "this access control" % p.name)
    return ("warning", "%s is recognised, not supported yet: ignored" % p.name)
