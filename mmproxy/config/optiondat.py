"""The MTA option file, ``option.dat``, beside the ``.cfg`` files (legacy ``msg_svr_base/config``).

With ``HostedDomains yes`` the MMP honoured some MTA options from this file; they are how a
Messaging Server directory is laid out (Sun Java System Messaging Server 6.3 Administration
Reference, "Messaging Multiplexor", HostedDomains: "the MMP honors the following MTA options in
the msg_svr_base/config/option.dat file ... These settings may be used to enable Sun ONE LDAP
Schema, v2 with the MMP").  mmproxy honours those that decide where domains and users are found:

    LDAP_SCHEMALEVEL            1 (the default): Schema 1, domains in the DC tree under the LdapURL
                                base; 1.5: Schema 2 compatibility mode, still the DC tree; 2: Schema
                                2 native mode, domains found by sunPreferredDomain / associatedDomain
                                under UserGroupDN
    LDAP_DOMAIN_ATTR_BASEDN     inetDomainBaseDN: where a domain's users are
    LDAP_DOMAIN_ATTR_ALIAS      aliasedObjectName: a DC-tree alias node names its domain's node
    LDAP_DOMAIN_ATTR_CANONICAL  inetCanonicalDomainName: a domain's canonical name
    LDAP_ATTR_DOMAIN1_SCHEMA2   sunPreferredDomain: a Schema 2 organisation's domain name
    LDAP_ATTR_DOMAIN2_SCHEMA2   associatedDomain: its further names (aliases)

Every other option belongs to the MTA and is left alone.  The file's format (Messaging Server 6.3
Administration Reference, "Option File", "Format of the File"; Administration Guide 10.4.6): one
``NAME=value`` setting a line; a line that starts with ``!``, ``#`` or ``;`` is a comment, even
after a line that ends in ``\\`` (which continues the setting on the next line); blank lines are
ignored; an integer may be written ``b%v`` (``v`` in base ``b``).  Names are read in any case.

Pure: nothing here touches the network, and ``read`` only the one file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from mmproxy.config.cfgfile import Problem, error, warning

FILE_NAME = "option.dat"
SCHEMA_LEVELS = ("1", "1.5", "2")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+")    # RFC 4512 descr or numericoid
_RADIX = re.compile(r"([0-9]+)%([0-9A-Za-z]+)")

# option name -> MtaOptions field; every one of them but LDAP_SCHEMALEVEL names an LDAP attribute
_FIELDS = {
    "LDAP_SCHEMALEVEL": "schema_level",
    "LDAP_DOMAIN_ATTR_BASEDN": "domain_attr_basedn",
    "LDAP_DOMAIN_ATTR_ALIAS": "domain_attr_alias",
    "LDAP_DOMAIN_ATTR_CANONICAL": "domain_attr_canonical",
    "LDAP_ATTR_DOMAIN1_SCHEMA2": "attr_domain1_schema2",
    "LDAP_ATTR_DOMAIN2_SCHEMA2": "attr_domain2_schema2",
}


@dataclass(frozen=True)
class MtaOptions:
    """The option.dat settings mmproxy honours (defaults: Messaging Server's), and where each was set."""

    schema_level: str = "1"
    domain_attr_basedn: str = "inetDomainBaseDN"
    domain_attr_alias: str = "aliasedObjectName"
    domain_attr_canonical: str = "inetCanonicalDomainName"
    attr_domain1_schema2: str = "sunPreferredDomain"
    attr_domain2_schema2: str = "associatedDomain"
    where: Dict[str, Tuple[str, int]] = field(default_factory=dict, compare=False)   # option -> (file, line)

    @property
    def native(self) -> bool:
        """Schema 2 native mode (LDAP_SCHEMALEVEL 2): no DC tree; domains are organisations."""
        return self.schema_level == "2"


def _schema_level(value: str) -> str:
    m = _RADIX.fullmatch(value)
    if m:
        base = int(m.group(1))
        if not 2 <= base <= 36:
            raise ValueError("base %d of %r is not 2 to 36" % (base, value))
        try:
            value = str(int(m.group(2), base))
        except ValueError:
            raise ValueError("%r is no number in base %d" % (m.group(2), base)) from None
    if value not in SCHEMA_LEVELS:
        raise ValueError("%r is no schema level Messaging Server knows (1, 1.5 or 2)" % value)
    return value


def _attribute(value: str) -> str:
    if not _ATTRIBUTE.fullmatch(value):
        raise ValueError("%r is no LDAP attribute name" % value)
    return value


def _logical_lines(text: str) -> List[Tuple[int, str]]:
    """(first line number, text) of each setting: continuation lines joined, comments dropped."""
    out: List[Tuple[int, str]] = []
    pending: Optional[Tuple[int, str]] = None
    for n, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        line = raw.strip()
        if line[:1] in ("!", "#", ";"):
            continue                      # a comment, even inside a continued setting
        if pending is not None:
            start, before = pending
            line, pending = before + line, None
        else:
            start = n
            if not line:
                continue
        if line.endswith("\\"):
            pending = (start, line[:-1])
            continue
        out.append((start, line))
    if pending is not None and pending[1].strip():
        out.append(pending)
    return out


def parse(text: str, file: str) -> Tuple[MtaOptions, List[Problem]]:
    """The honoured options of an option.dat text and what is wrong with them (``file`` only names
    the file in messages).  A bad value of an honoured option is an error (its default applies);
    a line that is no ``NAME=value`` is a warning (the MTA's business) unless it names an honoured
    option; a repeated option is a warning (the last value counts)."""
    values: Dict[str, str] = {}
    where: Dict[str, Tuple[str, int]] = {}
    problems: List[Problem] = []
    for n, line in _logical_lines(text):
        name, eq, value = line.partition("=")
        name, value = name.strip(), value.strip()
        key = name.upper()
        if not eq or not _NAME.fullmatch(name):
            first = line.split(None, 1)[0].upper() if line.split() else ""
            if first in _FIELDS:
                problems.append(error(file, n, "%s: expected %s=value" % (first, first)))
            else:
                problems.append(warning(file, n, "cannot read this line: expected NAME=value (left to the MTA)"))
            continue
        if key not in _FIELDS:
            continue
        try:
            typed = _schema_level(value) if key == "LDAP_SCHEMALEVEL" else _attribute(value)
        except ValueError as e:
            problems.append(error(file, n, "%s: %s" % (key, e)))
            continue
        if key in where:
            problems.append(warning(file, n, "%s is set again (first at line %d): the last value counts"
                                    % (key, where[key][1])))
        values[_FIELDS[key]] = typed
        where[key] = (file, n)
    return MtaOptions(**values, where=where), problems


def read(config_dir: str) -> Tuple[MtaOptions, List[Problem]]:
    """option.dat of a configuration directory; Messaging Server's defaults when there is none."""
    path = os.path.join(config_dir, FILE_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return MtaOptions(), []
    except OSError as e:
        return MtaOptions(), [error(path, None, "cannot read: %s" % (e.strerror or e))]
    return parse(data.decode("utf-8", "replace"), path)
