"""Admission checks before a session starts: ConnLimits (simultaneous connections per client address).

A guard answers yes or no; the protocol phrases the refusal.  Counts live in the worker process
that accepted the connection (with ``NumThreads`` > 1 each worker counts its own).
"""
from __future__ import annotations

import ipaddress
from typing import Dict, Optional, Sequence, Tuple, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def unmapped(ip: str) -> Address:
    """One spelling per client address: an IPv4-mapped IPv6 address is the IPv4 one, a zone is
    dropped.  ValueError when ``ip`` is no address."""
    a = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _address(ip: str) -> Optional[Address]:
    try:
        return unmapped(ip)
    except ValueError:
        return None


class ConnLimits:
    """``IP|MASK:NUM`` rules, most specific first: the first rule that covers a client address sets
    how many connections that address may hold at once; an address no rule covers is not limited."""

    def __init__(self, rules: Sequence[Tuple[Network, int]]) -> None:
        self.rules = tuple(rules)
        self.counts: Dict[str, int] = {}

    def limit_for(self, ip: str) -> Optional[int]:
        a = _address(ip)
        if a is None:
            return None
        for net, limit in self.rules:
            if a.version == net.version and a in net:
                return limit
        return None

    def acquire(self, ip: str) -> bool:
        """Count one more connection from ``ip``; False (nothing counted) when over its limit."""
        limit = self.limit_for(ip)
        n = self.counts.get(ip, 0)
        if limit is not None and n >= limit:
            return False
        self.counts[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        n = self.counts.get(ip, 0) - 1
        if n > 0:
            self.counts[ip] = n
        else:
            self.counts.pop(ip, None)
