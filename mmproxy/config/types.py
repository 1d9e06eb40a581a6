"""Value types of the legacy parameters.

Each type turns the raw text of a ``.cfg`` value into a Python value (``convert``, raising
``ValueError`` with a short reason) and turns a default back into legacy text (``render``), so the
registry, the reader, the templates and the docs agree on one syntax per parameter.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, List, NamedTuple, Optional, Tuple
from urllib.parse import unquote, urlsplit

from mmproxy import access
from mmproxy.addresses import is_host_name
from mmproxy.config import kinds

NSS_FILES = ("cert8.db", "key3.db", "cert9.db", "key4.db")


@dataclass
class Ctx:
    """What a conversion needs beyond the text: where relative paths start, which service reads it,
    and where warnings (a value that works but deserves a word) go."""

    config_dir: str = ""
    service: Optional[str] = None          # "imap", "pop", "smtp"; None for AService.cfg
    warnings: List[str] = field(default_factory=list)
    column: int = 0                        # of the value in its line (1-based), for messages; 0: unknown

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def path(self, raw: str) -> str:
        """Absolute paths as given; relative ones from the config directory (a daemon may chdir)."""
        if os.path.isabs(raw) or not self.config_dir:
            return raw
        return os.path.normpath(os.path.join(os.path.abspath(self.config_dir), raw))


class Type:
    """Base converter: text in, text out."""

    name = "text"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> Any:
        return raw

    def render(self, value: Any) -> str:
        return "" if value is None else str(value)


# --- defaults that can only be known at load time -------------------------------------------------

class Deferred:
    """A default computed at load time from the config directory, the service or another parameter."""

    def resolve(self, get: Callable[[str], Any], ctx: Ctx) -> Any:
        raise NotImplementedError

    def render(self, code: Optional[str] = None) -> str:
        """Text for the template of file ``code`` ("A", "I", "P", "S"), or for the docs when None."""
        raise NotImplementedError


class InstallPath(Deferred):
    """A path under the legacy install root: ``msg_svr_base/config`` and ``msg_svr_base/data``
    sat side by side, so ``msg_svr_base`` is the config directory's parent."""

    def __init__(self, rel: str):
        self.rel = rel

    def resolve(self, get: Callable[[str], Any], ctx: Ctx) -> str:
        return os.path.normpath(os.path.join(os.path.abspath(ctx.config_dir or "."), "..", self.rel))

    def render(self, code: Optional[str] = None) -> str:
        return "../" + self.rel


class PerService(Deferred):
    """A default that differs per service (BacksidePort 143 for IMAP, 110 for POP)."""

    def __init__(self, **by_kind: Any):
        self.by_kind = by_kind

    def resolve(self, get: Callable[[str], Any], ctx: Ctx) -> Any:
        return self.by_kind.get(ctx.service or "")

    def render(self, code: Optional[str] = None) -> str:
        kind = kinds.BY_CODE.get(code or "")
        if kind is not None and kind.name in self.by_kind:
            return str(self.by_kind[kind.name])
        return " / ".join("%s (%s)" % (v, k.upper()) for k, v in self.by_kind.items())


class IfParam(Deferred):
    """A default chosen by a boolean parameter (SearchFormat follows HostedDomains)."""

    def __init__(self, name: str, yes: Any, no: Any):
        self.name, self.yes, self.no = name, yes, no

    def resolve(self, get: Callable[[str], Any], ctx: Ctx) -> Any:
        return self.yes if get(self.name) else self.no

    def render(self, code: Optional[str] = None) -> str:
        if code:
            return str(self.yes)
        return "%s (%s yes) / %s (%s no)" % (self.yes, self.name, self.no, self.name)


# --- scalars ----------------------------------------------------------------------------------------

class Bool(Type):
    name = "boolean"
    TRUE = ("yes", "on", "true", "1")
    FALSE = ("no", "off", "false", "0")

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> bool:
        word = raw.strip().lower()
        if word in self.TRUE:
            return True
        if word in self.FALSE:
            return False
        raise ValueError("not a boolean (use yes/no, on/off, true/false or 1/0)")

    def render(self, value: Any) -> str:
        return "yes" if value else "no"


class Int(Type):
    def __init__(self, min: Optional[int] = None, max: Optional[int] = None):
        self.min, self.max = min, max

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.min == 1 and self.max == 65535:
            return "port"
        if self.min is not None and self.max is not None:
            return "integer %d-%d" % (self.min, self.max)
        if self.min is not None:
            return "integer >= %d" % self.min
        return "integer"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> int:
        text = raw.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError("not a whole number")
        value = int(text)
        if self.min is not None and self.max is not None and not self.min <= value <= self.max:
            raise ValueError("must be between %d and %d" % (self.min, self.max))
        if self.min is not None and value < self.min:
            raise ValueError("must be at least %d" % self.min)
        return value


PORT = Int(1, 65535)


class Timeout(Int):
    """Idle seconds; below what the protocol's RFC asks for is legal but warned, as the seed says."""

    MINIMUM = {"imap": (1800, "RFC 3501/9051 ask for at least 30 minutes"),
               "pop": (600, "RFC 1939 asks for at least 10 minutes"),
               "smtp": (600, "the legacy product required at least 10 minutes (RFC 5321 section 4.5.3.2)")}

    def __init__(self) -> None:
        super().__init__(min=1)

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> int:
        value = super().convert(raw, ctx)
        if ctx and ctx.service in self.MINIMUM:
            least, why = self.MINIMUM[ctx.service]
            if value < least:
                ctx.warn("Timeout %d is below %d seconds: %s; idle clients may be cut off" % (value, least, why))
        return value


class Str(Type):
    def __init__(self, length: Optional[int] = None):
        self.length = length
        if length:
            self.name = "%d character%s" % (length, "s" if length > 1 else "")

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        if self.length and len(raw) != self.length:
            raise ValueError("must be exactly %s" % self.name)
        return raw


_ATTR = r"(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)*)"
_RDN = re.compile(r"\s*%s\s*=.*" % _ATTR, re.S)


def check_dn(dn: str) -> str:
    """A light RFC 4514 check: comma-separated attr=value pairs (escaped commas allowed)."""
    if not dn.strip():
        return dn
    for rdn in re.split(r"(?<!\\),", dn):
        for ava in re.split(r"(?<!\\)\+", rdn):
            if not _RDN.fullmatch(ava):
                raise ValueError("%r is not a DN component (attr=value)" % ava.strip())
    return dn


class DN(Type):
    name = "DN"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        return check_dn(raw)


class Path(Type):
    """A file or directory.  ``must_exist`` makes an unreadable one an error; NSS databases are
    refused with the export recipe, since Python has no NSS reader."""

    name = "path"

    def __init__(self, must_exist: Optional[str] = None, nss_check: bool = False):
        self.must_exist, self.nss_check = must_exist, nss_check

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        ctx = ctx or Ctx()
        path = ctx.path(raw.strip())
        if self.nss_check and os.path.basename(path).lower() in NSS_FILES:
            raise ValueError(
                "%s is an NSS database, which mmproxy cannot read: export the certificate and key with "
                "`pk12util -o server.p12 -n Server-Cert -d %s` and point SSLCacheDir/SSLCertPrefix (or "
                "SSLCertFile/SSLKeyFile) at the PEM or PKCS#12 file" % (path, os.path.dirname(path) or "."))
        if self.must_exist == "file" and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ValueError("cannot read file %s" % path if os.path.exists(path) else "%s does not exist" % path)
        if self.must_exist == "dir" and not (os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK)):
            raise ValueError("cannot read directory %s" % path if os.path.exists(path)
                             else "directory %s does not exist" % path)
        return path


class NotUsed(Path):
    """Accepted so that legacy files load, but has no effect in mmproxy: says so."""

    def __init__(self, why: str):
        super().__init__()
        self.why = why

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        ctx = ctx or Ctx()
        ctx.warn("not used: %s" % self.why)
        return super().convert(raw, ctx)


class Words(Type):
    name = "words"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> Tuple[str, ...]:
        return tuple(raw.split())

    def render(self, value: Any) -> str:
        return " ".join(value or ())


# --- addresses --------------------------------------------------------------------------------------

class Endpoint(NamedTuple):
    """host "" means every local address."""

    host: str
    port: int

    def __str__(self) -> str:
        if not self.host:
            return str(self.port)
        return ("[%s]:%d" if ":" in self.host else "%s:%d") % (self.host, self.port)


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("%r is not an IP address" % text) from None


def parse_endpoint(text: str) -> Endpoint:
    """``PORT``, ``IP:PORT`` or ``[IPv6]:PORT``."""
    m = re.fullmatch(r"\[([^\]]*)\]:(.*)", text)
    if m:
        host, port = _ip(m.group(1)), m.group(2)
    elif text.count(":") > 1:
        raise ValueError("%r: write IPv6 addresses in brackets, e.g. [::1]:993" % text)
    elif ":" in text:
        host, port = text.split(":")
        host = _ip(host)
    else:
        host, port = "", text
    try:
        return Endpoint(host, PORT.convert(port))
    except ValueError as e:
        raise ValueError("%r: port %s" % (text, e)) from None


class Endpoints(Type):
    """``[IP:]PORT|[IP:]PORT...``; empty items are skipped (the seed's own example reads "993|")."""

    name = "[IP:]PORT|..."

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> Tuple[Endpoint, ...]:
        items = [i.strip() for i in raw.split("|") if i.strip()]
        if not items:
            raise ValueError("no [IP:]PORT given")
        return tuple(parse_endpoint(i) for i in items)

    def render(self, value: Any) -> str:
        return "|".join(str(e) for e in value or ())


def _host(text: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        return _ip(text[1:-1])
    if not is_host_name(text):
        raise ValueError("%r is not a host name or address" % text)
    return text


def parse_hostport(text: str, default_port: Optional[int]) -> Endpoint:
    m = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+)(?::(.*))?", text)
    if not m:
        raise ValueError("%r is not host[:port]" % text)
    host = _host(m.group(1))
    if m.group(2) is None:
        if default_port is None:
            raise ValueError("%r: a port is required (host:port)" % text)
        return Endpoint(host, default_port)
    try:
        return Endpoint(host, PORT.convert(m.group(2)))
    except ValueError as e:
        raise ValueError("%r: port %s" % (text, e)) from None


class HostPorts(Type):
    """``host[:port] ...`` (SmtpRelays); a missing port means ``default_port``."""

    name = "host[:port] ..."

    def __init__(self, default_port: int):
        self.default_port = default_port

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> Tuple[Endpoint, ...]:
        return tuple(parse_hostport(i, self.default_port) for i in raw.split())

    def render(self, value: Any) -> str:
        return " ".join(h if p == self.default_port else "%s:%d" % (h, p) for h, p in value or ())


class HostPort(Type):
    """One ``host:port`` (AuthenticationServer); the port is required."""

    name = "host:port"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> Endpoint:
        return parse_hostport(raw.strip(), None)

    def render(self, value: Any) -> str:
        return "" if value is None else "%s:%d" % value


# --- ServiceList ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServiceSpec:
    """One ServiceList entry: which service, which .cfg file (``instance``), which section, which ports."""

    kind: str                    # "imap", "pop" or "smtp"
    library: str                 # as written (only its basename matters)
    instance: str                # the .cfg file is <instance>.cfg
    section: str                 # legacy instance section, normally "default"
    listeners: Tuple[Endpoint, ...]

    @property
    def filename(self) -> str:
        return self.instance + ".cfg"

    def __str__(self) -> str:
        name = self.instance + ("" if self.section == "default" else ":" + self.section)
        tail = "" if name == _basename(self.library) else "|" + name
        return "%s%s@%s" % (self.library, tail, Endpoints().render(self.listeners))


def _basename(library: str) -> str:
    base = re.split(r"[/\\]", library)[-1]
    return re.sub(r"\.(so|dll|sl|dylib)$", "", base, flags=re.I)


class ServiceList(Type):
    """``DLLPATH[|INSTANCE[:SECTION]]@[IP:]PORT|...`` entries separated by blanks."""

    name = "DLLPATH[|INSTANCE]@[IP:]PORT|... ..."

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> Tuple[ServiceSpec, ...]:
        specs = tuple(self._entry(e) for e in raw.split())
        if not specs:
            raise ValueError("names no service")
        return specs

    @staticmethod
    def _entry(text: str) -> ServiceSpec:
        if "@" not in text:
            raise ValueError("%r: no @[IP:]PORT after the service" % text)
        lib_part, ports = text.rsplit("@", 1)
        library, _, instance = lib_part.partition("|")
        base = _basename(library)
        known = kinds.BY_FILE.get(base.lower())
        if known is None:
            raise ValueError("%r names no known service (known: %s)"
                             % (base or text, ", ".join(k.file for k in kinds.SERVICES.values())))
        kind = known.name
        instance, _, section = (instance or base).partition(":")
        if not instance:
            raise ValueError("%r: empty instance name after |" % text)
        try:
            listeners = Endpoints().convert(ports)
        except ValueError as e:
            raise ValueError("%r: %s" % (text, e)) from None
        return ServiceSpec(kind, library, instance, section or "default", listeners)

    def render(self, value: Any) -> str:
        return " ".join(str(s) for s in value)


# --- LDAP -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LdapURL:
    """``ldap[s]://host[:port][ host2[:port]...]/BASE``: several hosts mean failover, in order."""

    scheme: str                          # "ldap" or "ldaps"
    hosts: Tuple[Endpoint, ...]
    base: str
    starttls: bool = False               # the StartTLS extension (RFC 4516 section 2; OID of RFC 4511 4.14)

    def urls(self) -> List[str]:
        """One URL per host, without the base (what ldap.initialize() takes)."""
        return ["%s://%s" % (self.scheme, ("[%s]:%d" if ":" in h else "%s:%d") % (h, p)) for h, p in self.hosts]

    def __str__(self) -> str:
        default = 636 if self.scheme == "ldaps" else 389
        hosts = " ".join((("[%s]" if ":" in h else "%s") % h) + ("" if p == default else ":%d" % p)
                         for h, p in self.hosts)
        return "%s://%s/%s%s" % (self.scheme, hosts, self.base, "????!StartTLS" if self.starttls else "")


# RFC 4516 extension names for "StartTLS first" (the extended operation's OID, RFC 4511 section 4.14.1,
# and the names OpenLDAP-era tools and ldap3 give it); a leading "!" (critical) changes nothing: StartTLS
# is never skipped once asked for
STARTTLS_EXTENSIONS = frozenset({"starttls", "x-starttls", "1.3.6.1.4.1.1466.20037"})


class LdapURLType(Type):
    name = "LDAP URL"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> LdapURL:
        m = re.fullmatch(r"\s*(ldaps?)://([^/]*)(?:/(.*))?", raw, re.I | re.S)
        if not m:
            raise ValueError("not an ldap:// or ldaps:// URL")
        scheme = m.group(1).lower()
        base, *fields = (m.group(3) or "").strip().split("?")
        if len(fields) > 4 or any(f.strip() for f in fields[:3]):
            raise ValueError("give the base DN only (attributes, scope and filter come from SearchFormat); the "
                             "one extension understood is StartTLS: ldap://HOST/BASE????!StartTLS")
        starttls = False
        for ext in (fields[3].split(",") if len(fields) == 4 else []):
            name = ext.strip().lstrip("!").strip().lower()
            if name in STARTTLS_EXTENSIONS:
                starttls = True
            elif name:
                raise ValueError("unknown LDAP URL extension %r (understood: StartTLS)" % ext.strip())
        if starttls and scheme == "ldaps":
            raise ValueError("StartTLS on an ldaps:// URL: the connection is TLS already; use one or the other")
        hosts = m.group(2).split()
        if not hosts:
            raise ValueError("no host in the URL")
        port = 636 if scheme == "ldaps" else 389
        return LdapURL(scheme, tuple(parse_hostport(h, port) for h in hosts), check_dn(unquote(base.strip())),
                       starttls)

    def render(self, value: Any) -> str:
        return str(value)


class Name(Type):
    """A name of letters, digits, dots, hyphens and underscores (InstanceName)."""

    name = "name"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        text = raw.strip()
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
            raise ValueError("%r: 1 to 64 letters, digits, '.', '-' or '_'" % text[:80])
        return text


class RedisURL(Type):
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://...`` (TLS) or ``unix:///PATH``;
    errors never repeat the password."""

    name = "redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB] or unix:///PATH"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        text = raw.strip()
        try:
            u = urlsplit(text)
            port = u.port if u.scheme != "unix" else None
        except ValueError:
            raise ValueError("not a URL with a valid port") from None
        if u.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("the URL must start redis://, rediss:// (TLS) or unix://")
        if u.query or u.fragment or "?" in text or "#" in text:
            raise ValueError("no ?options or #fragment: mmproxy sets the timeouts and the TLS checks itself "
                             "(StateRedisCAFile for the CA)")
        if "@" in u.netloc and u.password is None:
            raise ValueError("a user without a password before the @ (the password is written :PASSWORD@)")
        if u.scheme == "unix":
            if not u.path.startswith("/"):
                raise ValueError("unix:// needs an absolute socket path")
            return text
        if not u.hostname:
            raise ValueError("no host in the URL")
        _host(u.hostname if ":" not in u.hostname else "[%s]" % u.hostname)
        if port == 0:
            raise ValueError("port 0")
        if u.path not in ("", "/") and not re.fullmatch(r"/\d{1,5}", u.path):
            raise ValueError("the path must be a database number (/0)")
        return text


# --- networks ---------------------------------------------------------------------------------------

Network = Any  # ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """``IP|MASK`` (or ``IP/MASK``, as the legacy manual writes BGExcluded pairs) with a dotted
    mask or a prefix length."""
    ip, sep, mask = text.partition("|")
    if not sep:
        ip, sep, mask = text.partition("/")
    if not sep:
        raise ValueError("%r is not IP|MASK" % text)
    try:
        return ipaddress.ip_network("%s/%s" % (ip.strip(), mask.strip()), strict=False)
    except ValueError:
        raise ValueError("%r is not IP|MASK" % text) from None


def _items_or_file(raw: str, ctx: Optional[Ctx], split: str) -> List[Tuple[str, str]]:
    """(where, item) pairs from an inline list, or from a file (one entry per line) if the value is a path."""
    text = raw.strip()
    if not text.startswith("/"):
        return [("", i.strip()) for i in re.split(split, text) if i.strip()]
    path = (ctx or Ctx()).path(text)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError("cannot read %s: %s" % (path, e.strerror)) from None
    return [("%s:%d: " % (path, n), line.strip()) for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _net_render(net: Network) -> str:
    return "%s|%s" % (net.network_address, net.netmask)


class ConnLimits(Type):
    """``IP|MASK:NUM,...`` or a file of such lines; kept most specific first whatever the order written."""

    name = "IP|MASK:NUM,... or file"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> Tuple[Tuple[Network, int], ...]:
        limits = []
        for where, item in _items_or_file(raw, ctx, r","):
            net, sep, num = item.rpartition(":")
            try:
                if not sep:
                    raise ValueError("%r is not IP|MASK:NUM" % item)
                limits.append((parse_network(net), Int(min=0).convert(num)))
            except ValueError as e:
                raise ValueError(where + str(e)) from None
        return tuple(sorted(limits, key=lambda lim: -lim[0].prefixlen))

    def render(self, value: Any) -> str:
        return ",".join("%s:%d" % (_net_render(n), k) for n, k in value or ())


class Networks(Type):
    """``IP|MASK`` pairs (comma or blank separated) or a file of them (BGExcluded)."""

    name = "IP|MASK ... or file"

    def __init__(self, hosts: bool = False) -> None:
        """``hosts``: a bare address is allowed too, meaning that one address."""
        self.hosts = hosts
        if hosts:
            self.name = "IP[/LEN] ... or file"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> Tuple[Network, ...]:
        nets = []
        for where, item in _items_or_file(raw, ctx, r"[,\s]+"):
            try:
                if self.hosts and "/" not in item and "|" not in item:
                    nets.append(ipaddress.ip_network(_ip(item.strip("[]"))))
                    continue
                nets.append(parse_network(item))
            except ValueError as e:
                raise ValueError(where + str(e)) from None
        return tuple(nets)

    def render(self, value: Any) -> str:
        return ",".join(_net_render(n) for n in value or ())


class AccessFilter(Type):
    """A Messaging Server access filter (mmproxy/access.py has the syntax), or the absolute name of
    a file of them: rules on as many lines as wanted (``$`` still separates rules on one line),
    blank lines and ``#`` comments skipped.  An error names the column at fault (in the file's
    line, for a file)."""

    name = "access filter or file"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> access.Filter:
        ctx = ctx or Ctx()
        if not raw.strip().startswith("/"):
            try:
                flt = access.parse(raw)
            except access.FilterSyntaxError as e:
                raise ValueError("column %d: %s" % ((ctx.column or 1) + e.offset, e.reason)) from None
        else:
            path = ctx.path(raw.strip())
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise ValueError("cannot read %s: %s" % (path, e.strerror)) from None
            rules: List[access.Rule] = []
            for n, line in enumerate(lines, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    try:
                        rules += access.parse_rules(line)
                    except access.FilterSyntaxError as e:
                        raise ValueError("%s:%d: column %d: %s" % (path, n, e.offset + 1, e.reason)) from None
            flt = access.Filter(tuple(rules), raw.strip(), path)
        if flt.names_users:
            ctx.warn("a user@host pattern names a user: the user is known only after login (mmproxy does no "
                     "RFC 931 ident lookup), so at connect time only ALL@host and UNKNOWN@host match")
        return flt

    def render(self, value: Any) -> str:
        return "" if value is None else value.text


# --- formats, capability, ciphers -------------------------------------------------------------------

class Format(Type):
    """A printf-style template whose escapes are checked here, so expansion never meets an unknown one."""

    name = "format"

    def __init__(self, letters: str, attr: bool = False, filter: bool = False):
        self.letters, self.attr, self.filter = letters, attr, filter

    def allowed(self) -> str:
        return " ".join(["%" + c for c in self.letters] + (["%A[attr]"] if self.attr else []) + ["%%"])

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        i = 0
        while i < len(raw):
            if raw[i] != "%":
                i += 1
                continue
            code = raw[i + 1:i + 2]
            if code == "":
                raise ValueError("ends with a lone %% (allowed: %s)" % self.allowed())
            if code == "A" and self.attr:
                m = re.match(r"\[([A-Za-z0-9;.-]+)\]", raw[i + 2:])
                if not m:
                    raise ValueError("%%A needs an attribute name in brackets, e.g. %%A[uid]")
                i += 2 + m.end()
                continue
            if code != "%" and code not in self.letters:
                raise ValueError("unknown escape %%%s (allowed: %s)" % (code, self.allowed()))
            i += 2
        if self.filter and raw.count("(") != raw.count(")"):
            raise ValueError("unbalanced parentheses in the filter")
        return raw


class Capability(Type):
    """The IMAP CAPABILITY string shown before login.  Store features in it are passed on as given,
    but they must hold for every store behind the proxy, so they are pointed out."""

    name = "capability list"
    PROXY_OWN = {"IMAP4", "IMAP4REV1", "IMAP4REV2", "STARTTLS", "LOGINDISABLED", "SASL-IR", "ID",
                 "LITERAL+", "LITERAL-", "ENABLE"}

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        store = [w for w in raw.split() if w.upper() not in self.PROXY_OWN and not w.upper().startswith("AUTH=")]
        if store and ctx:
            ctx.warn("Capability names store features (%s): honoured as given; make sure every store "
                     "behind mmproxy supports them" % " ".join(store))
        return raw


class TLSVersion(Type):
    """A TLS protocol version: TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3 (also written 1.2, tls1.2, TLSv1_2);
    the value is the canonical name.  Below TLSv1.2 (RFC 8996 deprecates 1.0 and 1.1) is warned."""

    name = "TLS version"
    VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        word = raw.strip().lower().replace("_", ".")
        for prefix in ("tlsv", "tls"):
            if word.startswith(prefix):
                word = word[len(prefix):]
                break
        word = {"1.0": "1", "10": "1", "11": "1.1", "12": "1.2", "13": "1.3"}.get(word, word)
        name = "TLSv" + word
        if name not in self.VERSIONS:
            raise ValueError("not a TLS version (use %s)" % ", ".join(self.VERSIONS))
        if ctx and self.VERSIONS.index(name) < 2:
            ctx.warn("%s is below TLSv1.2: RFC 8996 deprecates TLS 1.0 and 1.1; allow it only for clients that "
                     "cannot do better" % name)
        return name


class Ciphers(Type):
    """``all`` (a modern default) or an OpenSSL cipher string; names that select nothing are warned."""

    name = "cipher list"

    def convert(self, raw: str, ctx: Optional[Ctx] = None) -> str:
        text = raw.strip()
        if text.lower() == "all":
            return "all"
        import ssl  # not at import time: gevent must patch before ssl is imported

        def selects(spec: str) -> bool:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(spec)
                return True
            except ssl.SSLError:
                return False

        if not selects(text):
            raise ValueError("selects no cipher OpenSSL knows (use all, or an OpenSSL cipher string)")
        unknown = [t for t in re.split(r"[:,\s]+", text)
                   if t and t[0] not in "!-+@" and not selects(t)]
        if unknown and ctx:
            ctx.warn("SSLCipherSpecs: %s select%s no cipher OpenSSL knows: ignored"
                     % (" ".join(unknown), "s" if len(unknown) == 1 else ""))
        return text
