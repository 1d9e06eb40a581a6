"""What this process has done since it started, counted once: the one place the session code
reports events to, read by ``mmproxy status`` (over the control socket) and by the Prometheus
metrics (every worker's figures added up).

Each event is one call that adds to a counter held in plain dictionaries: no lock (callbacks and
greenlets run one at a time on the hub), no object made per login beyond the integers themselves.
:func:`snapshot` is the whole state as JSON-ready data; :func:`combine` adds the snapshots of
several workers.  Names used as keys: ``service`` a kinds.SERVICES name ("imap", "pop", "smtp");
``outcome`` "ok" or the failure's words (session.failure_kind) with underscores; ``reason`` of a
refusal one of REFUSALS; ``cache`` "ldap" or "auth"; ``op`` of a directory request "search" or
"bind"; durations in seconds.
"""
from __future__ import annotations

import bisect
from typing import Any, Dict, List

# seconds: Prometheus' default buckets, which span a cached answer to a store at its timeout
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
REFUSALS = ("connlimits", "tcpaccess", "access_filter", "badguys", "proxy_protocol")

_logins: Dict[str, Dict[str, int]] = {}           # service -> outcome -> logins
_refusals: Dict[str, Dict[str, int]] = {}         # service -> reason -> connections or logins
_cache: Dict[str, List[int]] = {}                 # cache -> [hits, misses]
_relayed: Dict[str, List[int]] = {}               # service -> [bytes client->store, store->client] of ended relays
_directory: Dict[str, "Histogram"] = {}           # op -> seconds per request
_store: Dict[str, "Histogram"] = {}               # service -> seconds from the connect to the store's login answer
_redis: Dict[str, int] = {}                       # op -> round trips to the fleet's Redis (redisstate.py)


class Histogram:
    """Observations counted per bucket of BUCKETS (``counts[i]``: those <= BUCKETS[i], not
    cumulative; the last: above them all) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """One observation: its bucket counted, its seconds added (no allocation but the float sum)."""
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds


def _add(table: Dict[str, Dict[str, int]], key: str, sub: str) -> None:
    try:
        row = table[key]
    except KeyError:
        row = table[key] = {}
    row[sub] = row.get(sub, 0) + 1


def login(service: str, outcome: str) -> None:
    """A login answered: ``outcome`` "ok", or why it failed (the failure's words)."""
    _add(_logins, service, outcome)


def refused(service: str, reason: str) -> None:
    """A connection refused (ConnLimits, TCPAccess), a login refused by the user's access filter
    (TCPAccessAttr), or an answer delayed by BadGuys: ``reason`` one of REFUSALS."""
    _add(_refusals, service, reason)


def redis_request(op: str) -> None:
    """One round trip to the fleet's Redis: ``op`` "admit" (ConnLimits with the BadGuys sentence),
    "penalty", "add_penalty", "release", "forgive", "login_record", "writes" (queued writes in one
    pipeline), "renew" (the lease)."""
    _redis[op] = _redis.get(op, 0) + 1


def cache(name: str, hit: bool) -> None:
    """One look into a directory cache (``name`` "ldap": entries; "auth": PreAuth results)."""
    try:
        row = _cache[name]
    except KeyError:
        row = _cache[name] = [0, 0]
    row[0 if hit else 1] += 1


def _observe(table: Dict[str, Histogram], key: str, seconds: float) -> None:
    try:
        h = table[key]
    except KeyError:
        h = table[key] = Histogram()
    h.observe(seconds)


def directory_time(op: str, seconds: float) -> None:
    """One directory request ("search" as BindDN, "bind" as the user), failover included."""
    _observe(_directory, op, seconds)


def store_time(service: str, seconds: float) -> None:
    """One login at a store: connect, greeting, the replayed login, its answer."""
    _observe(_store, service, seconds)


def relayed(service: str, up: int, down: int) -> None:
    """A relay ended, having moved ``up`` bytes client->store and ``down`` store->client."""
    try:
        row = _relayed[service]
    except KeyError:
        row = _relayed[service] = [0, 0]
    row[0] += up
    row[1] += down


def snapshot() -> Dict[str, Any]:
    """Everything counted so far, as JSON-ready data (what the control socket's ``stats`` answers)."""
    return {
        "logins": {s: dict(row) for s, row in _logins.items()},
        "refusals": {s: dict(row) for s, row in _refusals.items()},
        "cache": {c: {"hits": row[0], "misses": row[1]} for c, row in _cache.items()},
        "relayed_bytes": {s: {"up": row[0], "down": row[1]} for s, row in _relayed.items()},
        "directory_seconds": {k: {"counts": list(h.counts), "sum": h.sum} for k, h in _directory.items()},
        "store_seconds": {k: {"counts": list(h.counts), "sum": h.sum} for k, h in _store.items()},
        "redis_requests": dict(_redis),
    }


def combine(snapshots: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The sum of several snapshots (each worker's): same shape as one."""
    out: Dict[str, Any] = {}
    for snap in snapshots:
        _merge(out, snap)
    return out


def _merge(into: Dict[str, Any], more: Dict[str, Any]) -> None:
    for k, v in more.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        elif isinstance(v, list):
            old = into.get(k)
            into[k] = [a + b for a, b in zip(old, v)] if old else list(v)
        else:
            into[k] = into.get(k, 0) + v
