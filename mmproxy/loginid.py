"""Login ids: splitting user and domain as the legacy MMP did, and the legacy %-formats
(SearchFormat, ReplayFormat and their per-domain forms).

What a client typed reaches LDAP and the store only through here, so the rules that keep it
harmless live in one place: single-pass expansion (a ``%`` the user typed is never expanded again)
and RFC 4515 escaping of every value substituted into a filter.  (Which octets may be a login id at
all is decided before, in ``login.credentials``; a domain name is checked before it shapes a DN, in
``directory``.)
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Callable, List, Mapping, Optional, Sequence, Tuple


@dataclass(frozen=True)
class LoginId:
    """A login id split as the legacy MMP did."""

    original: str      # %o: as typed by the client
    user: str          # %U: the user id part
    domain: str        # %V: the (virtual) domain, lower case; "" when none
    canonical: str     # %s: user + CanonicalVirtualDomainDelim + domain (or just user)
    delim: str = "@"   # CanonicalVirtualDomainDelim

    def in_domain(self, domain: str) -> "LoginId":
        """The same login in ``domain`` (a domain alias's canonical domain): %V and %s change, %o
        (what the client typed) and %U stay."""
        domain = domain.lower()
        if not domain or domain == self.domain:
            return self
        return replace(self, domain=domain, canonical=self.user + self.delim + domain)


def split_login(login: str, delims: str, default_domain: Optional[str], canonical_delim: str) -> LoginId:
    """Split at the LAST of any delimiter character (the MMP searches from the end); apply DefaultDomain."""
    cut = max((login.rfind(c) for c in delims), default=-1) if delims else -1
    if cut >= 0:
        user, domain = login[:cut], login[cut + 1:]
    else:
        user, domain = login, default_domain or ""
    domain = domain.lower()
    canonical = user + canonical_delim + domain if domain else user
    return LoginId(login, user, domain, canonical, canonical_delim)


def escape_filter_value(value: str) -> str:
    """RFC 4515 section 3: escape the characters that carry meaning in a filter."""
    out = []
    for ch in value:
        if ch in "\\*()\x00":
            out.append("\\%02x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def expand(fmt: str, values: Mapping[str, str], escape: Callable[[str], str] = lambda s: s,
           attr: Optional[Callable[[str], str]] = None) -> str:
    """Expand %X escapes in ONE pass over ``fmt``; substituted text is never looked at again.

    ``values`` maps the escape letter to its value; ``attr(name)`` answers %A[name].  Unknown escapes
    were refused when the configuration was read, so here they are kept literally.
    """
    out = []
    for text, code, name in _pieces(fmt):
        if code is None:
            out.append(text)
        elif code == "A" and attr is not None and name is not None:
            out.append(escape(attr(name)))
        elif code in values:
            out.append(escape(values[code]))
        else:
            out.append(text)
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _pieces(fmt: str) -> Tuple[Tuple[str, Optional[str], Optional[str]], ...]:
    """A format split once (the same few recur at every login) into (text, code, attribute name):
    literal text with code None, or an escape (its own text, kept when nothing answers it; "A" with
    the name in %A[name])."""
    pieces: List[Tuple[str, Optional[str], Optional[str]]] = []
    literal: List[str] = []
    i, n = 0, len(fmt)

    def piece(text: str, code: Optional[str], name: Optional[str] = None) -> None:
        if literal:
            pieces.append(("".join(literal), None, None))
            literal.clear()
        pieces.append((text, code, name))
    while i < n:
        ch = fmt[i]
        if ch != "%" or i + 1 >= n:
            literal.append(ch)
            i += 1
            continue
        code = fmt[i + 1]
        if code == "%":
            literal.append("%")
            i += 2
        elif code == "A" and fmt.startswith("[", i + 2) and "]" in fmt[i + 3:]:
            end = fmt.index("]", i + 3)
            piece(fmt[i:end + 1], "A", fmt[i + 3:end])
            i = end + 1
        else:
            piece(fmt[i:i + 2], code)
            i += 2
    if literal:
        pieces.append(("".join(literal), None, None))
    return tuple(pieces)


def format_attrs(fmt: str) -> Sequence[str]:
    """The attribute names a format reads with %A[attr]."""
    return re.findall(r"%A\[([^\]]+)\]", fmt)


def search_filter(fmt: str, login: LoginId, client_ip: str = "", server_ip: str = "", cert_dn: str = "") -> str:
    """The user search filter from SearchFormat / inetDomainSearchFilter, escaped and parenthesised."""
    values = {"o": login.original, "s": login.canonical, "U": login.user, "V": login.domain,
              "C": client_ip, "S": server_ip, "D": cert_dn}
    flt = expand(fmt.strip(), values, escape_filter_value)
    # The default "uid=%U" is bare; Sun's samples write "(uid=%s)".  Both must work.
    return flt if flt.startswith("(") else "(" + flt + ")"


def replay_id(fmt: str, login: LoginId, attrs: Mapping[str, Sequence[str]]) -> str:
    """The login id replayed to the store (ReplayFormat / mailAccessProxyReplay)."""
    lower = {k.lower(): v for k, v in attrs.items()}

    def attr(name: str) -> str:
        vals = lower.get(name.lower())
        return vals[0] if vals else ""

    values = {"o": login.original, "s": login.canonical, "U": login.user, "V": login.domain}
    return expand(fmt, values, attr=attr)
