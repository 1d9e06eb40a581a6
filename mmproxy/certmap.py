"""certmap.conf: which directory entry a client certificate belongs to (CertmapFile).

The legacy format (Netscape/Sun/Oracle servers, the MMP among them)::

    # comment
    certmap default default                 # the mapping for issuers without one of their own
    default:DNComps                         # empty: search all of UserGroupDN
    default:FilterComps e=mail              # the MMP's FROM=TO form: the certificate's e becomes mail
    certmap corp CN=Corp CA, O=Corp, C=US   # a mapping for the certificates that CA issued
    corp:DNComps ou, o, c                   # search under ou=<ou>,o=<o>,c=<c> of the subject
    corp:FilterComps uid                    # (uid=<the subject's uid>)
    corp:VerifyCert on                      # the entry's userCertificate must be this certificate
    corp:CmapLdapAttr certSubjectDN         # first look for (certSubjectDN=<subject DN>)

* ``DNComps``: not given, the subject DN itself is the entry (a base search); given but empty, the
  search covers all of the base (``UserGroupDN``); a list of attributes of the subject, in the
  subject's order, forms the DN to search under.
* ``FilterComps``: the subject's values of these attributes, ANDed (``e`` and ``mail`` both take the
  certificate's e-mail address and search ``mail``); not given or empty: any entry.
* The MMP's extension of both: ``FROM=TO`` takes the subject's FROM value as TO (``ou=uid``).
* ``VerifyCert on``: the certificate must be one of the entry's ``userCertificate`` values.
* ``CmapLdapAttr``: an attribute holding subject DNs, searched first; nothing found, the other
  properties apply.
* ``Library``/``InitFn`` (certmap plug-ins) are refused: the MMP did not support them either.

Issuer DNs are compared as DNs (attribute types in any case, blanks around ``,`` and ``=``
ignored), not as the exact strings the legacy servers compared.  Every search is confined to the
base: a certificate whose subject points elsewhere maps to nobody.  Values reach LDAP filters
only through ``directory.py``, which escapes them (RFC 4515).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from mmproxy.errors import ConfigError

Comp = Tuple[str, str]          # (attribute of the subject, attribute to search), lower case

# Subject attribute names as certmap.conf writes them; the e-mail address is "e" (emailAddress)
_OID_NAMES = {"2.5.4.3": "cn", "2.5.4.11": "ou", "2.5.4.10": "o", "2.5.4.6": "c", "2.5.4.7": "l",
              "2.5.4.8": "st", "1.2.840.113549.1.9.1": "e", "0.9.2342.19200300.100.1.1": "uid",
              "0.9.2342.19200300.100.1.25": "dc", "0.9.2342.19200300.100.1.3": "mail", "2.5.4.5": "serialnumber",
              "2.5.4.4": "sn", "2.5.4.42": "givenname", "2.5.4.12": "title", "2.5.4.9": "street"}
_ALIASES = {"e": "e", "mail": "e", "emailaddress": "e", "email": "e"}
_ATTR = re.compile(r"[A-Za-z][A-Za-z0-9-]*\Z")
_PROPS = ("dncomps", "filtercomps", "verifycert", "cmapldapattr", "library", "initfn")


class CertmapError(ConfigError):
    """A certmap.conf line that cannot be used: ``file``, ``line`` and what is wrong."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__("%s:%d: %s" % (file, line, message))
        self.file, self.line, self.message = file, line, message


@dataclass
class Mapping:
    """One ``certmap NAME ISSUERDN`` block."""

    name: str
    issuer: Optional[str]                       # normalised issuer DN; None for "default"
    line: int
    dncomps: Optional[Tuple[Comp, ...]] = None  # None: not given (the subject DN is the entry)
    filtercomps: Tuple[Comp, ...] = ()
    verifycert: bool = False
    cmapldapattr: Optional[str] = None


@dataclass(frozen=True)
class Search:
    """One LDAP search a mapping asks for: under ``base`` (only ``base`` itself when ``base_only``),
    entries whose attributes have all of ``terms`` (attribute, value) as values; escaping is the
    directory's job."""

    base: str
    base_only: bool
    terms: Tuple[Tuple[str, str], ...]


def normalise_dn(dn: str) -> str:
    """A DN string compared as the legacy issuer lines mean it: attribute types lower-cased, the
    blanks around ``,``, ``+`` and ``=`` dropped, values compared without case."""
    parts = [p.strip() for p in re.split(r"(?<!\\)[,+]", dn.strip()) if p.strip()]
    out = []
    for p in parts:
        k, sep, v = p.partition("=")
        out.append(k.strip().lower() + sep + " ".join(v.split()).lower())
    return ",".join(out)


def _comps(value: str) -> Tuple[Comp, ...]:
    out = []
    for item in [c.strip() for c in value.split(",") if c.strip()]:
        src, sep, dst = item.partition("=")
        src, dst = src.strip().lower(), (dst.strip().lower() if sep else "")
        for a in (src, dst) if sep else (src,):
            if not _ATTR.match(a):
                raise ValueError("%r is not an attribute name" % a)
        src = _ALIASES.get(src, src)
        out.append((src, dst or ("mail" if src == "e" else src)))
    return tuple(out)


class Certmap:
    """A parsed certmap.conf: the mapping for a certificate's issuer, and the searches it asks for."""

    def __init__(self, mappings: List[Mapping]) -> None:
        self.mappings = mappings
        self.by_issuer: Dict[str, Mapping] = {m.issuer: m for m in mappings if m.issuer is not None}
        self.default = next((m for m in mappings if m.issuer is None), None)

    @classmethod
    def parse(cls, text: str, file: str) -> "Certmap":
        """CertmapError naming the file and line of the first thing that cannot be used."""
        mappings: Dict[str, Mapping] = {}
        issuers: Dict[Optional[str], str] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word = line.split(None, 1)[0]
            if word.lower() == "certmap":
                parts = line.split(None, 2)
                if len(parts) < 3:
                    raise CertmapError(file, n, "expected `certmap NAME ISSUERDN`")
                name, issuer_raw = parts[1], parts[2].strip()
                if name.lower() in mappings:
                    raise CertmapError(file, n, "mapping %r is defined twice" % name)
                issuer = None if issuer_raw.lower() == "default" else normalise_dn(issuer_raw)
                if issuer is not None and "=" not in issuer:
                    raise CertmapError(file, n, "issuer %r is not a DN (or `default`)" % issuer_raw)
                if issuer in issuers:
                    raise CertmapError(file, n, "issuer %r already has mapping %r" % (issuer_raw, issuers[issuer]))
                issuers[issuer] = name
                mappings[name.lower()] = Mapping(name, issuer, n)
                continue
            name, colon, rest = line.partition(":")
            if not colon or not name or " " in name:
                raise CertmapError(file, n, "expected `certmap NAME ISSUERDN` or `NAME:Property value`")
            m = mappings.get(name.lower())
            if m is None:
                raise CertmapError(file, n, "mapping %r is used before its `certmap %s ISSUERDN` line" % (name, name))
            prop, _, value = rest.strip().partition(" ")
            prop, value = prop.lower(), value.strip()
            if prop not in _PROPS:
                raise CertmapError(file, n, "unknown property %r (DNComps, FilterComps, VerifyCert, CmapLdapAttr)"
                                   % prop)
            try:
                if prop in ("library", "initfn"):
                    raise ValueError("certmap plug-ins are not supported (nor were they by the MMP): use "
                                     "DNComps and FilterComps, with FROM=TO where an attribute must be renamed")
                if prop == "dncomps":
                    m.dncomps = _comps(value)
                elif prop == "filtercomps":
                    m.filtercomps = _comps(value)
                elif prop == "verifycert":
                    if value.lower() not in ("on", "off"):
                        raise ValueError("VerifyCert is on or off")
                    m.verifycert = value.lower() == "on"
                else:
                    if not _ATTR.match(value):
                        raise ValueError("CmapLdapAttr needs an attribute name")
                    m.cmapldapattr = value
            except ValueError as e:
                raise CertmapError(file, n, "%s:%s: %s" % (m.name, rest.strip().split(" ", 1)[0], e)) from None
        if not mappings:
            raise CertmapError(file, 1, "no `certmap NAME ISSUERDN` line: no certificate can map to anyone")
        return cls(list(mappings.values()))

    @classmethod
    def load(cls, path: str) -> "Certmap":
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError("%s: cannot read: %s" % (path, e.strerror)) from None
        return cls.parse(text, path)

    def mapping_for(self, cert_der: bytes) -> Optional[Mapping]:
        """The mapping of the certificate's issuer, else the default one; None when neither."""
        issuer, _, _ = _names(cert_der)
        return self.by_issuer.get(normalise_dn(issuer), self.default)

    def searches(self, cert_der: bytes, base: str) -> Tuple[Optional[Mapping], List[Search]]:
        """The mapping and the searches, in order, that find the certificate's owner under ``base``
        (the first that finds anything decides).  Searches that would leave ``base`` are dropped."""
        m = self.mapping_for(cert_der)
        if m is None:
            return None, []
        _, subject, comps = _names(cert_der)
        out = []
        if m.cmapldapattr:
            out.append(Search(base, False, ((m.cmapldapattr, subject),)))
        terms: List[Tuple[str, str]] = []
        for src, dst in m.filtercomps:
            terms += [(dst, v) for k, v in comps if k == src]
        if m.filtercomps and not terms:
            return m, out                      # the subject has none of the attributes: no match
        if m.dncomps is None:
            search = Search(subject, True, tuple(terms))
        elif not m.dncomps:
            search = Search(base, False, tuple(terms))
        else:
            wanted = {src: dst for src, dst in m.dncomps}
            rdns = ["%s=%s" % (wanted[k], _escape_rdn(v)) for k, v in comps if k in wanted]
            search = Search(",".join(rdns), False, tuple(terms))
        if search.base and within(search.base, base):
            out.append(search)
        return m, out


def within(dn: str, base: str) -> bool:
    """Whether ``dn`` is ``base`` or below it (compared as normalise_dn does)."""
    d, b = normalise_dn(dn), normalise_dn(base)
    return not b or d == b or d.endswith("," + b)


def _escape_rdn(value: str) -> str:
    """An attribute value inside a DN (RFC 4514 section 2.4)."""
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def _names(cert_der: bytes) -> Tuple[str, str, List[Tuple[str, str]]]:
    """(issuer DN, subject DN, the subject's attributes as (certmap name, value), most specific
    first, as the subject DN is written).  ValueError for what is not a certificate."""
    from cryptography import x509  # after gevent's patching: not at import time
    cert = x509.load_der_x509_certificate(cert_der)
    comps = [(_OID_NAMES.get(a.oid.dotted_string, a.oid.dotted_string), str(a.value))
             for rdn in reversed(list(cert.subject.rdns)) for a in rdn]
    return cert.issuer.rfc4514_string(), cert.subject.rfc4514_string(), comps


def subject_dn(cert_der: bytes) -> str:
    """The certificate's subject as an RFC 4514 string (for logs and CmapLdapAttr)."""
    from cryptography import x509
    return x509.load_der_x509_certificate(cert_der).subject.rfc4514_string()
