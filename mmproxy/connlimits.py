"""ConnLimits: how many connections one client address may hold at once (legacy ``IP|MASK:NUM`` rules).

An admission check answers yes or no; the protocol phrases the refusal.  Counts live in the worker
process that accepted the connection (with ``NumThreads`` > 1 each worker counts its own).
"""
from __future__ import annotations

import ipaddress
from typing import Dict, Optional, Sequence, Tuple, Union

from mmproxy.addresses import address_key, unmapped

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConnLimits:
    """``IP|MASK:NUM`` rules, most specific first: the first rule that covers a client address sets
    how many connections that address may hold at once; an address no rule covers is not limited."""

    def __init__(self, rules: Sequence[Tuple[Network, int]]) -> None:
        self.rules = tuple(rules)
        self.counts: Dict[str, int] = {}

    def limit_for(self, ip: str) -> Optional[int]:
        """The number of connections ``ip`` may hold, or None when no rule covers it."""
        try:
            a = unmapped(ip)
        except ValueError:
            return None
        for net, limit in self.rules:
            if a.version == net.version and a in net:
                return limit
        return None

    def acquire(self, ip: str) -> bool:
        """Count one more connection from ``ip``; False (nothing counted) when over its limit."""
        key = address_key(ip)
        limit = self.limit_for(key)
        n = self.counts.get(key, 0)
        if limit is not None and n >= limit:
            return False
        self.counts[key] = n + 1
        return True

    def release(self, ip: str) -> None:
        """Give back one connection of ``ip``."""
        key = address_key(ip)
        n = self.counts.get(key, 0) - 1
        if n > 0:
            self.counts[key] = n
        else:
            self.counts.pop(key, None)
