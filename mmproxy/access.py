"""Messaging Server access filters (``TCPAccess`` and the per-user ``mailAllowedServiceAccess``):
the parser and the evaluator, pure logic.

Syntax (Messaging Server Administration Guide, "Configuring Client Access to POP, IMAP, and HTTP
Services"; Communications Services Schema Reference, ``mailAllowedServiceAccess``)::

    filter   = rule *("$" rule)                       empty rules are skipped
    rule     = ("+" / "-") services ":" clients       + allow, - deny
    services = list of  service["@"host]   (imap imaps pop pops smtp smtps http smime, or * / ALL)
    clients  = list of  [user "@"]host
    list     = items separated by blanks or commas, optionally "EXCEPT" list
               (list1 EXCEPT list2 EXCEPT list3 = list1 EXCEPT (list2 EXCEPT list3))
    host     = ALL / * / LOCAL / KNOWN / UNKNOWN / DNSSPOOFER
             / host.name  / .domain (name suffix)  / 10.1. (address prefix)  / 10.1.2.3
             / n.n.n.n/m.m.m.m (or /len)  / [IPv6] or [IPv6]/len (mmproxy extension, tcp_wrappers'
               spelling: the ":" of a bare IPv6 address would end the service list)
    user     = ALL / * / KNOWN / UNKNOWN / a login id

Keywords, service names and host names match in any case.

Evaluation, as Messaging Server documents it: the allow rules are examined first, then the deny
rules, each in order; the first rule whose services and clients match decides.  No match grants
access, except where the filter holds allow rules and no deny rule: then no match denies (so
``+imap:ALL`` alone denies every other service).

Host names are those of the client's address, forward-confirmed (a PTR record alone is the client's
own claim): a rule asks for the name only when it gets to a pattern that needs one, through the
``resolve`` function the caller gives (reverse DNS lives elsewhere; this module does no I/O).
``KNOWN`` is a confirmed name, ``UNKNOWN`` no confirmed name (none, a timeout, or a spoofer),
``DNSSPOOFER`` a name whose forward lookup does not give the address back, ``LOCAL`` a confirmed
name without a dot; name patterns never match an unconfirmed name.

The user of ``user@host`` is the login id (the part before the domain, or the whole id, in any
case); it is known only after the directory lookup, so at connect time (``TCPAccess``) only
``ALL@host`` and ``UNKNOWN@host`` can match.  NIS netgroups (``@group``) are not supported.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Generic, List, NamedTuple, Optional, Tuple, TypeVar, Union

from mmproxy.addresses import Address, is_host_name, unmapped

SERVICES = ("imap", "imaps", "pop", "pops", "smtp", "smtps", "http", "smime")
MAX_FILTER = 65536                # characters of one filter (an LDAP value could be anything)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
T = TypeVar("T", "ServicePattern", "ClientPattern")


class FilterSyntaxError(ValueError):
    """A filter that does not parse: ``offset`` is the 0-based index of the character at fault."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__("column %d: %s" % (offset + 1, reason))
        self.offset, self.reason = offset, reason


class HostName(NamedTuple):
    """What reverse DNS says about an address: ``status`` "ok" (``name`` forward-confirmed),
    "none" (no name), "spoofed" (``name`` does not map back to the address), "timeout"."""

    status: str
    name: str = ""


NO_NAME = HostName("none")
Resolver = Callable[[str], HostName]      # canonical address text -> its name


class Host:
    """An address and, once a pattern asks for it, its name (one lookup per Host at most)."""

    def __init__(self, ip: str, resolve: Resolver) -> None:
        self.address: Address = unmapped(ip)
        self.text = str(self.address)
        self._resolve = resolve
        self._name: Optional[HostName] = None

    @property
    def name(self) -> HostName:
        if self._name is None:
            self._name = self._resolve(self.text)
        return self._name

    @property
    def looked_up(self) -> bool:
        """Whether a pattern needed the name (for the log)."""
        return self._name is not None


# --- patterns ---------------------------------------------------------------------------------------

_WILDCARDS = ("ALL", "LOCAL", "KNOWN", "UNKNOWN", "DNSSPOOFER")
_PREFIX = re.compile(r"(?:\d{1,3}\.){1,3}\Z")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}\Z")


@dataclass(frozen=True)
class HostPattern:
    """One host: ``kind`` is a wildcard (all local known unknown spoofer), "name", "suffix" or
    "prefix" (``text``: the lower-case name, the suffix with its dot, the prefix with its dot), or
    "net" (``net``: an address is a network of one)."""

    kind: str
    text: str = ""
    net: Optional[Network] = None

    @property
    def needs_name(self) -> bool:
        return self.kind not in ("all", "prefix", "net")

    def matches(self, host: Host) -> bool:
        k = self.kind
        if k == "all":
            return True
        if self.net is not None:
            return host.address.version == self.net.version and host.address in self.net
        if k == "prefix":
            return host.address.version == 4 and host.text.startswith(self.text)
        name = host.name
        if k == "unknown":
            return name.status != "ok"
        if k == "spoofer":
            return name.status == "spoofed"
        if name.status != "ok":
            return False
        if k == "known":
            return True
        if k == "local":
            return "." not in name.name
        if k == "name":
            return name.name.lower() == self.text
        return name.name.lower().endswith(self.text)


def _host(text: str, at: int) -> HostPattern:
    """The host pattern ``text`` (found at offset ``at``); FilterSyntaxError when it is none."""
    upper = text.upper()
    if upper in ("ALL", "*"):
        return HostPattern("all")
    if upper in _WILDCARDS:
        return HostPattern({"DNSSPOOFER": "spoofer"}.get(upper, upper.lower()))
    if text.startswith("@"):
        raise FilterSyntaxError(at, "NIS netgroups (%s) are not supported" % text)
    if text.startswith("["):
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?:/(\d{1,3}))?", text)
        try:
            if not m:
                raise ValueError
            net = ipaddress.ip_network("%s/%s" % (m.group(1), m.group(2) or 128), strict=False)
            if net.version != 6:
                raise ValueError
        except ValueError:
            raise FilterSyntaxError(at, "%r is not [IPv6 address] or [IPv6 address]/length" % text) from None
        return HostPattern("net", net=net)
    if "/" in text:
        addr, _, mask = text.partition("/")
        try:
            if not _IPV4.match(addr) or not (mask.isdigit() or _IPV4.match(mask)):
                raise ValueError
            return HostPattern("net", net=ipaddress.IPv4Network("%s/%s" % (addr, mask), strict=False))
        except ValueError:
            raise FilterSyntaxError(at, "%r is not n.n.n.n/m.m.m.m (address/mask)" % text) from None
    if _PREFIX.match(text):
        if any(int(part) > 255 for part in text.split(".")[:-1]):
            raise FilterSyntaxError(at, "%r is not an address prefix" % text)
        return HostPattern("prefix", text)
    if re.fullmatch(r"[\d.]+", text):
        try:
            return HostPattern("net", net=ipaddress.ip_network(text))
        except ValueError:
            raise FilterSyntaxError(at, "%r is not an IPv4 address (an address prefix ends with a dot: 10.1.)"
                                    % text) from None
    if text.startswith(".") and is_host_name(text[1:]):
        return HostPattern("suffix", text.lower())
    if is_host_name(text):
        return HostPattern("name", text.lower())
    if ":" in text:
        raise FilterSyntaxError(at, "%r: write an IPv6 address in brackets, e.g. [::1] or [2001:db8::]/32" % text)
    bad = next((i for i, c in enumerate(text) if not (c.isalnum() or c in ".-")), 0)
    raise FilterSyntaxError(at + bad, "%r is not a host name, address, pattern or wildcard "
                                      "(ALL LOCAL KNOWN UNKNOWN DNSSPOOFER)" % text)


@dataclass(frozen=True)
class ClientPattern:
    """``[user@]host``; ``user`` None: any user (no user part)."""

    host: HostPattern
    user: Optional[str] = None       # "ALL", "KNOWN", "UNKNOWN" or a lower-case login id

    @property
    def needs_name(self) -> bool:
        return self.host.needs_name

    def matches(self, client: Host, user: Optional[str]) -> bool:
        if not self._user_matches(user):
            return False
        return self.host.matches(client)

    def _user_matches(self, user: Optional[str]) -> bool:
        u = self.user
        if u is None or u == "ALL":
            return True
        if u == "KNOWN":
            return user is not None
        if u == "UNKNOWN":
            return user is None
        if user is None:
            return False
        user = user.lower()
        return u == user or (u == user.rsplit("@", 1)[0] and "@" in user)


def _client(text: str, at: int) -> ClientPattern:
    if "@" in text[1:] and not text.startswith("["):
        user, _, host = text.rpartition("@")
        if not host:
            raise FilterSyntaxError(at + len(text), "no host after %s@" % user)
        word = user.upper()
        user = {"*": "ALL"}.get(word, word if word in ("ALL", "KNOWN", "UNKNOWN") else user.lower())
        return ClientPattern(_host(host, at + text.rindex("@") + 1), user)
    return ClientPattern(_host(text, at))


@dataclass(frozen=True)
class ServicePattern:
    """``service[@host]``: ``name`` a service or "all"; ``server`` the address the client reached."""

    name: str
    server: Optional[HostPattern] = None

    @property
    def needs_name(self) -> bool:
        return self.server is not None and self.server.needs_name

    def matches(self, service: str, server: Host) -> bool:
        if self.name != "all" and self.name != service:
            return False
        return self.server is None or self.server.matches(server)


def _service(text: str, at: int) -> ServicePattern:
    name, sep, host = text.partition("@")
    word = name.lower()
    if word in ("*", "all"):
        word = "all"
    elif word not in SERVICES:
        raise FilterSyntaxError(at, "unknown service %r (known: %s, or * or ALL)" % (name, " ".join(SERVICES)))
    if sep and not host:
        raise FilterSyntaxError(at + len(text), "no host after %s@" % name)
    return ServicePattern(word, _host(host, at + len(name) + 1) if sep else None)


@dataclass(frozen=True)
class PatternList(Generic[T]):
    """Items, any of which matches, ``EXCEPT`` what ``exclude`` matches."""

    items: Tuple[T, ...]
    exclude: Optional["PatternList[T]"] = None

    def matches(self, test: Callable[[T], bool]) -> bool:
        if not any(test(i) for i in self.items):
            return False
        return self.exclude is None or not self.exclude.matches(test)

    def all_items(self) -> List[T]:
        return list(self.items) + (self.exclude.all_items() if self.exclude else [])


def _list(text: str, at: int, item: Callable[[str, int], T], what: str) -> PatternList[T]:
    """A blank- or comma-separated list with EXCEPT, right-nested."""
    words = [(m.group(), at + m.start()) for m in re.finditer(r"[^\s,]+", text)]
    if not words:
        raise FilterSyntaxError(at, "no %s given" % what)

    def build(i: int) -> PatternList[T]:
        items: List[T] = []
        while i < len(words) and words[i][0].upper() != "EXCEPT":
            items.append(item(*words[i]))
            i += 1
        if not items:
            where = words[i][1] if i < len(words) else at + len(text)
            raise FilterSyntaxError(where, "no %s before EXCEPT" % what if i < len(words) else "no %s after EXCEPT"
                                    % what)
        if i == len(words):
            return PatternList(tuple(items))
        if i + 1 == len(words):
            raise FilterSyntaxError(words[i][1] + len(words[i][0]), "no %s after EXCEPT" % what)
        return PatternList(tuple(items), build(i + 1))
    return build(0)


# --- rules and filters ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    allow: bool
    services: PatternList[ServicePattern]
    clients: PatternList[ClientPattern]
    text: str                    # as written, for the log

    def matches(self, service: str, client: Host, server: Host, user: Optional[str]) -> bool:
        return (self.services.matches(lambda s: s.matches(service, server))
                and self.clients.matches(lambda c: c.matches(client, user)))


class Decision(NamedTuple):
    allowed: bool
    why: str                     # for the log: which rule decided, or that none did


@dataclass(frozen=True)
class Filter:
    """A parsed filter; ``text`` as written (``source`` names the file it came from, if any)."""

    rules: Tuple[Rule, ...]
    text: str
    source: str = ""

    def __str__(self) -> str:
        return self.source or self.text

    @property
    def needs_names(self) -> bool:
        """Whether some pattern needs a host name (reverse DNS) to be evaluated."""
        return any(p.needs_name for r in self.rules for p in r.services.all_items()) or any(
            p.needs_name for r in self.rules for p in r.clients.all_items())

    @property
    def names_users(self) -> bool:
        """Whether some client pattern names a user (which only a login makes known)."""
        return any(c.user not in (None, "ALL", "UNKNOWN") for r in self.rules for c in r.clients.all_items())

    def decide(self, service: str, client: Host, server: Host, user: Optional[str] = None) -> Decision:
        """Whether ``client`` (connected to ``server``, logged in as ``user`` when known) may use
        ``service`` ("imap", "imaps", ...), and why."""
        allows = [r for r in self.rules if r.allow]
        denies = [r for r in self.rules if not r.allow]
        for rule in allows + denies:
            if rule.matches(service, client, server, user):
                return Decision(rule.allow, "%s by rule %r" % ("allowed" if rule.allow else "denied", rule.text))
        if allows and not denies:
            return Decision(False, "denied: no allow rule matches (there is no deny rule)")
        return Decision(True, "allowed: no rule matches")


def parse_rules(text: str, at: int = 0) -> List[Rule]:
    """The rules of ``$``-separated ``text``; ``at`` is added to the offsets of errors."""
    rules = []
    start = 0
    for chunk in text.split("$"):
        offset = at + start
        start += len(chunk) + 1
        if chunk.strip():
            rules.append(_rule(chunk, offset))
    return rules


def _rule(chunk: str, at: int) -> Rule:
    lead = len(chunk) - len(chunk.lstrip())
    body = chunk.strip()
    if body[0] not in "+-":
        raise FilterSyntaxError(at + lead, "a rule starts with + (allow) or - (deny), not %r" % body[0])
    depth, colon = 0, -1
    for i, c in enumerate(chunk):          # the first ":" outside [IPv6] brackets ends the services
        if c == "[":
            depth += 1
        elif c == "]":
            depth = max(0, depth - 1)
        elif c == ":" and depth == 0:
            colon = i
            break
    if colon < 0:
        raise FilterSyntaxError(at + len(chunk.rstrip()), "no \":\" between the services and the clients")
    sign = at + lead
    services = _list(chunk[lead + 1:colon], sign + 1, _service, "service")
    clients = _list(chunk[colon + 1:], at + colon + 1, _client, "client")
    return Rule(body[0] == "+", services, clients, body)


def parse(text: str, source: str = "") -> Filter:
    """The filter ``text``; FilterSyntaxError (a ValueError, with the offset at fault) when it does
    not parse.  ``source`` names where it came from, for messages."""
    if len(text) > MAX_FILTER:
        raise FilterSyntaxError(MAX_FILTER, "longer than %d characters" % MAX_FILTER)
    return Filter(tuple(parse_rules(text)), text, source)
