"""Client addresses and host names: one spelling, one syntax, for every part of mmproxy.

A leaf module (standard library only), so the configuration reader can use it as well.  Results
are memoised: the same clients come back, and every session asks about its client more than once.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from typing import Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z", re.I)


@functools.lru_cache(maxsize=16384)
def unmapped(ip: str) -> Address:
    """The address of a client as one object: an IPv4-mapped IPv6 address (a dual-stack listener)
    is the IPv4 one, an IPv6 zone (``%eth0``) is dropped, brackets are allowed.

    Raises ValueError when ``ip`` is no address.
    """
    a = ipaddress.ip_address(ip.strip().strip("[]").split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def in_network(a: Address, net: Network) -> bool:
    """Whether the legacy ``IP|MASK`` pair ``net`` (ConnLimits, BGExcluded) covers the client
    address ``a``: an address of the same family inside it, or any address at all when ``net`` is
    the IPv4 catch-all ``0.0.0.0|0.0.0.0``, which legacy files (written before IPv6) mean as
    "every client".  A more specific IPv6 pair (``2001:db8::/32``) covers IPv6 clients only."""
    if a.version == net.version:
        return a in net
    return net.version == 4 and net.prefixlen == 0


@functools.lru_cache(maxsize=16384)
def address_key(ip: str) -> str:
    """The canonical text of a client address (the key of per-address state); text that is no
    address is returned unchanged, so it can never match a real one."""
    try:
        return str(unmapped(ip))
    except ValueError:
        return ip


@functools.lru_cache(maxsize=4096)
def is_host_name(name: str) -> bool:
    """A syntactically valid DNS host or domain name (RFC 1123 section 2.1: letters, digits and
    hyphens, labels of 1-63 characters, 253 in all), in any case; a final dot is not allowed."""
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))
