"""ConnLimits: how many connections one client address may hold at once (legacy ``IP|MASK:NUM`` rules).

An admission check answers yes or no; the protocol phrases the refusal.  The counts live in the
box's per-client state store (:mod:`mmproxy.state`), so a limit holds for every worker process
together.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Callable, Optional, Sequence, Tuple, Union

from mmproxy import state
from mmproxy.addresses import address_key, in_network, unmapped

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
log = logging.getLogger("mmproxy.state")


def _nothing() -> None:
    pass


class ConnLimits:
    """``IP|MASK:NUM`` rules of one service, most specific first: the first rule that covers a
    client address sets how many connections that address may hold at once; an address no rule
    covers is not limited (and not counted).  The legacy catch-all ``0.0.0.0|0.0.0.0`` covers IPv6
    clients too (:func:`addresses.in_network`), after any IPv6 rule that covers them."""

    def __init__(self, rules: Sequence[Tuple[Network, int]], service: str) -> None:
        self.rules = tuple(rules)
        self.service = service

    def limit_for(self, ip: str) -> Optional[int]:
        """The number of connections ``ip`` may hold, or None when no rule covers it."""
        try:
            a = unmapped(ip)
        except ValueError:
            return None
        for net, limit in self.rules:
            if a.version == net.version and a in net:
                return limit
        return next((limit for net, limit in self.rules if in_network(a, net)), None)

    def admit(self, ip: str) -> Tuple[bool, Callable[[], None]]:
        """Whether one more connection from ``ip`` is allowed, and what gives its slot back when it
        ends.  When the store stays busy the connection is admitted uncounted (fail open: a
        client is never refused for the proxy's own trouble) and a warning logged."""
        key = address_key(ip)
        limit = self.limit_for(key)
        if limit is None:
            return True, _nothing
        store = state.store()
        try:
            if not store.acquire(self.service, key, limit):
                return False, _nothing
        except state.StateBusy as e:
            log.warning("ConnLimits not counted for %s: %s", key, e)
            return True, _nothing

        def release() -> None:
            try:
                store.release(self.service, key)
            except state.StateBusy as e:
                log.warning("ConnLimits slot of %s not given back: %s", key, e)
        return True, release
