"""VirtualDomainFile (vdmap.cfg): settings chosen by the server address a client connected to.

``vdmap NAME IP`` maps an address the proxy listens on to a virtual domain NAME; ``NAME:Param value``
lines give that domain's values, which override the service's own for sessions on that address.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from mmproxy.addresses import unmapped
from mmproxy.config import cfgfile
from mmproxy.config.cfgfile import Problem, error, warning
from mmproxy.config.params import lookup, suggest, support_problem
from mmproxy.config.types import Ctx


def _address(text: str) -> str:
    """Canonical text of an IP (ValueError if it is none)."""
    return str(unmapped(text))


@dataclass
class VirtualDomain:
    name: str
    addresses: List[str] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)   # registry name -> typed value


class VirtualDomains:
    """The virtual domains of one vdmap file, looked up by server address."""

    def __init__(self, domains: List[VirtualDomain]):
        self.domains = domains
        self._by_address = {a: d for d in domains for a in d.addresses}

    def domain_for(self, server_ip: str) -> Optional[VirtualDomain]:
        """The virtual domain of sessions accepted on ``server_ip`` (any spelling of the address), or None."""
        try:
            return self._by_address.get(_address(server_ip))
        except ValueError:
            return None

    def for_address(self, server_ip: str) -> Dict[str, Any]:
        """The overrides for sessions accepted on ``server_ip`` (for ``ServiceConfig.override``), or {}."""
        domain = self.domain_for(server_ip)
        return dict(domain.settings) if domain else {}


def read_vdmap(path: str, *, config_dir: str = "", service: Optional[str] = None,
               ) -> Tuple[VirtualDomains, List[Problem]]:
    """Parse and check a vdmap file; values are converted as the service ``service`` reads them."""
    entries, problems = cfgfile.read(path)
    domains: Dict[str, VirtualDomain] = {}
    owner: Dict[str, Tuple[str, int]] = {}       # address -> (domain, line)
    set_at: Dict[Tuple[str, str], int] = {}      # (domain, key) -> line
    first_setting: Dict[str, cfgfile.Entry] = {}

    def domain(name: str) -> VirtualDomain:
        return domains.setdefault(name.lower(), VirtualDomain(name))

    for e in entries or ():
        if e.section is None:
            parts = e.value.split()
            if e.key.lower() != "vdmap" or len(parts) != 2:
                problems.append(error(path, e.line, "expected `vdmap NAME IP` or `NAME:Param value`"))
                continue
            name, ip = parts
            try:
                ip = _address(ip)
            except ValueError:
                problems.append(error(path, e.line, "vdmap %s: %r is not an IP address" % (name, ip)))
                continue
            if ip in owner and owner[ip][0].lower() != name.lower():
                problems.append(error(path, e.line, "%s is already mapped to %s (line %d)" % (ip, *owner[ip])))
                continue
            owner.setdefault(ip, (name, e.line))
            if ip not in domain(name).addresses:
                domain(name).addresses.append(ip)
            continue
        p = lookup(e.key)
        if p is None:
            hint = suggest(e.key)
            problems.append(error(path, e.line, 'unknown parameter "%s"%s' % (
                e.key, ' (did you mean "%s"?)' % hint if hint else "")))
            continue
        if not p.per_domain:
            if p.security:
                problems.append(error(path, e.line, "%s cannot be set per virtual domain; mmproxy refuses to start "
                                                    "rather than drop this access control" % p.name))
            else:
                problems.append(warning(path, e.line, "%s cannot be set per virtual domain: ignored" % p.name))
            continue
        if e.value == "":
            continue
        ctx = Ctx(config_dir, service, column=e.column)
        try:
            value = p.convert(e.value, ctx)
        except ValueError as ex:
            problems.append(error(path, e.line, str(ex)))
            continue
        problems += [warning(path, e.line, w) for w in ctx.warnings]
        if p.obsolete:
            problems.append(warning(path, e.line, "%s is obsolete, superseded by %s; its value is still used"
                                    % (p.name, p.obsolete)))
        status = support_problem(p, value)
        if status:
            problems.append(cfgfile.Problem(path, e.line, *status))
        key = (e.section.lower(), p.key)
        if key in set_at:
            problems.append(warning(path, e.line, "%s:%s is set again (first at line %d): the last value wins"
                                    % (e.section, p.name, set_at[key])))
        set_at[key] = e.line
        first_setting.setdefault(e.section.lower(), e)
        domain(e.section).settings[p.name] = value
    for name, e in first_setting.items():
        if not domains[name].addresses:
            problems.append(warning(path, e.line, "virtual domain %s has no `vdmap %s IP` line: its settings are "
                                                  "never used" % (e.section, e.section)))
    return VirtualDomains(list(domains.values())), problems
