"""The test directory's data model (hosted domains in a Sun "schema 1" DC tree, and users).

`default_directory()` is what `Slapd` and `MailStack` load unless told otherwise; the tests rely
on it, so it is described in full in the package docstring (mmproxy/testing/__init__.py).
A `Directory` renders itself as LDIF (`ldif()`) and tells each store which logins it holds
(`store_users(ip)`).
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

from .base import ssha

SUFFIX = "o=internet"
SCHEMA2_BASE = "o=v2,o=internet"      # UserGroupDN of the Schema 2 (native mode) organisations
ROOT_DN, ROOT_PW = "cn=Manager,o=internet", "rootsecret"
PROXY_DN, PROXY_PW = "cn=mmproxy,o=internet", "proxysecret"
STORE_IPS = ("127.0.0.2", "127.0.0.3")

Attrs = Dict[str, List[str]]


@dataclass
class Domain:
    """A hosted domain: a node `dc=<label>,...,o=internet` of the DC tree (Schema 1), or with
    `schema2` an organisation node (Schema 2 native mode, no DC node).

    org_dn: the value of inetDomainBaseDN (the organization that holds the users, which then
    live under `ou=People,<org_dn>`), or None: the users sit directly below the DC node.  With
    `schema2` it is the organisation node itself (objectClass sunManagedOrganization,
    sunPreferredDomain <name>, associatedDomain <name> and `associated`).
    alias_of: the name of another domain: the DC node is an alias (objectClass alias and
    inetDomainAlias, aliasedObjectName: that domain's DC node) and has no settings of its own.
    attrs: further attributes of the node, e.g. the proxy overrides
    {"mailAccessProxyReplay": ["%U@%V"]}.
    """
    name: str
    org_dn: Optional[str] = None
    status: Optional[str] = "active"
    attrs: Attrs = field(default_factory=dict)
    suffix: str = SUFFIX
    alias_of: Optional[str] = None
    schema2: bool = False
    associated: List[str] = field(default_factory=list)

    @property
    def dn(self) -> str:
        if self.schema2 and self.org_dn:
            return self.org_dn
        return ",".join(["dc=" + label for label in self.name.split(".")] + [self.suffix])

    @property
    def people_dn(self) -> str:
        """Where this domain's users are."""
        return "ou=People," + self.org_dn if self.org_dn else self.dn


@dataclass
class User:
    """A mail user. `store_login` is the name the store knows (what a proxy must replay);
    `mailhost` None means: no mailHost attribute (and no mailbox on any store).
    The password's octets are `password` encoded in `password_charset` (UTF-8 unless the user
    has a password that is not valid UTF-8, e.g. ISO-8859-1 "pässwort" = b"p\\xe4sswort");
    slapd and the store hash exactly those octets."""
    uid: str
    domain: str
    password: str
    mailhost: Optional[str]
    store_login: str
    attrs: Attrs = field(default_factory=dict)
    dn: str = ""
    password_charset: str = "utf-8"
    note: str = ""                # what the user shows, for the demo's listing

    @property
    def password_octets(self) -> bytes:
        """What a client sends, byte for byte: password.encode(password_charset)."""
        return self.password.encode(self.password_charset)

    @property
    def login(self) -> str:
        """The fully qualified login name, uid@domain."""
        return "%s@%s" % (self.uid, self.domain)

    @property
    def mail(self) -> str:
        return self.login

    def as_dict(self) -> dict:
        return {"uid": self.uid, "domain": self.domain, "login": self.login, "password": self.password,
                "password_charset": self.password_charset, "mailhost": self.mailhost,
                "store_login": self.store_login, "dn": self.dn, "mail": self.mail,
                "attrs": {k: list(v) for k, v in self.attrs.items()}, "note": self.note}


def password_label(user: dict) -> str:
    """A user's (info() entry's) password for a human: the text, and its charset unless UTF-8."""
    pw, charset = user["password"], user["password_charset"]
    return pw if charset == "utf-8" else "%s (%s: %r)" % (pw, charset, pw.encode(charset))


class Directory:
    """Domains and users, with the DNs filled in. uids are unique across domains (so the
    users can be looked up by uid); add a same-uid user with Slapd.add() when a test needs one."""

    def __init__(self, domains: List[Domain], users: List[User], suffix: str = SUFFIX) -> None:
        self.suffix = suffix
        self.domains: Dict[str, Domain] = {d.name: d for d in domains}
        self.users: Dict[str, User] = {}
        for u in users:
            if u.uid in self.users:
                raise ValueError("duplicate uid %r in the test directory" % u.uid)
            if u.domain not in self.domains:
                raise ValueError("user %r: unknown domain %r" % (u.uid, u.domain))
            u.dn = u.dn or "uid=%s,%s" % (u.uid, self.domains[u.domain].people_dn)
            self.users[u.uid] = u

    def user(self, name: str) -> User:
        """A user by uid or by uid@domain."""
        uid, _, dom = name.partition("@")
        u = self.users[uid]
        if dom and dom.lower() != u.domain:
            raise KeyError(name)
        return u

    def store_users(self, ip: str) -> Dict[str, bytes]:
        """{store_login: password octets} of the users whose mailHost is `ip`."""
        return {u.store_login: u.password_octets for u in self.users.values() if u.mailhost == ip}

    def store_aliases(self, ip: str) -> Dict[str, str]:
        """{address: store_login} for LMTP delivery on store `ip`: each user's mail address
        and mailAlternateAddress values, where they differ from the store login."""
        out = {}
        for u in self.users.values():
            if u.mailhost != ip:
                continue
            for addr in [u.mail, *u.attrs.get("mailAlternateAddress", [])]:
                if addr.lower() != u.store_login.lower():
                    out[addr] = u.store_login
        return out

    def ldif(self) -> str:
        """The whole tree as LDIF, parents first (for slapadd or ldapadd)."""
        entries: List[tuple] = []
        seen = set()

        def add(dn: str, attrs: list) -> None:
            if dn.lower() not in seen:
                seen.add(dn.lower())
                entries.append((dn, attrs))

        add(self.suffix, [("objectClass", "top"), ("objectClass", "organization"),
                          ("o", self.suffix.split("=", 1)[1])])
        add(PROXY_DN, [("objectClass", "organizationalRole"), ("objectClass", "simpleSecurityObject"),
                       ("cn", "mmproxy"), ("description", "the proxy's bind DN"),
                       ("userPassword", ssha(PROXY_PW))])
        for d in self.domains.values():
            if d.schema2:
                self._schema2(d, add)
                continue
            labels = d.name.split(".")
            for i in range(len(labels) - 1, 0, -1):      # dc=com, then dc=example,dc=com ...
                dn = ",".join("dc=" + x for x in labels[i:]) + "," + self.suffix
                add(dn, [("objectClass", "top"), ("objectClass", "domain"), ("dc", labels[i])])
            if d.alias_of:
                add(d.dn, [("objectClass", "top"), ("objectClass", "alias"), ("objectClass", "inetDomainAlias"),
                           ("dc", labels[0]),
                           ("aliasedObjectName", self.domains[d.alias_of].dn)]
                    + [(k, v) for k, vals in d.attrs.items() for v in vals])
                continue
            attrs = [("objectClass", oc) for oc in ("top", "domain", "inetDomain", "mailDomain")]
            attrs.append(("dc", labels[0]))
            if d.org_dn:
                attrs.append(("inetDomainBaseDN", d.org_dn))
            if d.status:
                attrs.append(("inetDomainStatus", d.status))
            attrs += [(k, v) for k, vals in d.attrs.items() for v in vals]
            add(d.dn, attrs)
            if d.org_dn:
                add(d.org_dn, [("objectClass", "top"), ("objectClass", "organization"),
                               ("o", d.org_dn.split(",")[0].split("=", 1)[1])])
                add(d.people_dn, [("objectClass", "top"), ("objectClass", "organizationalUnit"),
                                  ("ou", "People")])
        for u in self.users.values():
            attrs = [("objectClass", oc) for oc in ("top", "person", "organizationalPerson", "inetOrgPerson",
                                                    "inetUser", "mailUser")]
            attrs += [("uid", u.uid), ("cn", u.uid.capitalize() + " Tester"), ("sn", "Tester"),
                      ("mail", u.mail), ("userPassword", ssha(u.password_octets))]
            if u.mailhost:
                attrs.append(("mailHost", u.mailhost))
            attrs += [("inetUserStatus", "active"), ("mailUserStatus", "active"),
                      ("mailDeliveryOption", "mailbox")]
            overridden = {k.lower() for k in u.attrs}
            attrs = [a for a in attrs if a[0].lower() not in overridden or a[0] == "objectClass"]
            attrs += [(k, v) for k, vals in u.attrs.items() for v in vals]
            add(u.dn, attrs)
        return "".join(ldif_entry(dn, attrs) for dn, attrs in entries)

    def _schema2(self, d: Domain, add: Callable[[str, list], None]) -> None:
        """A Schema 2 organisation node (and its parents below the suffix, and ou=People)."""
        assert d.org_dn and d.org_dn.lower().endswith("," + self.suffix.lower()), d.org_dn
        parents = d.org_dn[:-len(self.suffix) - 1].split(",")[1:]
        for i in range(len(parents) - 1, -1, -1):
            dn = ",".join(parents[i:] + [self.suffix])
            attr, _, value = parents[i].partition("=")
            add(dn, [("objectClass", "top"), ("objectClass", "organization"), (attr, value)])
        attrs = [("objectClass", oc) for oc in ("top", "organization", "sunManagedOrganization", "mailDomain")]
        attrs += [("o", d.org_dn.split(",")[0].split("=", 1)[1]), ("sunPreferredDomain", d.name)]
        attrs += [("associatedDomain", n) for n in [d.name, *d.associated]]
        if d.status:
            attrs.append(("inetDomainStatus", d.status))
        attrs += [(k, v) for k, vals in d.attrs.items() for v in vals]
        add(d.org_dn, attrs)
        add(d.people_dn, [("objectClass", "top"), ("objectClass", "organizationalUnit"), ("ou", "People")])


_SAFE = re.compile(r"^[\x01-\x09\x0b\x0c\x0e-\x1f\x21-\x39\x3b\x3d-\x7f][\x01-\x09\x0b\x0c\x0e-\x7f]*$")


def ldif_line(attr: str, value: Union[str, bytes]) -> str:
    """`attr: value`, or `attr:: base64` when LDIF requires it (RFC 2849 SAFE-STRING: ASCII only).
    A str goes as UTF-8; bytes as they are (e.g. a clear-text ISO-8859-1 userPassword)."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if not raw or (raw.isascii() and _SAFE.match(raw.decode("ascii")) and not raw.endswith(b" ")):
        return "%s: %s\n" % (attr, raw.decode("ascii"))
    return "%s:: %s\n" % (attr, base64.b64encode(raw).decode("ascii"))


def ldif_entry(dn: str, attrs: list) -> str:
    """One LDIF entry (content record) with a trailing blank line."""
    return ldif_line("dn", dn) + "".join(ldif_line(k, v) for k, v in attrs) + "\n"


def default_password(uid: str) -> str:
    """The password of a numbered user (user1 -> 'pw-user1')."""
    return "pw-" + uid


SCHEMA2_NOTE = "Schema 2 only: refused unless config/option.dat says LDAP_SCHEMALEVEL=2 (the demo does not)"


def default_directory(n_users: int = 10, store_ips: tuple = STORE_IPS) -> Directory:
    """The default data model (see the package docstring). user1..user<n_users> alternate between
    the two stores: odd k on store_ips[0], even k on store_ips[1]."""
    a, b = store_ips
    com = Domain("example.com", org_dn="o=example.com,o=internet")
    org = Domain("example.org", org_dn=None,
                 attrs={"mailAccessProxyReplay": ["%U@%V"], "mailAccessProxyPreAuth": ["yes"]})
    domains = [
        com, org,
        # DC-tree aliases: an alias node of example.org, an alias of that alias (refused: one hop),
        # and an index node with example.com's users and its own settings
        Domain("example.info", alias_of="example.org", status=None),
        Domain("chain.example", alias_of="example.info", status=None),
        Domain("example.biz", org_dn="o=example.com,o=internet",
               attrs={"inetCanonicalDomainName": ["example.com"]}),
        # domain status: refused as a wrong password, and a temporary failure
        Domain("closed.example", status="inactive", attrs={"mailAccessProxyReplay": ["%U@%V"]}),
        Domain("held.example", attrs={"mailDomainStatus": ["hold"], "mailAccessProxyReplay": ["%U@%V"]}),
        # Schema 2 native mode, under SCHEMA2_BASE (no DC node)
        Domain("example.net", org_dn="o=example.net," + SCHEMA2_BASE, schema2=True,
               associated=["mail.example.net", "example.edu", "shared.example"],
               attrs={"mailAccessProxyReplay": ["%U@%V"]}),
        # another organisation that claims shared.example too (a provisioning error: refused)
        Domain("other.example", org_dn="o=other.example," + SCHEMA2_BASE, schema2=True,
               associated=["shared.example"]),
    ]
    users = [
        User("alice", "example.com", "alice-pw", a, "alice"),
        User("bob", "example.com", 'b"o b\\pw', b, "bob"),
        User("erin", "example.com", "erin-pw", a, "erin",
             attrs={"mailAlternateAddress": ["erin@alias.example.com"]}),
        User("frank", "example.com", "frank-pw", None, "frank"),
        User("latin", "example.com", "p\u00e4sswort", a, "latin", password_charset="iso-8859-1"),
        User("gina", "example.com", "gina-pw", a, "gina",
             attrs={"mailAllowedServiceAccess": ["+imap:ALL EXCEPT 127.0.0.22"]},
             note="IMAP only (mailAllowedServiceAccess)"),
        User("hank", "example.com", "hank-pw", a, "hank", attrs={"mailAllowedServiceAccess": ["+imap:ALL$+popx:ALL"]},
             note="refused: his mailAllowedServiceAccess names an unknown service (popx)"),
        User("ivan", "example.com", "ivan-pw", a, "ivan", attrs={"inetUserStatus": ["inactive"]},
             note="inactive: refused as a wrong password"),
        User("judy", "example.com", "judy-pw", a, "judy", attrs={"mailUserStatus": ["hold"]},
             note="on hold: a temporary failure"),
        User("kurt", "example.com", "kurt-pw", a, "kurt",
             attrs={"inetUserStatus": ["Active"], "mailUserStatus": ["overquota"]}, note="over quota: logs in"),
        User("carol", "example.org", "carol pw", b, "carol@example.org"),
        User("dave", "example.org", "dave-pw", a, "dave@example.org"),
        User("paul", "closed.example", "paul-pw", a, "paul@closed.example", note="domain inactive: refused"),
        User("quinn", "held.example", "quinn-pw", a, "quinn@held.example", note="domain on hold: a temporary failure"),
        User("nora", "example.net", "nora-pw", a, "nora@example.net", note=SCHEMA2_NOTE),
        User("otto", "example.net", "otto-pw", b, "otto@example.net", note=SCHEMA2_NOTE),
    ]
    for k in range(1, n_users + 1):
        uid = "user%d" % k
        users.append(User(uid, "example.com", default_password(uid), a if k % 2 else b, uid))
    return Directory(domains, users)
