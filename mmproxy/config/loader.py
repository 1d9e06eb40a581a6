"""Load and check a legacy configuration directory.

``load_config`` reads AService.cfg, then the file of every ServiceList entry (and its
VirtualDomainFile), and returns typed values together with every problem found, each with its
file and line.  It never raises on a bad configuration: ``check-config`` prints the problems,
``start`` and ``refresh`` refuse to go on when there are errors.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from mmproxy.config import cfgfile, optiondat
from mmproxy.config.cfgfile import Entry, Problem, error, warning
from mmproxy.config.optiondat import MtaOptions
from mmproxy.config.params import FILE_NAMES, KIND_CODES, PARAMS, Param, lookup, suggest, support_problem
from mmproxy.config.types import Ctx, Deferred, Endpoint, Endpoints, ServiceList, ServiceSpec
from mmproxy.config.vdmap import VirtualDomains, read_vdmap

IMPLICIT_TLS_PORTS = {993: "IMAPS", 995: "POP3S", 465: "SMTPS"}
Where = Tuple[str, int]                 # file and line of a setting
Place = Tuple[str, Optional[int]]       # where to report a problem: a line, or the whole file


class ServiceConfig:
    """The typed values of one service file (or AService.cfg), defaults filled in.

    Read a value as an attribute named after the parameter, in any case (``cfg.PreAuth``,
    ``cfg.ldapurl``); a name the registry does not know raises AttributeError, so a typo in code
    fails loudly.  The object is immutable: ``override`` returns a new one.
    """

    def __init__(self, kind: Optional[str] = None, explicit: Optional[Mapping[str, Tuple[Any, Optional[Where]]]] = None,
                 config_dir: str = ""):
        object.__setattr__(self, "kind", kind)               # "imap", "pop", "smtp"; None: AService.cfg
        object.__setattr__(self, "_dir", config_dir)
        object.__setattr__(self, "_explicit", dict(explicit or {}))
        values = {k: v for k, (v, _) in self._explicit.items()}
        later = []
        for p in PARAMS.values():
            if p.key not in values:
                if isinstance(p.default, Deferred):
                    later.append(p)
                else:
                    values[p.key] = p.default
        ctx = Ctx(config_dir, kind)
        for p in later:   # after the plain values: a computed default may read them
            values[p.key] = p.default.resolve(lambda name: values[_param(name).key], ctx)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        p = None if name.startswith("_") else lookup(name)
        if p is None:
            raise AttributeError("%r is not a configuration parameter" % name)
        value = self._values[p.key]
        object.__setattr__(self, name, value)     # immutable: later reads skip the lookup
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ServiceConfig is read-only; use override()")

    def __repr__(self) -> str:
        return "<ServiceConfig %s: %d set>" % (self.kind or "AService", len(self._explicit))

    def is_set(self, name: str) -> bool:
        """True when a file (or an override) gave a value, even one equal to the default."""
        return _param(name).key in self._explicit

    def where(self, name: str) -> Optional[str]:
        """``file:line`` of the setting, or None for a default or an override."""
        loc = _location(self, name)
        return None if loc is None else "%s:%d" % loc

    def override(self, values: Mapping[str, Any]) -> "ServiceConfig":
        """A copy with ``values`` (name -> raw text or typed value) applied, e.g. per-domain settings
        from vdmap.cfg or LDAP; raw text is converted (ValueError when bad); "" leaves a value as is."""
        explicit = dict(self._explicit)
        for name, value in values.items():
            p = lookup(name)
            if p is None:
                raise ValueError("unknown parameter %r" % name)
            if isinstance(value, str):
                if value == "":
                    continue
                value = p.convert(value, Ctx(self._dir, self.kind))
            explicit[p.key] = (value, None)
        return ServiceConfig(self.kind, explicit, self._dir)


def _location(cfg: ServiceConfig, name: str) -> Optional[Where]:
    """(file, line) of a setting read from a file; None for a default or an override."""
    return cfg._explicit.get(_param(name).key, (None, None))[1]


def _place(cfg: ServiceConfig, name: str, file: str) -> Place:
    """Where to report a problem with a setting: its line, else the file that lacks it."""
    return _location(cfg, name) or (file, None)


def _param(name: str) -> Param:
    p = lookup(name)
    if p is None:
        raise AttributeError("%r is not a configuration parameter" % name)
    return p


@dataclass
class ServiceEntry:
    """One ServiceList entry with the settings of its file."""

    spec: ServiceSpec
    file: str
    cfg: ServiceConfig
    vdomains: Optional[VirtualDomains] = None
    mta: MtaOptions = field(default_factory=MtaOptions)    # option.dat: where domains and users are


@dataclass
class Config:
    """A configuration directory as loaded: AService.cfg, each ServiceList entry, every problem."""

    dir: str
    aservice: ServiceConfig
    services: List[ServiceEntry] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    mta: MtaOptions = field(default_factory=MtaOptions)    # option.dat beside the .cfg files

    @property
    def errors(self) -> List[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> List[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def load_config(config_dir: str, *, create_missing: bool = False) -> Config:
    """Read and check the configuration in ``config_dir``; never raises for a bad configuration.

    With ``create_missing``, a missing AService.cfg, and the file of each service ServiceList names,
    is created from its ``-def.cfg`` template (copied from mmproxy's own when the directory has none),
    as the legacy MMP did.
    """
    problems: List[Problem] = []
    path = os.path.join(config_dir, "AService.cfg")
    if create_missing:
        _create(config_dir, "AService", "A", problems)
    entries, found = cfgfile.read(path)
    problems += found
    if entries is None:
        return Config(config_dir, ServiceConfig(None, {}, config_dir), [], problems)
    aservice, failed = _settings(entries, "default", "A", None, config_dir, problems)
    mta, found = optiondat.read(config_dir)
    problems += found
    _unused_sections(entries, {"default"}, problems)
    # A bad entry is reported; the good ones are still loaded and checked (never the default instead).
    specs = _good_services(entries) if "servicelist" in failed else aservice.ServiceList
    sl_where = _place(aservice, "ServiceList", path)
    _check_listeners(specs, sl_where, problems)

    services: List[ServiceEntry] = []
    files: Dict[str, Optional[List[Entry]]] = {}
    sections: Dict[str, Set[str]] = {}
    for spec in specs:
        file = os.path.join(config_dir, spec.filename)
        if spec.instance not in files:
            if create_missing:
                _create(config_dir, spec.instance, KIND_CODES[spec.kind], problems)
            files[spec.instance], found = cfgfile.read(file)
            problems += found
        entries = files[spec.instance]
        if entries is None:
            services.append(ServiceEntry(spec, file, ServiceConfig(spec.kind, {}, config_dir), mta=mta))
            continue
        sections.setdefault(spec.instance, set()).add(spec.section.lower())
        if spec.section.lower() != "default" and not any(
                (e.section or "").lower() == spec.section.lower() for e in entries):
            problems.append(warning(file, None, "no %s: lines for ServiceList's %s|%s:%s: defaults apply"
                                    % (spec.section, spec.library, spec.instance, spec.section)))
        cfg, _ = _settings(entries, spec.section, KIND_CODES[spec.kind], spec.kind, config_dir, problems)
        _check_service(spec, file, cfg, sl_where, problems)
        _check_schema(spec, file, cfg, mta, problems)
        vdomains = None
        if cfg.VirtualDomainFile:
            vdomains, found = read_vdmap(cfg.VirtualDomainFile, config_dir=config_dir, service=spec.kind)
            problems += found
        services.append(ServiceEntry(spec, file, cfg, vdomains, mta))
    for instance, used in sections.items():
        _unused_sections(files[instance] or [], used, problems)
    return Config(config_dir, aservice, services, list(dict.fromkeys(problems)), mta)


def _good_services(entries: List[Entry]) -> Tuple[ServiceSpec, ...]:
    raw = [e.value for e in entries if (e.section or "default").lower() == "default" and e.key.lower() == "servicelist"]
    good = []
    for text in (raw[-1].split() if raw else []):
        try:
            good.append(ServiceList._entry(text))
        except ValueError:
            pass
    return tuple(good)


def summary(config: Config, more: Sequence[Problem] = ()) -> str:
    """One line: the services and their ports, and how many errors and warnings (those of the
    files and ``more``, e.g. the checks that need more than the files)."""
    def count(n: int, word: str) -> str:
        return "%d %s%s" % (n, word, "" if n == 1 else "s")
    problems = list(config.problems) + list(more)
    listed = ", ".join("%s on %s" % (s.spec.kind, Endpoints().render(s.spec.listeners)) for s in config.services)
    return "%s: %s%s, %s, %s" % (config.dir, count(len(config.services), "service"),
                                 " (%s)" % listed if listed else "",
                                 count(sum(p.severity == "error" for p in problems), "error"),
                                 count(sum(p.severity == "warning" for p in problems), "warning"))


# --- building one file's settings -------------------------------------------------------------------

def _settings(entries: List[Entry], section: str, code: str, kind: Optional[str], config_dir: str,
              problems: List[Problem]) -> Tuple[ServiceConfig, Set[str]]:
    """Convert one section of a file into a ServiceConfig, reporting what is wrong or unusual;
    also the keys whose value could not be used."""
    chosen, found = cfgfile.select(entries, section)
    problems += found
    legacy_file = ("an " if FILE_NAMES[code][0] in "AEIOU" else "a ") + FILE_NAMES[code] + ".cfg"
    explicit: Dict[str, Tuple[Any, Optional[Where]]] = {}
    failed: Set[str] = set()
    for e in chosen.values():
        p = lookup(e.key)
        if p is None:
            hint = suggest(e.key)
            problems.append(error(e.file, e.line, 'unknown parameter "%s"%s'
                                  % (e.key, ' (did you mean "%s"?)' % hint if hint else "")))
            continue
        if not p.honoured(code):
            problems.append(warning(e.file, e.line, "%s is not %s parameter in the legacy product; ignored"
                                    % (p.name, legacy_file)))
            continue
        if e.value == "":
            continue
        ctx = Ctx(config_dir, kind, column=e.column)
        try:
            value = p.convert(e.value, ctx)
        except ValueError as ex:
            problems.append(error(e.file, e.line, str(ex)))
            failed.add(p.key)
            continue
        problems += [warning(e.file, e.line, w) for w in ctx.warnings]
        explicit[p.key] = (value, (e.file, e.line))
        status = support_problem(p, value)
        if code not in p.files:
            if status is None:
                status = ("warning", "%s is not %s parameter in the legacy product; it is honoured"
                          % (p.name, legacy_file))
            elif status[0] == "warning":
                status = ("warning", "%s is not %s parameter in the legacy product and is not supported "
                                     "yet: ignored" % (p.name, legacy_file))
        if status:
            problems.append(Problem(e.file, e.line, *status))
        if p.obsolete:
            problems.append(warning(e.file, e.line, "%s is obsolete, superseded by %s%s" % (
                p.name, p.obsolete, "; its value is still used" if p.supported else "")))
    return ServiceConfig(kind, explicit, config_dir), failed


def _unused_sections(entries: Iterable[Entry], used: Set[str], problems: List[Problem]) -> None:
    """Settings in a section no ServiceList entry selects are dead: say so once per section."""
    seen: Set[str] = set()
    for e in entries:
        name = (e.section or "default").lower()
        if name not in used and name not in seen:
            seen.add(name)
            problems.append(warning(e.file, e.line, 'section "%s" is not used by any ServiceList entry: '
                                                    'its settings are ignored' % e.section))


# --- checks across parameters -----------------------------------------------------------------------

def _overlap(a: Endpoint, b: Endpoint) -> bool:
    return a.port == b.port and (a.host == b.host or not a.host or not b.host)


def _check_listeners(specs: Iterable[ServiceSpec], where: Place, problems: List[Problem]) -> None:
    """Two listeners on one [IP:]PORT cannot both bind: the daemon would fail at start."""
    seen: List[Tuple[Endpoint, str]] = []
    for spec in specs:
        for ep in spec.listeners:
            for other, kind in seen:
                if _overlap(ep, other):
                    problems.append(error(*where, "ServiceList lists %s twice (%s and %s)"
                                          % (ep if ep == other else "port %d" % ep.port,
                                             "%s %s" % (kind, other), "%s %s" % (spec.kind, ep))))
                    break
            seen.append((ep, spec.kind))


def _check_service(spec: ServiceSpec, file: str, cfg: ServiceConfig, sl_where: Place,
                   problems: List[Problem]) -> None:
    ssl_where = _place(cfg, "SSLPorts", file)
    if cfg.SSLPorts and not cfg.SSLEnable:
        problems.append(error(*ssl_where, "SSLPorts needs SSLEnable yes in the same file"))
    for ep in cfg.SSLPorts:
        if not any(_overlap(ep, listener) for listener in spec.listeners):
            problems.append(warning(*ssl_where, "SSLPorts %s is not among this service's ServiceList ports (%s): "
                                                "nothing listens there" % (ep, Endpoints().render(spec.listeners))))
    pp_where = _place(cfg, "ProxyProtocolPorts", file)
    if cfg.ProxyProtocolPorts and not cfg.ProxyProtocolFrom:
        problems.append(error(*pp_where, "ProxyProtocolPorts needs ProxyProtocolFrom (the load balancers' "
                                         "addresses) in the same file: nobody else may name the client"))
    if cfg.ProxyProtocolPorts and any(n.prefixlen == 0 for n in cfg.ProxyProtocolFrom or ()):
        problems.append(warning(*_place(cfg, "ProxyProtocolFrom", file),
                                "ProxyProtocolFrom covers every address: any client may claim to be any other "
                                "(name only the load balancers)"))
    for ep in cfg.ProxyProtocolPorts:
        if not any(_overlap(ep, listener) for listener in spec.listeners):
            problems.append(warning(*pp_where, "ProxyProtocolPorts %s is not among this service's ServiceList "
                                               "ports (%s): nothing listens there"
                                    % (ep, Endpoints().render(spec.listeners))))
    for ep in spec.listeners:
        if ep.port in IMPLICIT_TLS_PORTS and not any(
                s.port == ep.port and (not s.host or s.host == ep.host) for s in cfg.SSLPorts):
            problems.append(warning(*sl_where, "%s listens on %s, the %s port, but %s's SSLPorts does not list it: "
                                               "clients expect TLS on accept there"
                                    % (spec.kind, ep, IMPLICIT_TLS_PORTS[ep.port], spec.filename)))
    if cfg.is_set("AuthService") and cfg.AuthService and _param("AuthService").honoured(KIND_CODES[spec.kind]):
        problems.append(warning(*_place(cfg, "AuthService", file),
                                "AuthService yes applies to every client of this service; the legacy manual "
                                "advises enabling it per virtual domain only (VirtualDomainFile)"))
    if spec.kind in ("imap", "pop"):
        _check_authserver(file, cfg, problems)
    if spec.kind == "smtp":
        for name in ("SmtpRelays", "SmtpProxyPassword"):
            if not cfg.is_set(name):
                problems.append(error(file, None, "%s is mandatory when ServiceList names the SMTP service"
                                      % _param(name).name))


def _check_schema(spec: ServiceSpec, file: str, cfg: ServiceConfig, mta: MtaOptions,
                  problems: List[Problem]) -> None:
    """Schema 2 (LDAP_SCHEMALEVEL 2) finds domains under UserGroupDN: without it, under the LdapURL
    base, which in a migrated tree is usually the DC tree's root and holds no organisation."""
    if spec.kind == "smtp" or not mta.native or not cfg.HostedDomains:
        return
    if not (cfg.UserGroupDN or cfg.CertMapDN):
        at: Place = mta.where.get("LDAP_SCHEMALEVEL", (file, None))
        problems.append(warning(at[0], at[1], "LDAP_SCHEMALEVEL 2 and %s has no UserGroupDN: Schema 2 domains are "
                                "searched under the LdapURL base (%s)"
                                % (spec.filename, cfg.LdapURL.base or "the root")))


def _check_authserver(file: str, cfg: ServiceConfig, problems: List[Problem]) -> None:
    """AuthenticationServer is "ignored unless the PreAuth option is set to yes", and its protocol
    "is not presently secured": the server belongs on the proxy's machine (Messaging Server
    Administration Reference, MMP chapter; tpauthsdk README)."""
    server = cfg.AuthenticationServer
    if server is None:
        if cfg.AuthenticationLdapAttributes:
            problems.append(warning(*_place(cfg, "AuthenticationLdapAttributes", file),
                                    "AuthenticationLdapAttributes is used only with AuthenticationServer: ignored"))
        return
    where = _place(cfg, "AuthenticationServer", file)
    if not cfg.PreAuth:
        problems.append(warning(*where, "AuthenticationServer is ignored unless PreAuth is yes (PreAuth is no here: "
                                        "only domains whose mailAccessProxyPreAuth or vdmap.cfg turns it on use it)"))
    try:
        loopback = ipaddress.ip_address(server.host).is_loopback
    except ValueError:
        loopback = server.host.lower() == "localhost"
    if not loopback:
        problems.append(warning(*where, "AuthenticationServer %s is not on this machine's loopback: its protocol is "
                                        "not encrypted, so passwords would cross the network in clear (run the "
                                        "server on this machine, as the legacy manual recommends)" % (server,)))


# --- templates for missing files --------------------------------------------------------------------

def _create(config_dir: str, stem: str, code: str, problems: List[Problem]) -> None:
    """Create ``stem.cfg`` from ``stem-def.cfg`` or the standard template; when the directory has
    neither, the standard one is put there first: mmproxy's own copy (cfg/, installed as
    mmproxy/templates/), else rendered from the registry (the same text; a test keeps them equal).

    Root runs this at start, in a directory the BeTheUser account may own (the legacy layout): a
    name that is a link, dangling or not, counts as there, and a file is only ever created new
    (O_EXCL: no link followed), so that a link planted as a missing service file cannot make root
    write a ``-def.cfg`` of that account's into a file of its choosing (/etc/cron.d/...)."""
    target = os.path.join(config_dir, stem + ".cfg")
    if os.path.lexists(target):
        return
    candidates = [os.path.join(config_dir, n + "-def.cfg") for n in dict.fromkeys((stem, FILE_NAMES[code]))]
    template = next((c for c in candidates if os.path.lexists(c)), candidates[-1])
    from mmproxy.config.generate import render_template, shipped_template  # here: generate also runs as __main__
    try:
        if not os.path.lexists(template):
            shipped = shipped_template(code)
            with open(template, "x", encoding="utf-8") as f:
                if shipped is not None:
                    with open(shipped, encoding="utf-8") as src:
                        shutil.copyfileobj(src, f)
                else:
                    f.write(render_template(code))
        with open(template, "rb") as src, open(target, "xb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError as e:
        problems.append(error(target, None, "cannot create it from %s: %s" % (template, e.strerror or e)))
        return
    problems.append(warning(target, None, "created from %s (the file was missing)" % os.path.basename(template)))
