"""The directory: find a user's domain, entry and mail host in LDAP, and check the password (PreAuth).

libldap is C and does its own socket I/O, which monkey-patching cannot reach: a python-ldap call that
waits, made in a greenlet, would freeze every session in the process.  So what may wait runs on a
PRIVATE native thread pool (python-ldap releases the GIL inside libldap): opening a connection
(connect, TLS, the BindDN bind) and its first request.  A pooled connection's requests run on the
hub with libldap's asynchronous calls: the request is sent (``search_ext``, ``simple_bind``: a few
hundred bytes into an idle socket, which never waits), the greenlet waits for the connection's
descriptor to turn readable, and ``result3(msgid, timeout=0)`` only takes what has arrived (the
descriptor is non-blocking: a message that arrives in pieces is never waited for inside libldap).
That saves the two thread hand-offs a request would cost.  Each connection serves one request at
a time, and a request that outlives its deadline costs its connection.  Results are cached in
cachetools TTL caches that only greenlets touch, and concurrent lookups of one key share one
request (single flight), so a reconnect storm does not become a search storm.

This module is the only importer of ``ldap``.
"""
from __future__ import annotations

import functools
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.monkey
import ldap
import ldap.dn
import ldap.filter
from cachetools import TTLCache
from gevent.event import AsyncResult
from gevent.queue import Empty, Queue
from gevent.socket import wait_read
from gevent.threadpool import ThreadPool

from mmproxy import ldaptls, stats
from mmproxy.addresses import is_host_name
from mmproxy.config import ServiceConfig
from mmproxy.config.optiondat import MtaOptions
from mmproxy.errors import AmbiguousUser, AuthFailed, DirectoryError, DirectoryUnavailable, MMProxyError
from mmproxy.loginid import LoginId, format_attrs, search_filter
from mmproxy.logs import DETAIL

# python-ldap guards each connection with threading.Lock as looked up at import time, i.e. gevent's
# after patch_all(); the jobs run on native threads, so give them a native lock.
ldap.LDAPLockBaseClass = gevent.monkey.get_original("threading", "Lock")
_INIT_LOCK = gevent.monkey.get_original("threading", "Lock")()  # ldap.initialize() is not thread safe

CONNECT_TIMEOUT = 5.0     # OPT_NETWORK_TIMEOUT: a dead directory host
OP_TIMEOUT = 10.0         # OPT_TIMEOUT: one search or bind
JOB_DEADLINE = 15.0       # the greenlet stops waiting after this (connect + op, with slack)
POOL_SIZE = 8             # concurrent LDAP requests per kind (search, bind) and directory
PROBE_INTERVAL = 5.0      # seconds between checks of a directory host that is down
PROBE_FIRST = 1.0         # the first check, soon: a blip need not cost PROBE_INTERVAL of failed logins

_MISS = object()
_LATE = object()          # _run: the thread did not answer in time
HOSTED_DOMAIN_CLASSES = frozenset({"inetdomain", "maildomain"})
SCHEMA2_DOMAIN_CLASS = "sunManagedOrganization"     # every Schema 2 hosted domain carries it
DOMAIN_ATTRS = ["inetDomainBaseDN", "mailAccessProxyPreAuth", "mailAccessProxyReplay",
                "inetDomainSearchFilter", "objectClass", "inetDomainStatus", "mailDomainStatus"]
USER_STATUS_ATTRS = ("inetUserStatus", "mailUserStatus")
STATUSES = frozenset({"active", "inactive", "deleted", "removed", "disabled", "hold", "overquota"})


def account_status(*values: Optional[str]) -> str:
    """The status of an account from its status attributes, in Messaging Server's order (domain,
    domain mail, user, mail user; every value of each, where a loosened schema allows several):
    the first that is not ``active`` decides; a missing one is active, a value Messaging Server
    does not define is ``inactive`` (Sun Java System Messaging
    Server 6.3 Administration Guide, 9.1.3.2 "Entry Status Checks"; Schema Reference, mailUserStatus)."""
    for value in values:
        v = (value or "active").strip().lower()
        if v != "active":
            return v if v in STATUSES else "inactive"
    return "active"


@dataclass(frozen=True)
class Domain:
    """A hosted domain's node in the DC tree, with its per-domain overrides."""

    name: str
    dn: str
    user_base: str
    preauth: Optional[str] = None        # mailAccessProxyPreAuth (raw yes/no)
    replay: Optional[str] = None         # mailAccessProxyReplay
    search_filter: Optional[str] = None  # inetDomainSearchFilter
    status: str = "active"               # inetDomainStatus, then mailDomainStatus (account_status)
    canonical: str = ""                  # the canonical domain name, when it is not ``name``

    def login_id(self, login: LoginId) -> LoginId:
        """The login as the user search and the store see it: in the canonical domain (%V, %s),
        as Messaging Server names a user of an alias domain (Schema Reference,
        inetCanonicalDomainName, "User Login with inetCanonicalDomainName"); %o stays as typed."""
        return login.in_domain(self.canonical) if self.canonical and login.domain else login

    def overrides(self) -> Dict[str, str]:
        """The per-domain values as legacy parameter names, for ServiceConfig.override()."""
        out = {}
        if self.preauth:
            out["PreAuth"] = self.preauth
        if self.replay:
            out["ReplayFormat"] = self.replay
        return out


@dataclass(frozen=True)
class User:
    dn: str
    attrs: Dict[str, List[str]] = field(default_factory=dict)   # lower-case names
    mailhost: Optional[str] = None
    status: str = "active"        # the account's, its domain's included (account_status)

    def get(self, name: str) -> List[str]:
        return self.attrs.get(name.lower(), [])


@dataclass(frozen=True)
class Outcome:
    """What an LDAP error means for a login: ``words`` for the log line, ``error`` the failure
    raised (session.reply_for maps it to the client's reply), ``failover`` whether another
    connection or host may answer better, ``connection`` whether only the connection is lost (a
    fresh one to the same host may answer: a restarted server, an idle timeout) rather than the
    host (no answer, busy: the next host is tried)."""

    words: str
    error: type
    failover: bool = False
    connection: bool = False


# Every LDAP outcome, classified once.  Results that are answers, not errors, are decided where
# the search runs: no such object = no entry; size limit exceeded (sizelimit=2) = ambiguous.
# A user bind's INVALID_CREDENTIALS is a wrong password (authenticate: AuthFailed).
OUTCOMES: Tuple[Tuple[Any, Outcome], ...] = (
    (ldap.SERVER_DOWN, Outcome("server down", DirectoryUnavailable, True, connection=True)),
    (ldap.CONNECT_ERROR, Outcome("cannot connect (TLS)", DirectoryUnavailable, True)),
    (ldap.TIMEOUT, Outcome("timed out", DirectoryUnavailable, True)),
    (ldap.BUSY, Outcome("busy", DirectoryUnavailable, True)),
    (ldap.UNAVAILABLE, Outcome("unavailable", DirectoryUnavailable, True)),
    (ldap.TIMELIMIT_EXCEEDED, Outcome("time limit exceeded", DirectoryUnavailable, True)),
    (ldap.INVALID_CREDENTIALS, Outcome("BindDN refused", DirectoryError)),
    (ldap.STRONG_AUTH_REQUIRED, Outcome("the directory wants TLS (ldaps:// or StartTLS in LdapURL)", DirectoryError)),
    (ldap.CONFIDENTIALITY_REQUIRED, Outcome("the directory wants TLS (ldaps:// or StartTLS in LdapURL)",
                                            DirectoryError)),
    (ldap.INSUFFICIENT_ACCESS, Outcome("BindDN may not read this", DirectoryError)),
    (ldap.REFERRAL, Outcome("referral (mmproxy does not follow referrals: point LdapURL at a server "
                            "holding the entries)", DirectoryError)),
    (ldap.ADMINLIMIT_EXCEEDED, Outcome("administrative limit exceeded", DirectoryError)),
    (ldap.FILTER_ERROR, Outcome("search filter refused (SearchFormat)", DirectoryError)),
    (ldap.INVALID_DN_SYNTAX, Outcome("invalid DN", DirectoryError)),
)
_OTHER = Outcome("directory error", DirectoryError)


def outcome(error: BaseException) -> Outcome:
    """The Outcome of an ldap.LDAPError (OUTCOMES; anything else: a DirectoryError)."""
    for cls, kind in OUTCOMES:
        if isinstance(error, cls):
            return kind
    return _OTHER


class _Cache:
    """A bounded TTL cache whose entries are fresh for ``ttl`` seconds and kept ``grace`` seconds
    longer (LdapStaleGrace) for when the directory cannot answer; greenlets only.  A size or a
    ttl of 0 keeps nothing, not even for an outage (the operator turned the cache off)."""

    def __init__(self, size: int, ttl: int, grace: int) -> None:
        self.ttl = max(0, ttl)
        self.keep = self.ttl + max(0, grace) if size > 0 and self.ttl > 0 else 0
        self.data: TTLCache = TTLCache(maxsize=max(1, size), ttl=max(1, self.keep))

    def get(self, key: Any) -> Any:
        """The fresh value, or _MISS."""
        item = self.data.get(key)
        if item is None or time.monotonic() - item[1] >= self.ttl:
            return _MISS
        return item[0]

    def stale(self, key: Any) -> Any:
        """The value however old (within ttl + grace), or _MISS."""
        item = self.data.get(key)
        return _MISS if item is None else item[0]

    def put(self, key: Any, value: Any) -> None:
        if self.keep:
            self.data[key] = (value, time.monotonic())


class _Server:
    """One host of LdapURL and whether it answers.  ``generation`` grows each time a connection
    to it is found dead: pooled connections opened before that are not trusted again."""

    def __init__(self, url: str, index: int, host: str, port: int) -> None:
        self.url, self.index, self.host, self.port = url, index, host, port
        self.up = True
        self.generation = 0
        self.probe: Optional[gevent.Greenlet] = None


class _Conn:
    """A pooled python-ldap connection and where it goes.  Its descriptor is made non-blocking: from
    now on its requests run on the hub (:func:`_on_hub`)."""

    __slots__ = ("ldap", "server", "generation", "opened")

    def __init__(self, conn: Any, server: _Server) -> None:
        self.ldap, self.server, self.generation, self.opened = conn, server, server.generation, time.monotonic()
        os.set_blocking(conn.fileno(), False)


# One LDAP request: ``start(conn)`` sends it and returns its message id; ``done(get)`` makes the
# value of its answer, ``get()`` returning result3's tuple or raising its ldap.LDAPError.
Start = Callable[[Any], int]
Done = Callable[[Callable[[], Any]], Any]
Op = Tuple[Start, Done]


def _on_thread(conn: Any, op: Op) -> Any:
    """``op`` on ``conn``, waiting inside libldap (a pool thread only); ldap.LDAPError."""
    start, done = op
    msgid = start(conn)
    return done(lambda: conn.result3(msgid, 1, OP_TIMEOUT))


def _on_hub(conn: Any, op: Op, seconds: float) -> Any:
    """``op`` on the pooled ``conn`` from a greenlet: sent at once, its answer collected as it
    arrives, never waiting inside libldap.  ldap.LDAPError; ldap.TIMEOUT when no whole answer came
    within ``seconds`` (as libldap's own OPT_TIMEOUT would say)."""
    start, done = op
    msgid = start(conn)
    deadline = time.monotonic() + seconds
    fd = conn.fileno()

    def get() -> Any:
        while True:
            answer = conn.result3(msgid, 1, 0)          # timeout 0: what has arrived, no waiting
            if answer[0] is not None:
                return answer
            left = deadline - time.monotonic()
            if left <= 0:
                raise ldap.TIMEOUT({"desc": "Timed out", "info": "no answer in %gs" % seconds})
            try:
                wait_read(fd, left)
            except TimeoutError:                     # socket.timeout: the loop says so
                pass
    return done(get)


class _Conns:
    """Connections checked out of a gevent queue; each serves one job at a time."""

    def __init__(self, size: int) -> None:
        self.free: Queue = Queue()
        self.size = size
        self.count = 0

    def take(self) -> Optional[_Conn]:
        """A free connection, or None when the caller may open one (counted from now)."""
        try:
            return self.free.get_nowait()
        except Empty:
            pass
        if self.count < self.size:
            self.count += 1
            return None            # the job opens a new one
        try:
            return self.free.get(timeout=JOB_DEADLINE)
        except Empty:
            raise DirectoryUnavailable("no free directory connection in %ss" % JOB_DEADLINE) from None

    def give(self, conn: _Conn) -> None:
        self.free.put(conn)

    def lose(self) -> None:
        self.count -= 1


class Directory:
    """Lookups for one service's settings (LdapURL, BindDN, caches, HostedDomains...)."""

    # Every parameter the constructor reads: two configurations equal in these (and in option.dat)
    # make the same directory, so a refresh keeps the running one with its caches and connections.
    PARAMS = ("LdapURL", "LdapCAFile", "BindDN", "BindPass", "HostedDomains", "MailHostAttrs",
              "LdapRefreshInterval", "LdapStaleGrace", "LdapCacheSize", "LdapCacheTTL", "LdapNegativeCacheTTL",
              "AuthCacheSize", "AuthCacheTTL", "UserGroupDN", "CertMapDN")

    @classmethod
    def settings_of(cls, cfg: ServiceConfig, mta: MtaOptions = MtaOptions()) -> Tuple[Any, ...]:
        """What makes a directory: the values of PARAMS in ``cfg``, its service and ``mta``."""
        return (cfg.kind, mta, *(repr(getattr(cfg, name)) for name in cls.PARAMS))

    def __init__(self, cfg: ServiceConfig, mta: MtaOptions = MtaOptions()) -> None:
        self.settings = self.settings_of(cfg, mta)
        url = cfg.LdapURL
        # a service's directory writes to that service's log file (mmproxy.imap.directory...)
        self.log = logging.getLogger("mmproxy.%s.directory" % cfg.kind if cfg.kind else __name__)
        self.servers = [_Server(u, i, *url.hosts[i]) for i, u in enumerate(url.urls())]
        self.starttls = url.starttls
        self.ca_file = cfg.LdapCAFile
        self.base = url.base
        self.bind_dn = cfg.BindDN or ""
        self.bind_pw = cfg.BindPass or ""
        self.hosted = cfg.HostedDomains
        self.mailhost_attrs = list(cfg.MailHostAttrs)
        self.refresh = cfg.LdapRefreshInterval or float("inf")
        self.grace = cfg.LdapStaleGrace
        self.cache = _Cache(cfg.LdapCacheSize, cfg.LdapCacheTTL, self.grace)
        self.negative: TTLCache = TTLCache(maxsize=max(1, cfg.LdapCacheSize), ttl=max(1, cfg.LdapNegativeCacheTTL))
        self.negative_ttl = cfg.LdapNegativeCacheTTL if cfg.LdapCacheSize > 0 else 0
        self.auth_cache = _Cache(cfg.AuthCacheSize, cfg.AuthCacheTTL, self.grace)
        self._auth_key = os.urandom(32)      # per process: cache keys are useless outside it
        self.pool = ThreadPool(2 * POOL_SIZE + 1)   # + 1: a probe of a host that is down
        self.searchers = _Conns(POOL_SIZE)
        self.binders = _Conns(POOL_SIZE)
        self._inflight: Dict[Any, AsyncResult] = {}
        self.mta = mta                      # option.dat: the schema level and the domain attributes
        self.user_group_dn = cfg.UserGroupDN or cfg.CertMapDN or self.base     # Schema 2 searches
        self._closed = False

    def close(self) -> None:
        self._closed = True
        for server in self.servers:
            if server.probe is not None:
                server.probe.kill(block=False)
        # from the hub, ThreadPool.kill() does not wait for the threads: one stuck on a hung server
        # would hold a stopping daemon until the operation times out
        gevent.get_hub().loop.run_callback(self.pool.kill)

    # ------------------------------------------------------------------ servers
    def _order(self) -> List[_Server]:
        """Where a new connection goes: the hosts that answer in LdapURL's order, then those
        marked down (a request still tries them when nothing else is left)."""
        return sorted(self.servers, key=lambda s: (not s.up, s.index))

    def _usable(self, conn: _Conn) -> bool:
        """A pooled connection may serve another job: not older than LdapRefreshInterval, opened
        after its host was last found dead, and no host before its own answers again (failback)."""
        server = conn.server
        if conn.generation != server.generation or time.monotonic() - conn.opened > self.refresh:
            return False
        return not any(s.up for s in self.servers[:server.index])

    def _down(self, server: _Server, why: str) -> None:
        """A fresh connection to ``server`` failed: one log line when it changes state, and a
        probe every PROBE_INTERVAL seconds until it answers again."""
        server.generation += 1
        if not server.up:
            return
        server.up = False
        others = [s.url for s in self._order() if s.up]
        self.log.warning("directory %s is down (%s); %s", server.url, why,
                    "using %s" % others[0] if others else "no other directory host answers")
        if (server.url.startswith("ldaps:") or self.starttls) and not self._closed:
            gevent.spawn(self._explain, server)
        if server.probe is None and not self._closed:
            server.probe = gevent.spawn(self._probe, server)

    def _explain(self, server: _Server) -> None:
        """A TLS host went down: one more line naming what is wrong with its certificate, when
        that is it (libldap's own words do not say: ldaptls)."""
        said = ldaptls.reason(server.host, server.port, self.starttls, self.ca_file, CONNECT_TIMEOUT)
        if said is not None:
            self.log.warning("directory %s: %s", server.url, said)

    def _up(self, server: _Server) -> None:
        if not server.up:
            server.up = True
            self.log.warning("directory %s answers again", server.url)

    def _probe(self, server: _Server) -> None:
        """Until ``server`` answers: every PROBE_INTERVAL seconds, connect and bind as BindDN (or
        read the root DSE) on the pool; then mark it up, and connections to later hosts go back."""
        try:
            wait = PROBE_FIRST
            while not server.up:
                gevent.sleep(wait)
                wait = PROBE_INTERVAL
                if server.up:
                    break
                ok = self._run(lambda: self._check(server), JOB_DEADLINE)
                if ok is True:
                    self._up(server)
                else:
                    self.log.debug("directory %s still down: %s", server.url, ok)
        finally:
            server.probe = None

    def _check(self, server: _Server) -> Any:
        """Thread side of a probe: True, or why not (a string)."""
        conn = None
        try:
            conn = self._open(server, True)
            if not self.bind_dn:
                conn.search_ext_s("", ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"], timeout=OP_TIMEOUT)
            return True
        except ldap.LDAPError as e:
            return _ldap_msg(e)
        finally:
            if conn is not None:
                _unbind(conn)

    # ------------------------------------------------------------------ the thread side
    def _open(self, server: _Server, bind: bool) -> Any:
        """A python-ldap connection to ``server`` (thread side): options, StartTLS when LdapURL
        asks for it, the BindDN bind when ``bind``.  Raises ldap.LDAPError."""
        with _INIT_LOCK:
            conn = ldap.initialize(server.url)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        conn.set_option(ldap.OPT_REFERRALS, 0)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, CONNECT_TIMEOUT)
        # libldap bounds an ldaps:// TLS handshake by OPT_NETWORK_TIMEOUT only on an asynchronous
        # connect: else a host that accepts and never answers holds this thread for ever
        conn.set_option(ldap.OPT_CONNECT_ASYNC, 1)
        conn.set_option(ldap.OPT_TIMEOUT, OP_TIMEOUT)
        if server.url.startswith("ldaps:") or self.starttls:
            conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
            if self.ca_file:
                conn.set_option(ldap.OPT_X_TLS_CACERTFILE, self.ca_file)
        conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        if self.starttls:
            conn.start_tls_s()
        if bind and self.bind_dn:
            conn.simple_bind_s(self.bind_dn, self.bind_pw)
        return conn

    def _run(self, fn: Callable[[], Any], seconds: float) -> Any:
        """fn() on the LDAP thread pool, the greenlet waiting at most ``seconds``; _LATE after
        that (fn goes on in its thread).  fn must not raise (errors come back as values)."""
        timer = gevent.Timeout(seconds)
        timer.start()
        try:
            return self.pool.apply(fn)
        except gevent.Timeout as e:
            if e is not timer:
                raise                             # somebody else's deadline
            return _LATE
        finally:
            timer.close()

    def _job(self, conns: _Conns, service_bind: bool, op: Op) -> Any:
        """_attempts, timed (stats: the directory's latency as a login sees it, failover included)."""
        start = time.monotonic()
        try:
            return self._attempts(conns, service_bind, op)
        finally:
            stats.directory_time("search" if service_bind else "bind", time.monotonic() - start)

    def _attempts(self, conns: _Conns, service_bind: bool, op: Op) -> Any:
        """The request ``op`` on a connection of ``conns``: a pooled one from the hub, a fresh one
        (opened, bound as BindDN when ``service_bind``) on the LDAP thread pool; greenlet side.

        Failover: when the connection or its host turns out dead (``outcome`` says which errors),
        the request is tried again on a fresh connection, to the next host when a fresh one
        failed, within JOB_DEADLINE in all; only then DirectoryUnavailable (at once while every host
        is marked down, until a probe finds one answering).  Other LDAP errors are
        mapped by ``outcome``; INVALID_CREDENTIALS of a user bind is re-raised for the caller."""
        if not any(s.up for s in self.servers):
            # every host failed and is being probed: fail at once (the caches may still answer)
            # rather than let each login wait for a dead or hung host and pile up on the pool
            raise DirectoryUnavailable("no directory host answered: every host of LdapURL is down (probed every "
                                       "%g s)" % PROBE_INTERVAL)
        deadline = time.monotonic() + JOB_DEADLINE
        tried: List[_Server] = []
        why = "no directory host"
        for _ in range(len(self.servers) + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn = conns.take()
            if conn is not None and not self._usable(conn):
                self.pool.spawn(_unbind, conn.ldap)
                conn = None
            fresh = conn is None
            if conn is None:
                nxt = next((s for s in self._order() if s not in tried), None)
                if nxt is None:
                    conns.lose()
                    break
                server = nxt
            else:
                server = conn.server

            def first(s: _Server = server) -> Tuple[Any, Any, Optional[BaseException]]:
                # Errors come back as values: gevent's pool prints a traceback for every exception
                # that leaves a job, and neither a wrong password nor a dead server may put one in the log.
                raw = None
                try:
                    raw = self._open(s, service_bind)
                    return raw, _on_thread(raw, op), None
                except ldap.LDAPError as e:
                    return raw, None, e

            try:
                if conn is None:
                    answer = self._run(first, left)
                else:
                    try:
                        answer = conn.ldap, _on_hub(conn.ldap, op, min(left, OP_TIMEOUT)), None
                    except ldap.LDAPError as e:
                        answer = conn.ldap, None, e
            except BaseException:                 # killed, or an outer deadline: the request goes
                conns.lose()                      # on without us, and its connection is lost
                if conn is not None:
                    self.pool.spawn(_unbind, conn.ldap)
                raise
            if answer is _LATE:
                conns.lose()                      # it may still be inside libldap: never reuse it
                why = "no answer in %ds" % JOB_DEADLINE
                self._down(server, why)
                break
            raw, result, error = answer
            if error is None:
                conns.give(conn if conn is not None else _Conn(raw, server))
                if fresh:
                    self._up(server)
                return result
            if isinstance(error, ldap.INVALID_CREDENTIALS) and not service_bind and raw is not None:
                conns.give(conn if conn is not None else _Conn(raw, server))
                raise error                       # the user's password: the caller's answer
            conns.lose()
            if raw is not None:
                self.pool.spawn(_unbind, raw)
            kind = outcome(error)
            why = "%s (%s)" % (kind.words, _ldap_msg(error))
            if not kind.failover:
                raise kind.error("directory %s: %s" % (server.url, why))
            if fresh or not kind.connection:      # the host does not answer (a pooled connection's
                self._down(server, why)           # timeout too: a hung server accepts fresh ones and
                tried.append(server)              # never answers them): the next host
            else:                                 # a pooled connection died (an idle timeout, a
                server.generation += 1            # restarted server): its siblings are suspect too;
                self.log.debug("directory %s: a pooled connection failed: %s", server.url, why)   # retry fresh
        raise DirectoryUnavailable("no directory host answered: %s" % why)

    def _single(self, key: Any, fn: Callable[[], Any]) -> Any:
        """Concurrent calls with the same key wait for the first one's answer."""
        pending = self._inflight.get(key)
        if pending is not None:
            return pending.get()
        pending = self._inflight[key] = AsyncResult()
        try:
            value = fn()
        except (MMProxyError, ldap.LDAPError) as e:
            pending.set_exception(e)
            raise
        else:
            pending.set(value)
            return value
        finally:
            del self._inflight[key]
            if not pending.ready():                # killed, or failed as nobody foresaw: no waiter hangs
                pending.set_exception(DirectoryUnavailable("directory lookup abandoned"))

    def _search_raw(self, base: str, scope: int, flt: str, attrs: Optional[List[str]],
                    sizelimit: int = 2) -> List[Tuple[str, Dict[str, List[bytes]]]]:
        """The entries (DN, attributes as the server sent them) of one search as BindDN, search
        references left out: none when ``base`` does not exist; past ``sizelimit`` entries, that
        many placeholder rows ("", {}) (more than one match: ambiguous)."""
        def start(conn: Any) -> int:
            return int(conn.search_ext(base, scope, flt, attrs, timeout=OP_TIMEOUT, sizelimit=sizelimit))

        def done(get: Callable[[], Any]) -> Any:
            try:
                return get()[1]
            except ldap.NO_SUCH_OBJECT:
                return []
            except ldap.SIZELIMIT_EXCEEDED:
                return [("", {})] * sizelimit
        return [(dn, a) for dn, a in self._job(self.searchers, True, (start, done)) if dn is not None]

    def _search(self, base: str, scope: int, flt: str,
                attrs: Optional[List[str]]) -> List[Tuple[str, Dict[str, List[str]]]]:
        """_search_raw with lower-case attribute names and values as text."""
        return [(dn, {k.lower(): [v.decode("utf-8", "replace") for v in vs] for k, vs in a.items()})
                for dn, a in self._search_raw(base, scope, flt, attrs)]

    def _cached(self, key: Any, fn: Callable[[], Any]) -> Any:
        """fn()'s answer for ``key``, through the caches: a found entry for LdapCacheTTL seconds
        (and LdapStaleGrace longer while the directory cannot answer), None (nothing found) for
        LdapNegativeCacheTTL seconds.  Concurrent misses share one request."""
        value = self.cache.get(key)
        if value is not _MISS:
            stats.cache("ldap", True)
            return value
        if key in self.negative:
            stats.cache("ldap", True)
            return None
        stats.cache("ldap", False)

        def load() -> Any:
            value, fresh = self._or_stale(self.cache, key, fn, "a cached entry past LdapCacheTTL")
            if not fresh:
                return value
            if value is None:
                if self.negative_ttl > 0:
                    self.negative[key] = None
            else:
                self.cache.put(key, value)
            return value
        return self._single(key, load)

    def flush_user(self, user: str) -> int:
        """Forget what the caches hold of ``user`` (a login id, ``uid`` or ``uid@domain``, or a mail
        address; case ignored) so that the next login asks the directory: its entries (found by the
        search filter that names it, or by their uid, mail or mailAlternateAddress), the unknown-user
        answers naming it, and the PreAuth results of its entries.  ``mmproxy flush``, after an
        administrator changed the user's mailHost.  Matching more than one user only costs them a
        lookup.  Returns how many cache entries were dropped."""
        name = user.strip().lower()
        wanted = {name, name.partition("@")[0]}
        needles = ["=%s)" % ldap.filter.escape_filter_chars(v) for v in wanted]

        def names(key: Any) -> bool:
            return isinstance(key, tuple) and key[0] == "user" and any(n in key[2].lower() for n in needles)

        def is_them(value: Any) -> bool:
            return isinstance(value, User) and any(
                v.lower() in wanted for a in ("uid", "mail", "mailAlternateAddress") for v in value.get(a))
        dns = set()
        dropped = 0
        for key, item in list(self.cache.data.items()):
            if names(key) or is_them(item[0]):
                if isinstance(item[0], User):
                    dns.add(item[0].dn.lower())
                dropped += self.cache.data.pop(key, None) is not None
        for key in [k for k in list(self.negative.keys()) if names(k)]:
            dropped += self.negative.pop(key, _MISS) is not _MISS
        for key in [k for k in list(self.auth_cache.data.keys()) if k[0] in dns]:
            dropped += self.auth_cache.data.pop(key, None) is not None
        return dropped

    def _or_stale(self, cache: _Cache, key: Any, fn: Callable[[], Any], what: str) -> Tuple[Any, bool]:
        """(fn(), True); when no directory host answers, (``cache``'s entry for ``key`` however old,
        False) if it has one (LdapStaleGrace), else the DirectoryUnavailable."""
        try:
            return fn(), True
        except DirectoryUnavailable:
            old = cache.stale(key)
            if old is _MISS:
                raise
            self.log.log(DETAIL, "directory unavailable: using %s", what)
            return old, False

    # ------------------------------------------------------------------ lookups
    def find_domain(self, name: str) -> Optional[Domain]:
        """The directory node of a hosted domain, as Messaging Server finds it for its schema level
        (LDAP_SCHEMALEVEL in option.dat; Messaging Server 6.3 Administration Guide, 9.1.1.2 "Domain
        Map Determination of Domain Locality"); None when there is none.  One search per domain not
        in the cache (a DC-tree alias one more, for the node it names, cached as well).

        Schema 1 (and 1.5, Schema 2 compatibility mode): the DC tree node dc=example,dc=com,<LdapURL
        base> (``_dc_domain``).  Schema 2 native mode: the organisation under UserGroupDN whose
        sunPreferredDomain or associatedDomain is the name (``_org_domain``).
        """
        if not self.hosted:
            return Domain(name, self.base, self.base)
        if not is_host_name(name):
            return None            # never let a client-typed string shape a DN or a filter
        return self._org_domain(name) if self.mta.native else self._dc_domain(name)

    def _domain_attrs(self) -> List[str]:
        m = self.mta
        return sorted({*DOMAIN_ATTRS, m.domain_attr_basedn, m.domain_attr_alias, m.domain_attr_canonical,
                       m.attr_domain1_schema2})

    def _domain(self, name: str, dn: str, a: Dict[str, List[str]], canonical: str) -> Domain:
        """A Domain from a domain node's attributes; ``canonical``: its name when the node does not
        say (LDAP_DOMAIN_ATTR_CANONICAL, inetCanonicalDomainName)."""
        def first(k: str) -> Optional[str]:
            values = a.get(k.lower())
            return values[0] if values else None
        canonical = (first(self.mta.domain_attr_canonical) or canonical).strip().lower()
        return Domain(name, dn, first(self.mta.domain_attr_basedn) or dn, first("mailAccessProxyPreAuth"),
                      first("mailAccessProxyReplay"), first("inetDomainSearchFilter"),
                      account_status(*a.get("inetdomainstatus", []), *a.get("maildomainstatus", [])),
                      canonical if canonical != name else "")

    def _dc_node(self, dn: str) -> Optional[Dict[str, List[str]]]:
        """The attributes of one DC-tree node (None: no such entry), cached."""
        def load() -> Optional[Dict[str, List[str]]]:
            rows = self._search(dn, ldap.SCOPE_BASE, "(objectClass=*)", self._domain_attrs())
            return rows[0][1] if rows else None
        return self._cached(("dc-node", dn.lower()), load)

    def _dc_domain(self, name: str) -> Optional[Domain]:
        """Schema 1: the DC-tree node of ``name``.  Only a node that is a domain of the Sun schema
        (objectClass inetDomain or mailDomain) is one: ``dc=com`` exists too, and a login as
        ``user@com`` must not search all of it.

        A node without a user base (LDAP_DOMAIN_ATTR_BASEDN, inetDomainBaseDN) that names another
        (LDAP_DOMAIN_ATTR_ALIAS, aliasedObjectName: an inetDomainAlias) is an alias: the domain is
        the node it names, whose name is the canonical one (unless it has inetCanonicalDomainName);
        one hop, as in Messaging Server ("processing can return to step 4 at most once"), so an
        alias of an alias, or a loop, is refused with a log line.  An index node (inetDomain with
        its own inetDomainBaseDN and inetCanonicalDomainName) keeps its own settings and users'
        base, and names the canonical domain.
        """
        dn = _dc_dn(name, self.base)

        def load() -> Optional[Domain]:
            a = self._dc_node(dn)
            if a is None:
                return None
            target = self._alias_target(a)
            if target is None:
                return self._hosted(name, dn, a, name)
            b = self._dc_node(target) if ldap.dn.is_dn(target) else None
            if b is None:
                self.log.warning("domain alias %s names %r, which is no entry; refusing %s", dn, target, name)
                return None
            if self._alias_target(b) is not None:
                self.log.warning("domain alias %s names %s, another alias: one hop only; refusing %s", dn, target, name)
                return None
            return self._hosted(name, target, b, _dc_name(target) or name)
        return self._cached(("domain", dn), load)

    def _alias_target(self, a: Dict[str, List[str]]) -> Optional[str]:
        """The DN a DC-tree alias node names, None when the node is no alias."""
        if a.get(self.mta.domain_attr_basedn.lower()):
            return None
        values = a.get(self.mta.domain_attr_alias.lower())
        return values[0] if values else None

    def _hosted(self, name: str, dn: str, a: Dict[str, List[str]], canonical: str) -> Optional[Domain]:
        if not HOSTED_DOMAIN_CLASSES & {c.lower() for c in a.get("objectclass", [])}:
            self.log.info("%s is no hosted domain (objectClass inetDomain or mailDomain)", dn)
            return None
        return self._domain(name, dn, a, canonical)

    def _org_domain(self, name: str) -> Optional[Domain]:
        """Schema 2 native mode: the organisation (objectClass sunManagedOrganization) under
        UserGroupDN (or CertMapDN, else the LdapURL base) whose sunPreferredDomain or
        associatedDomain (LDAP_ATTR_DOMAIN1_SCHEMA2 / LDAP_ATTR_DOMAIN2_SCHEMA2) is ``name``; its
        users are below it (or below its inetDomainBaseDN when it is an index node).  The canonical
        name is inetCanonicalDomainName, else sunPreferredDomain (Administration Guide 9.1.2.2).
        Two organisations with the name is a provisioning error: refused with a log line."""
        m = self.mta
        value = ldap.filter.escape_filter_chars(name)
        flt = "(&(objectClass=%s)(|(%s=%s)(%s=%s)))" % (SCHEMA2_DOMAIN_CLASS, m.attr_domain1_schema2, value,
                                                       m.attr_domain2_schema2, value)

        def load() -> Optional[Domain]:
            rows = self._search(self.user_group_dn, ldap.SCOPE_SUBTREE, flt, self._domain_attrs())
            if len(rows) != 1:
                if rows:
                    self.log.warning("more than one organisation under %s is domain %s; refusing it",
                                self.user_group_dn, name)
                return None
            dn, a = rows[0]
            preferred = a.get(m.attr_domain1_schema2.lower())
            return self._domain(name, dn, a, preferred[0] if preferred else name)
        return self._cached(("organisation", self.user_group_dn, name), load)

    def find_user(self, login: LoginId, search_format: str, extra_attrs: Sequence[str] = (),
                  client_ip: str = "", server_ip: str = "") -> Tuple[Optional[Domain], Optional[User]]:
        """Domain and user entry for a login; (domain, None) when the user does not exist."""
        domain = self.find_domain(login.domain) if self.hosted else Domain(login.domain, self.base, self.base)
        if domain is None:
            return None, None
        login = domain.login_id(login)        # an alias domain's users are searched in the canonical one
        fmt = domain.search_filter or search_format
        flt = search_filter(fmt, login, client_ip, server_ip)
        attrs = _user_attrs(tuple(self.mailhost_attrs), tuple(extra_attrs), domain.replay or "")

        def load() -> Optional[User]:
            rows = self._search(domain.user_base, ldap.SCOPE_SUBTREE, flt, list(attrs))
            if len(rows) > 1:
                raise AmbiguousUser("search %s under %s matched more than one entry" % (flt, domain.user_base))
            if not rows:
                return None
            dn, a = rows[0]
            host = next((a[h.lower()][0] for h in self.mailhost_attrs if a.get(h.lower())), None)
            status = account_status(domain.status, *(v for k in USER_STATUS_ATTRS for v in a.get(k.lower(), [])))
            return User(dn, a, host, status)
        return domain, self._cached(("user", domain.user_base, flt, attrs), load)

    def certificate_entries(self, base: str, base_only: bool, terms: Sequence[Tuple[str, str]],
                            cert_der: Optional[bytes] = None) -> List[Tuple[str, Dict[str, List[str]]]]:
        """The entries one certmap.conf search finds (CertmapFile; at most two: more is ambiguous),
        with their uid and mail: under ``base`` (only ``base`` itself when ``base_only``), having
        every (attribute, value) of ``terms`` (values escaped here, RFC 4515; the attribute names
        come from the certmap file).  With ``cert_der`` (VerifyCert on), only entries whose
        userCertificate holds exactly that certificate.  Never cached: a certificate login is rare
        and a revoked mapping must take effect at once.  DirectoryUnavailable or DirectoryError when
        the directory fails."""
        if not ldap.dn.is_dn(base):
            return []                    # a certificate subject that is no DN maps to nobody
        flt = ("(&%s)" % "".join("(%s=%s)" % (a, ldap.filter.escape_filter_chars(v)) for a, v in terms)
               if terms else "(objectClass=*)")
        attrs = ["uid", "mail"] + (["userCertificate;binary"] if cert_der is not None else [])
        out = []
        for dn, a in self._search_raw(base, ldap.SCOPE_BASE if base_only else ldap.SCOPE_SUBTREE, flt, attrs):
            certs = [v for k, vs in a.items() if k.lower().startswith("usercertificate") for v in vs]
            if cert_der is not None and dn and cert_der not in certs:
                continue
            out.append((dn, {k.lower(): [v.decode("utf-8", "replace") for v in vs]
                             for k, vs in a.items() if not k.lower().startswith("usercertificate")}))
        return out

    def read_password(self, user: User) -> Optional[bytes]:
        """The clear-text userPassword (octets, as stored) for a challenge-response login (APOP,
        CRAM-MD5), read with BindDN.

        Never cached: the caches must not hold passwords.  None when it is missing or hashed.
        """
        rows = self._search_raw(user.dn, ldap.SCOPE_BASE, "(objectClass=*)", ["userPassword"], sizelimit=1)
        values = [v for _, a in rows for k, vs in a.items() if k.lower() == "userpassword" for v in vs]
        clear = [v for v in values if not (v.startswith(b"{") and b"}" in v)]
        return clear[0] if clear else None

    def authenticate(self, user: User, password: bytes) -> None:
        """PreAuth: a simple bind as the user with the password's octets (RFC 4511 section 4.2).
        AuthFailed on a wrong password, DirectoryUnavailable/DirectoryError (AuthTempFail) when the
        directory cannot say; a result cached within AuthCacheTTL (+ LdapStaleGrace while no host answers)
        is not asked again."""
        if not password:
            raise AuthFailed("empty password")      # an empty password would be an anonymous bind
        key = (user.dn.lower(), hmac.digest(self._auth_key, user.dn.encode() + b"\0" + password, "sha256"))
        if self.auth_cache.get(key) is not _MISS:
            stats.cache("auth", True)
            return
        stats.cache("auth", False)

        bind: Op = (lambda conn: int(conn.simple_bind(user.dn, password)), lambda get: get() and None)
        try:
            _, fresh = self._or_stale(self.auth_cache, key,
                                      lambda: self._single(("bind", key), lambda: self._job(self.binders, False, bind)),
                                      "a PreAuth result past AuthCacheTTL")
        except ldap.INVALID_CREDENTIALS:
            raise AuthFailed("wrong password") from None
        if fresh:
            self.auth_cache.put(key, True)


@functools.lru_cache(maxsize=4096)
def _dc_dn(name: str, base: str) -> str:
    """The DC-tree DN of domain ``name`` under ``base`` ("example.com" -> "dc=example,dc=com,<base>"),
    worked out once per name."""
    dn = ",".join("dc=" + ldap.dn.escape_dn_chars(label) for label in name.split("."))
    return dn + "," + base if base else dn


def _dc_name(dn: str) -> str:
    """The domain name of a DC-tree DN: its leading dc= values ("dc=example,dc=com,o=internet" ->
    "example.com"); "" when it starts with no dc=."""
    labels = []
    for rdn in ldap.dn.str2dn(dn):
        if len(rdn) != 1 or rdn[0][0].lower() != "dc":
            break
        labels.append(rdn[0][1])
    return ".".join(labels).lower()


@functools.lru_cache(maxsize=256)
def _user_attrs(mailhost_attrs: Tuple[str, ...], extra: Tuple[str, ...], replay: str) -> Tuple[str, ...]:
    """The attributes a user search asks for, sorted (they are part of the cache key), worked out
    once per combination of settings."""
    return tuple(sorted({"uid", *mailhost_attrs, *extra, *format_attrs(replay), *USER_STATUS_ATTRS}))


def _unbind(conn: Any) -> None:
    try:
        conn.unbind_s()
    except ldap.LDAPError:
        pass


def _ldap_msg(e: Exception) -> str:
    arg = e.args[0] if e.args else None
    if isinstance(arg, dict):
        return arg.get("desc", "") + ((": " + arg["info"]) if arg.get("info") else "")
    return str(e)
