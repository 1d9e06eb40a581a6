"""Per-client state shared by every proxy of a fleet, on Redis (``StateRedisURL``): ConnLimits
counts, BadGuys sentences and POP-before-SMTP records, so that a client spread over several boxes
behind a load balancer gets one allowance, not one per box.

:class:`RedisState` implements :class:`state.ClientState` with the ``redis`` client library
(cooperative under gevent's patched sockets: a request never blocks the hub).  Every update is
atomic on the server: a Lua script, or a compare-and-set script after a read.

* ConnLimits: one hash per (service, address), a field per slot held: ``<owner>|<n>``, the owner
  ``<instance>/<token>/<worker>`` (the token random per process: a restarted worker never takes
  over its predecessor's slots).  Taking a slot sets its field, giving it back deletes it: both
  can be repeated without harm, so a request that timed out (Redis stalled: it may still run the
  request later) is settled by sending the release again, and an admission that timed out is
  cancelled by a tombstone its script honours whenever it runs.  A process's slots count only
  while its ``alive`` key exists; it renews that key every LEASE/3 seconds, so the slots of a
  process that died (its box lost power, say) expire within LEASE seconds.
* BadGuys: one hash per (service, address) (badness, last failure), expiring BGDecay seconds after
  the last failure, and a sorted set per service of the addresses by last failure, which bounds
  them at BGMax.  The rules themselves stay in :mod:`mmproxy.badguys`: a failure reads the
  sentence, computes the new one, and writes it only if nobody wrote since (else it reads again).
* POP-before-SMTP: one key per address, expiring after AuthServiceTTL.

:class:`SharedState` puts the process's own store behind it: while Redis does not answer (a
request fails or takes REDIS_TIMEOUT), every operation goes to the local store at once, no client
is refused for it, and one warning is logged per change of state; a probe brings Redis back.
Keys start with ``StateRedisPrefix`` so several fleets (or other programs) share one Redis.
A single Redis server is assumed (not Redis Cluster, no Sentinel discovery): the scripts
touch keys of several addresses.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import gevent
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mmproxy import stats
from mmproxy.state import Penalty, Record, Store

log = logging.getLogger("mmproxy.state")

REDIS_TIMEOUT = 0.5          # seconds one request (or a connect) may take before Redis counts as down
POOL_SIZE = 16               # connections per process; a request waits at most REDIS_TIMEOUT for one
LEASE = 30.0                 # seconds a process's ConnLimits slots outlive its last renewal
PROBE_EVERY = 2.0            # seconds between tries to reach Redis while it is down
CONN_KEY_TTL = 86400 * 1000  # ms a connection-count hash outlives its last acquire (memory, not counts)
# What a request to Redis may raise: the library's errors, and what a connection closed under a
# request raises from inside it.  Any of them: Redis counts as down, nobody is refused for it.
TROUBLE = (redis.RedisError, OSError, AttributeError, ValueError, TypeError, IndexError)
CANCEL_TTL = 3600 * 1000     # ms a tombstone of an admission that timed out is kept
PREFETCH_FRESH = 1.0         # seconds a sentence read with a connection's admission answers its login
PREFETCHED_MAX = 4096        # such sentences kept at most (those of connections that never log in go)

# KEYS[1] the address's slots (hash), KEYS[2] its BadGuys sentence, KEYS[3] this slot's tombstone;
# ARGV: the slot's field (owner|n), limit, alive-key prefix, hash ttl (ms), owner.  Returns
# {1 or 0 (admitted), badness, last} (the sentence read with it)
_ACQUIRE = """
local s = redis.call('HMGET', KEYS[2], 'badness', 'last')
if redis.call('EXISTS', KEYS[3]) == 1 then return {0, s[1], s[2]} end
local total, alive = 0, {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local owner = string.match(f, '^(.*)|') or f
  local live = alive[owner]
  if live == nil then
    live = owner == ARGV[5] or redis.call('EXISTS', ARGV[3] .. owner) == 1
    alive[owner] = live
  end
  if live then total = total + 1 else redis.call('HDEL', KEYS[1], f) end
end
if total >= tonumber(ARGV[2]) then return {0, s[1], s[2]} end
redis.call('HSET', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, s[1], s[2]}
"""
# KEYS[1] the address's sentence, KEYS[2] the service's addresses by last failure;
# ARGV: last failure as read ('' when none), new badness, now, ttl (ms), keep, address, sentence-key prefix
_SET_PENALTY = """
local cur = redis.call('HGET', KEYS[1], 'last')
if (cur or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'badness', ARGV[2], 'last', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if not cur then
  local old = tonumber(ARGV[3]) - tonumber(ARGV[4]) / 1000
  for _, ip in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', old)) do redis.call('DEL', ARGV[7] .. ip) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', old)
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
if not cur then
  local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
  if over > 0 then
    for _, ip in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do redis.call('DEL', ARGV[7] .. ip) end
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""


def redacted(url: str) -> str:
    """``url`` with whatever comes before an ``@`` (a password, or one written where the user
    goes) replaced by ``:***``, for logs and error messages."""
    u = urllib.parse.urlsplit(url)
    if "@" not in u.netloc:
        return url
    return urllib.parse.urlunsplit((u.scheme, ":***@" + u.netloc.rpartition("@")[2], u.path, u.query, u.fragment))


def client(url: str, ca_file: Optional[str] = None, timeout: Optional[float] = REDIS_TIMEOUT,
           pool_size: int = POOL_SIZE) -> redis.Redis:
    """A Redis client for ``url`` (redis://, rediss:// for TLS, unix://; a password in the URL):
    at most ``pool_size`` connections, each request (and connect) bounded by ``timeout`` seconds
    (None: no bound, for a subscriber), no retries (the caller falls back instead).  ``ca_file``:
    the CA certificates a rediss:// server's certificate must chain to (else the system's)."""
    extra: Dict[str, Any] = {}
    if url.startswith("rediss:"):
        extra["ssl_cert_reqs"] = "required"
        if ca_file:
            extra["ssl_ca_certs"] = ca_file
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout or None, socket_timeout=timeout,
        socket_connect_timeout=timeout or REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0), health_check_interval=0,
        protocol=2,                         # RESP2: no HELLO round trip per new connection
        **extra)
    return redis.Redis(connection_pool=pool)


class RedisState:
    """:class:`state.ClientState` on Redis for one process: ``instance`` (InstanceName) and
    ``worker`` name it among the fleet's processes.  Every method raises redis.RedisError when
    Redis does not answer in REDIS_TIMEOUT (:class:`SharedState` falls back then)."""

    def __init__(self, url: str, prefix: str, instance: str, worker: Optional[int] = None,
                 ca_file: Optional[str] = None, clock: Callable[[], float] = time.time,
                 lease: float = LEASE) -> None:
        """Made in the process that uses it (after a worker is forked).  ``lease``: seconds this
        process's slots outlive its last :meth:`renew`."""
        self.url, self.prefix, self.instance = url, prefix, instance
        self.lease = lease
        self.token = os.urandom(6).hex()
        self.clock = clock
        self.redis = client(url, ca_file)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._set_penalty = self.redis.register_script(_SET_PENALTY)
        self.worker = worker or 0
        self._seq = itertools.count(1)
        self._slots: Dict[Tuple[str, str], List[str]] = {}    # held through acquire(): (service, ip) -> fields
        self.uncertain: List[Tuple[str, str, str]] = []        # admissions that timed out, to cancel

    @property
    def worker(self) -> int:
        return self._worker

    @worker.setter
    def worker(self, worker: int) -> None:
        """The worker number (set once a worker is forked): it names this process's slots."""
        self._worker = worker
        self.owner = "%s/%s/%d" % (self.instance, self.token, worker)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def close(self) -> None:
        self.redis.connection_pool.disconnect()

    def remove(self) -> None:
        """The daemon stops: its slots stop counting at once."""
        try:
            self.redis.delete(self.key("alive", self.owner))
        except redis.RedisError:
            pass                                  # they expire within LEASE anyway
        self.close()

    def renew(self) -> None:
        """This process's slots count for another ``lease`` seconds."""
        stats.redis_request("renew")
        self.redis.set(self.key("alive", self.owner), self.instance, px=max(1, int(self.lease * 1000)))

    # ------------------------------------------------------------------ ConnLimits
    def acquire(self, service: str, ip: str, limit: int) -> bool:
        """One more connection of ``ip`` to ``service`` unless the fleet's live processes hold
        ``limit`` already; one round trip."""
        ok, _, slot = self.admit(service, ip, limit)
        if ok:
            self._slots.setdefault((service, ip), []).append(slot)
        return ok

    def admit(self, service: str, ip: str, limit: int) -> Tuple[bool, Optional[Penalty], str]:
        """:meth:`acquire`, and the address's BadGuys sentence at ``service`` read in the same round
        trip: (admitted, sentence or None, the slot to give back with :meth:`release_slot`).  When
        Redis does not answer, the slot is kept in ``uncertain`` for :meth:`cancel` (the request may
        still run later) and redis.RedisError raised."""
        stats.redis_request("admit")
        slot = "%s|%d" % (self.owner, next(self._seq))
        try:
            ok, badness, last = self._acquire(
                keys=[self.key("conn", service, ip), self.key("bg", service, ip), self.key("cancel", slot)],
                args=[slot, limit, self.key("alive", ""), CONN_KEY_TTL, self.owner])
        except TROUBLE:
            self.uncertain.append((service, ip, slot))
            raise
        return bool(ok), _penalty(badness, last), slot

    def release(self, service: str, ip: str) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        slots = self._slots.get((service, ip))
        if slots:
            self.release_slot(service, ip, slots.pop())
            if not slots:
                del self._slots[(service, ip)]

    def release_slot(self, service: str, ip: str, slot: str, pipe: Any = None) -> None:
        """Give back ``slot`` (``pipe``: queued on that pipeline instead); again is harmless."""
        if pipe is None:
            stats.redis_request("release")
        (pipe if pipe is not None else self.redis).hdel(self.key("conn", service, ip), slot)

    def cancel(self) -> None:
        """Settle the admissions that timed out: whenever Redis runs them, they take nothing."""
        while self.uncertain:
            service, ip, slot = self.uncertain[-1]
            stats.redis_request("cancel")
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.key("cancel", slot), 1, px=CANCEL_TTL)
            pipe.hdel(self.key("conn", service, ip), slot)
            pipe.execute()
            self.uncertain.pop()

    def connections(self, service: str, ip: str) -> int:
        """How many connections ``ip`` holds to ``service`` now, every live process together."""
        owners: Dict[str, bool] = {}
        n = 0
        for field in self.redis.hkeys(self.key("conn", service, ip)):
            owner = _text(field).rpartition("|")[0]
            if owner not in owners:
                owners[owner] = owner == self.owner or bool(self.redis.exists(self.key("alive", owner)))
            n += owners[owner]
        return n

    def forget_worker(self, worker: int) -> int:
        """Nothing to do: the slots of a worker that died stop counting LEASE seconds after its
        last renewal."""
        return 0

    # ------------------------------------------------------------------ BadGuys
    def _read_penalty(self, service: str, ip: str) -> Tuple[str, Optional[Penalty]]:
        """(the stored ``last`` exactly as stored, '' when none; the sentence or None)."""
        stats.redis_request("penalty")
        badness, last = self.redis.hmget(self.key("bg", service, ip), ["badness", "last"])
        return ("" if last is None else _text(last)), _penalty(badness, last)

    def penalty(self, service: str, ip: str) -> Optional[Penalty]:
        """The stored sentence of ``ip`` at ``service``, or None; one round trip."""
        return self._read_penalty(service, ip)[1]

    def add_penalty(self, service: str, ip: str, update: Callable[[Optional[Penalty], float], float],
                    keep: int, expiry: float) -> float:
        """As :meth:`state.LocalState.add_penalty`: the new sentence ``update(old, now)`` is written
        only when no other process wrote one since it was read (else read again)."""
        now = self.clock()
        while True:
            seen, old = self._read_penalty(service, ip)
            badness = update(old, now)
            stats.redis_request("add_penalty")
            if self._set_penalty(keys=[self.key("bg", service, ip), self.key("bgidx", service)],
                                 args=[seen, repr(badness), repr(now), max(1, int(expiry * 1000)), keep, ip,
                                       self.key("bg", service, "")]):
                return badness

    def forgive(self, service: str, ip: str, pipe: Any = None) -> None:
        p = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        p.delete(self.key("bg", service, ip))
        p.zrem(self.key("bgidx", service), ip)
        if pipe is None:
            stats.redis_request("forgive")
            p.execute()

    # ------------------------------------------------------------------ AuthService
    def record_login(self, ip: str, user: str, ttl: float, pipe: Any = None) -> None:
        if ttl <= 0:
            return
        now = self.clock()
        (pipe if pipe is not None else self.redis).set(self.key("pop", ip), "%r %r %s" % (now, now + ttl, user),
                                                       px=max(1, int(ttl * 1000)))

    def login_record(self, ip: str) -> Optional[Record]:
        stats.redis_request("login_record")
        raw = self.redis.get(self.key("pop", ip))
        return _record(ip, raw, self.clock())

    def login_records(self) -> Iterable[Record]:
        now = self.clock()
        out = []
        for key in self.redis.scan_iter(match=self.key("pop", "*"), count=1000):
            ip = _text(key)[len(self.key("pop", "")):]
            r = _record(ip, self.redis.get(key), now)
            if r is not None:
                out.append(r)
        return out


def _text(value: Any) -> str:
    """A Redis reply (octets) as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _penalty(badness: Any, last: Any) -> Optional[Penalty]:
    try:
        return Penalty(float(badness), float(last))
    except (TypeError, ValueError):         # none, or not written by mmproxy
        return None


def _record(ip: str, raw: Any, now: float) -> Optional[Record]:
    if raw is None:
        return None
    try:
        at, expires, user = _text(raw).split(" ", 2)
        r = Record(ip, user, float(at), float(expires))
    except ValueError:                      # not written by mmproxy: no record
        return None
    return r if r.expires > now else None


class SharedState:
    """:class:`state.ClientState` for a process of a fleet: :class:`RedisState` while Redis answers,
    ``local`` (this process's own store) while it does not.  No operation raises for Redis's
    trouble; a change of state is logged once (warning)."""

    def __init__(self, remote: RedisState, local: Store) -> None:
        self.remote, self.local = remote, local
        self.up = True
        self.clock = remote.clock
        self._held: Dict[Tuple[str, str], List[Optional[str]]] = {}   # slots: the Redis field, None: local
        self._unreleased: List[Tuple[str, str, str]] = []       # Redis slots to give back once it answers
        self._queued: List[Tuple[str, Tuple[Any, ...]]] = []   # writes nobody waits for: (method, args)
        self._prefetched: Dict[Tuple[str, str], Tuple[Optional[Penalty], float]] = {}   # see acquire
        self._writer: Optional[gevent.Greenlet] = None
        self._probe: Optional[gevent.Greenlet] = None
        self._renewer: Optional[gevent.Greenlet] = None

    @property
    def worker(self) -> int:
        return self.remote.worker

    @worker.setter
    def worker(self, worker: int) -> None:
        self.remote.worker = worker
        self.local.worker = worker

    def start(self) -> None:
        """In the process that serves sessions: renew this process's slots every third of the lease."""
        if self._renewer is None:
            self._renewer = gevent.spawn(self._renew_forever)

    def _renew_forever(self) -> None:
        while True:
            if self.up:
                try:
                    self.remote.renew()
                except TROUBLE as e:
                    self._down(e)
            gevent.sleep(self.remote.lease / 3)

    def _down(self, e: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        log.warning("shared state: Redis at %s does not answer (%s: %s): this process keeps ConnLimits, BadGuys "
                    "and POP-before-SMTP records to itself until it does", redacted(self.remote.url),
                    type(e).__name__, e)
        if self._probe is None or self._probe.dead:
            self._probe = gevent.spawn(self._probe_until_up)

    def _probe_until_up(self) -> None:
        fresh = False
        while not self.up:
            gevent.sleep(PROBE_EVERY)
            if not fresh:       # requests in flight at the loss have timed out by now: no pooled
                self.remote.redis.connection_pool.disconnect()     # connection is trusted again
                fresh = True
            try:
                self.remote.renew()
                self.remote.cancel()
                while self._unreleased:
                    self.remote.release_slot(*self._unreleased[-1])
                    self._unreleased.pop()
            except TROUBLE:
                continue
            self.up = True
            log.warning("shared state: Redis at %s answers again: the state is shared with the fleet",
                        redacted(self.remote.url))

    def _later(self, name: str, *args: Any) -> None:
        """Queue a write nobody waits for (a release, a forgiveness, a POP record): it goes out with
        the others queued meanwhile in one pipelined round trip, from a greenlet of its own.  Safe
        where nothing may block: a relayed session's end runs in an event-loop callback."""
        self._queued.append((name, args))
        if self._writer is None or self._writer.dead:
            self._writer = gevent.spawn(self._write_queued)

    def _write_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            if self.up:
                try:
                    pipe = self.remote.redis.pipeline(transaction=False)
                    for name, args in batch:
                        getattr(self.remote, name)(*args, pipe=pipe)
                    stats.redis_request("writes")
                    pipe.execute(raise_on_error=False)
                    continue
                except TROUBLE as e:
                    self._down(e)
            for name, args in batch:                   # Redis does not answer: kept for later, or here
                if name == "release_slot":
                    self._unreleased.append(args)
                else:
                    getattr(self.local, name)(*args)

    def _call(self, name: str, *args: Any) -> Any:
        if self.up:
            try:
                return getattr(self.remote, name)(*args)
            except TROUBLE as e:
                self._down(e)
        return getattr(self.local, name)(*args)

    # ------------------------------------------------------------------ ClientState
    def acquire(self, service: str, ip: str, limit: int) -> bool:
        """As the local stores; the address's BadGuys sentence comes in the same round trip and
        answers :meth:`penalty` for the same connection's login within PREFETCH_FRESH seconds."""
        slot: Optional[str] = None
        if self.up:
            try:
                ok, sentence, slot = self.remote.admit(service, ip, limit)
                self._remember(service, ip, sentence)
            except TROUBLE as e:
                self._down(e)
                slot = None
        if slot is None:
            ok = self.local.acquire(service, ip, limit)
        if ok:
            self._held.setdefault((service, ip), []).append(slot)
        return ok

    def release(self, service: str, ip: str) -> None:
        """Give back a slot where it was taken; a Redis slot goes with the next queued writes
        (never waited for here: a relayed session's end runs in an event-loop callback)."""
        held = self._held.get((service, ip))
        slot = held.pop() if held else None
        if held is not None and not held:
            del self._held[(service, ip)]
        if slot is None:
            self.local.release(service, ip)
        elif self.up:
            self._later("release_slot", service, ip, slot)
        else:
            self._unreleased.append((service, ip, slot))

    def connections(self, service: str, ip: str) -> int:
        return int(self._call("connections", service, ip))

    def forget_worker(self, worker: int) -> int:
        return int(self.local.forget_worker(worker))

    def _remember(self, service: str, ip: str, sentence: Optional[Penalty]) -> None:
        now = time.monotonic()
        if len(self._prefetched) >= PREFETCHED_MAX:          # connections that never logged in
            for k in [k for k, (_, t) in self._prefetched.items() if now - t >= PREFETCH_FRESH]:
                del self._prefetched[k]
            if len(self._prefetched) >= PREFETCHED_MAX:
                self._prefetched.clear()
        self._prefetched[(service, ip)] = (sentence, now)

    def penalty(self, service: str, ip: str) -> Optional[Penalty]:
        """The sentence read with an admission of this address less than PREFETCH_FRESH seconds
        ago (this process's own failures and forgiveness since drop it), else read now."""
        seen = self._prefetched.get((service, ip))
        if seen is not None and time.monotonic() - seen[1] < PREFETCH_FRESH:
            return seen[0]
        result: Optional[Penalty] = self._call("penalty", service, ip)
        return result

    def add_penalty(self, service: str, ip: str, update: Callable[[Optional[Penalty], float], float],
                    keep: int, expiry: float) -> float:
        self._prefetched.pop((service, ip), None)
        return float(self._call("add_penalty", service, ip, update, keep, expiry))

    def forgive(self, service: str, ip: str) -> None:
        self._prefetched.pop((service, ip), None)
        if self.up:
            self._later("forgive", service, ip)
        else:
            self.local.forgive(service, ip)

    def record_login(self, ip: str, user: str, ttl: float) -> None:
        if self.up:
            self._later("record_login", ip, user, ttl)
        else:
            self.local.record_login(ip, user, ttl)

    def login_record(self, ip: str) -> Optional[Record]:
        result: Optional[Record] = self._call("login_record", ip)
        return result

    def login_records(self) -> Iterable[Record]:
        result: Iterable[Record] = self._call("login_records")
        return result

    def _stop(self) -> None:
        for g in (self._renewer, self._probe):
            if g is not None:
                g.kill(block=False)

    def close(self) -> None:
        self._stop()
        self.remote.close()
        self.local.close()

    def remove(self) -> None:
        """The daemon stops: this process's slots stop counting in the fleet, its own store goes."""
        self._stop()
        self.remote.remove()
        self.local.remove()
