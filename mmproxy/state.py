"""Per-client state shared by every worker process of one box: ConnLimits counts, BadGuys
penalties and POP-before-SMTP (AuthService) records.

The store is an SQLite database on tmpfs (``/dev/shm``), made by the process that starts the
daemon before it forks the workers; each process opens its own connection (an SQLite connection
must not cross a fork).  SQLite gives what hand-made shared memory did not: every update is a
transaction (two workers writing at once cannot produce a record nobody wrote), a worker killed
in the middle of one leaves nothing half-written (the write-ahead log is rolled back), and bounds
and expiry are plain SQL.

Never blocking the hub: on tmpfs no statement waits for a disk, and a statement never waits for
another process's lock inside SQLite (busy timeout 0); a busy database is retried from the hub
with ``gevent.sleep``, so other sessions run meanwhile.  When it stays busy for BUSY_LIMIT the
operation gives up and the caller fails open (a connection is admitted, a failure not counted),
with one warning.

Connection counts are kept per worker process, so that the master can give back the slots of a
worker that died (:meth:`LocalState.forget_worker`) before it starts its replacement.

:class:`ClientState` is the small interface; :class:`LocalState` implements it for one box,
:class:`redisstate.RedisState` for a fleet of boxes sharing a Redis.  A daemon of one process (``NumThreads 1``)
shares its state with nobody: :class:`MemoryState` keeps it in dictionaries, the same rules
without a database (a login touches the store three or four times).
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Protocol, Tuple

import gevent

log = logging.getLogger("mmproxy.state")

BUSY_LIMIT = 2.0             # seconds an operation retries a busy database before it gives up
POP_RECORDS = 65536          # POP-before-SMTP records kept after each sweep (those that expire last)
PURGE_EVERY = 60.0           # seconds between sweeps of empty connection counts and expired rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS conns (
    service TEXT NOT NULL, ip TEXT NOT NULL, worker INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (service, ip, worker)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS badguys (
    service TEXT NOT NULL, ip TEXT NOT NULL, badness REAL NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (service, ip)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS badguys_last ON badguys (service, last);
CREATE TABLE IF NOT EXISTS popauth (
    ip TEXT PRIMARY KEY, user TEXT NOT NULL, at REAL NOT NULL, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS popauth_expires ON popauth (expires);
"""


class ClientState(Protocol):
    """What the services need of a per-client state store: :class:`LocalState` for one box; a
    networked store (several boxes) implements the same.  ``service`` is a kinds.SERVICES name,
    ``ip`` the canonical text of a client address (addresses.address_key); times are
    ``time.time()`` seconds as ``clock`` tells them.  Every method may raise StateBusy."""

    worker: int
    clock: Callable[[], float]

    def acquire(self, service: str, ip: str, limit: int) -> bool: ...
    def release(self, service: str, ip: str) -> None: ...
    def connections(self, service: str, ip: str) -> int: ...
    def forget_worker(self, worker: int) -> int: ...
    def penalty(self, service: str, ip: str) -> Optional["Penalty"]: ...
    def add_penalty(self, service: str, ip: str, update: Callable[[Optional["Penalty"], float], float],
                    keep: int, expiry: float) -> float: ...
    def forgive(self, service: str, ip: str) -> None: ...
    def record_login(self, ip: str, user: str, ttl: float) -> None: ...
    def login_record(self, ip: str) -> Optional["Record"]: ...
    def login_records(self) -> Iterable["Record"]: ...
    def close(self) -> None: ...
    def remove(self) -> None: ...


class StateBusy(Exception):
    """The store stayed locked by other processes for BUSY_LIMIT seconds."""


@dataclass(frozen=True)
class Record:
    """A verified POP login: from ``ip``, as ``user``, at ``when`` (``time.time()``), valid until ``expires``."""

    ip: str
    user: str
    when: float
    expires: float


@dataclass(frozen=True)
class Penalty:
    """One BadGuys sentence as stored: ``badness`` seconds as of the failure at ``last`` (``time.time()``)."""

    badness: float
    last: float


class LocalState:
    """The store of one box at ``path``, shared by every process that opens it.

    ``worker`` is the number of the worker process using it (0 with one process).  ``sleep`` waits
    while the database is busy: gevent's (other greenlets run meanwhile) in the processes that
    serve sessions; the master, which has no hub, passes the plain one.  Every method may raise
    StateBusy; callers decide how to fail open.
    """

    def __init__(self, path: str, worker: int = 0, clock: Callable[[], float] = time.time,
                 sleep: Optional[Callable[[float], Any]] = None) -> None:
        self.path = path
        self.worker = worker
        self.clock = clock
        self.sleep = sleep or gevent.sleep
        self._db: Optional[sqlite3.Connection] = None
        self._pid = 0
        self._next_purge = 0.0

    # ------------------------------------------------------------------ the store itself
    @classmethod
    def create(cls, owner: Optional[Tuple[int, int]] = None) -> "LocalState":
        """A new, empty store in a private directory on tmpfs (``/dev/shm`` when there is one,
        else the system's temporary directory).  ``owner`` (uid, gid): the user the workers will
        run as (BeTheUser/BeTheGroup), who must be able to write it."""
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        directory = tempfile.mkdtemp(prefix="mmproxy-state-", dir=base)
        state = cls(os.path.join(directory, "state.db"))
        db = state.db()
        db.execute("PRAGMA journal_mode=WAL")      # makes the -wal and -shm files now, for chown below
        db.executescript(SCHEMA)
        if owner is not None:
            for name in [directory] + [os.path.join(directory, f) for f in os.listdir(directory)]:
                os.chown(name, *owner)
        return state

    def remove(self) -> None:
        """Delete the store (the daemon stops)."""
        self.close()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None

    def db(self) -> sqlite3.Connection:
        """This process's connection (a forked child opens its own)."""
        if self._db is None or self._pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous=OFF")    # tmpfs: nothing to sync; a crash loses the box's state anyway
            self._db, self._pid = db, os.getpid()
        return self._db

    def _run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work(db)`` (one transaction), retrying from the hub while other processes hold
        the database; StateBusy after BUSY_LIMIT seconds."""
        db = self.db()
        give_up = time.monotonic() + BUSY_LIMIT
        pause = 0.0005
        while True:
            try:
                return work(db)
            except sqlite3.OperationalError as e:
                if db.in_transaction:
                    db.rollback()
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() >= give_up:
                    raise StateBusy("the per-client state store stayed busy for %gs" % BUSY_LIMIT) from None
                self.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _transaction(self, db: sqlite3.Connection, statements: Callable[[], Any]) -> Any:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = statements()
        except BaseException:
            db.rollback()
            raise
        db.commit()
        return result

    # ------------------------------------------------------------------ ConnLimits
    def acquire(self, service: str, ip: str, limit: int) -> bool:
        """Count one more connection of ``ip`` to ``service`` unless it holds ``limit`` already
        (all workers together); False when refused (nothing counted)."""
        self._maybe_purge()
        cur = self._run(lambda db: db.execute(
            "INSERT INTO conns (service, ip, worker, n) SELECT ?1, ?2, ?3, 1 "
            "WHERE (SELECT coalesce(sum(n), 0) FROM conns WHERE service = ?1 AND ip = ?2) < ?4 "
            "ON CONFLICT (service, ip, worker) DO UPDATE SET n = n + 1",
            (service, ip, self.worker, limit)))
        return bool(cur.rowcount > 0)

    def release(self, service: str, ip: str) -> None:
        """Give back one connection of ``ip`` counted by this worker."""
        self._run(lambda db: db.execute("UPDATE conns SET n = n - 1 WHERE service = ? AND ip = ? AND worker = ? "
                                        "AND n > 0", (service, ip, self.worker)))

    def connections(self, service: str, ip: str) -> int:
        """How many connections ``ip`` holds to ``service`` now, all workers together."""
        row = self._run(lambda db: db.execute("SELECT coalesce(sum(n), 0) FROM conns WHERE service = ? AND ip = ?",
                                              (service, ip)).fetchone())
        return int(row[0])

    def forget_worker(self, worker: int) -> int:
        """A worker process is gone: its connections are closed.  Returns how many were counted."""
        def work(db: sqlite3.Connection) -> int:
            return self._transaction(db, lambda: (
                db.execute("SELECT coalesce(sum(n), 0) FROM conns WHERE worker = ?", (worker,)).fetchone()[0],
                db.execute("DELETE FROM conns WHERE worker = ?", (worker,)))[0])
        return int(self._run(work))

    def _maybe_purge(self) -> None:
        """Now and then: drop connection counts that reached zero, expired POP records, and the
        POP records beyond POP_RECORDS."""
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        wall = self.clock()
        self._run(lambda db: self._transaction(db, lambda: (
            db.execute("DELETE FROM conns WHERE n <= 0"),
            db.execute("DELETE FROM popauth WHERE expires <= ?", (wall,)),
            db.execute("DELETE FROM popauth WHERE ip IN (SELECT ip FROM popauth ORDER BY expires LIMIT "
                       "max(0, (SELECT count(*) FROM popauth) - ?))", (POP_RECORDS,)))))

    # ------------------------------------------------------------------ BadGuys
    def penalty(self, service: str, ip: str) -> Optional[Penalty]:
        """The stored sentence of ``ip`` at ``service``, or None."""
        row = self._run(lambda db: db.execute("SELECT badness, last FROM badguys WHERE service = ? AND ip = ?",
                                              (service, ip)).fetchone())
        return Penalty(row[0], row[1]) if row else None

    def add_penalty(self, service: str, ip: str, update: Callable[[Optional[Penalty], float], float],
                    keep: int, expiry: float) -> float:
        """One more failure of ``ip``: its badness becomes ``update(stored sentence or None, now)``,
        atomically.  When ``ip`` is new, sentences whose last failure is ``expiry`` seconds old are
        forgotten, and at most ``keep`` addresses are remembered per service (the ones whose last
        failure is oldest are forgotten first).  Returns the new badness."""
        now = self.clock()

        def statements(db: sqlite3.Connection) -> float:
            row = db.execute("SELECT badness, last FROM badguys WHERE service = ? AND ip = ?", (service, ip)).fetchone()
            badness = update(Penalty(row[0], row[1]) if row else None, now)
            db.execute("INSERT INTO badguys (service, ip, badness, last) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (service, ip) DO UPDATE SET badness = excluded.badness, last = excluded.last",
                       (service, ip, badness, now))
            if row is None:
                db.execute("DELETE FROM badguys WHERE service = ? AND last <= ?", (service, now - expiry))
                over = db.execute("SELECT count(*) FROM badguys WHERE service = ?", (service,)).fetchone()[0] - keep
                if over > 0:
                    db.execute("DELETE FROM badguys WHERE service = ?1 AND ip IN (SELECT ip FROM badguys "
                               "WHERE service = ?1 ORDER BY last LIMIT ?2)", (service, over))
            return badness
        return float(self._run(lambda db: self._transaction(db, lambda: statements(db))))

    def forgive(self, service: str, ip: str) -> None:
        """``ip`` logged in: it is no BadGuy any more."""
        self._run(lambda db: db.execute("DELETE FROM badguys WHERE service = ? AND ip = ?", (service, ip)))

    # ------------------------------------------------------------------ AuthService
    def record_login(self, ip: str, user: str, ttl: float) -> None:
        """A verified POP login of ``user`` from ``ip``, remembered ``ttl`` seconds (nothing when ttl <= 0);
        a newer login from the same address replaces the older."""
        if ttl <= 0:
            return
        self._maybe_purge()
        now = self.clock()
        self._run(lambda db: db.execute(
            "INSERT INTO popauth (ip, user, at, expires) VALUES (?, ?, ?, ?) ON CONFLICT (ip) DO UPDATE "
            "SET user = excluded.user, at = excluded.at, expires = excluded.expires", (ip, user, now, now + ttl)))

    def login_record(self, ip: str) -> Optional[Record]:
        """The fresh POP login from ``ip``, or None."""
        row = self._run(lambda db: db.execute("SELECT user, at, expires FROM popauth WHERE ip = ? AND expires > ?",
                                              (ip, self.clock())).fetchone())
        return Record(ip, row[0], row[1], row[2]) if row else None

    def login_records(self) -> Iterable[Record]:
        """Every fresh POP login record (for tests and status)."""
        rows = self._run(lambda db: db.execute("SELECT ip, user, at, expires FROM popauth WHERE expires > ?",
                                               (self.clock(),)).fetchall())
        return [Record(*row) for row in rows]


class MemoryState:
    """:class:`ClientState` for a daemon of one process: the same rules as :class:`LocalState`,
    in this process's dictionaries (greenlets only: nothing here waits, so every method is atomic
    on the hub).  Never raises StateBusy."""

    def __init__(self, worker: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.worker = worker
        self.clock = clock
        self.conns: Dict[Tuple[str, str], int] = {}
        self.badguys: Dict[str, Dict[str, Penalty]] = {}         # service -> ip -> sentence
        self.popauth: Dict[str, Record] = {}
        self._next_purge = 0.0

    def remove(self) -> None:
        """Nothing to delete: the state goes with the process."""

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ ConnLimits
    def acquire(self, service: str, ip: str, limit: int) -> bool:
        key = (service, ip)
        n = self.conns.get(key, 0)
        if n >= limit:
            return False
        self.conns[key] = n + 1
        return True

    def release(self, service: str, ip: str) -> None:
        key = (service, ip)
        n = self.conns.get(key, 0) - 1
        if n > 0:
            self.conns[key] = n
        else:
            self.conns.pop(key, None)

    def connections(self, service: str, ip: str) -> int:
        return self.conns.get((service, ip), 0)

    def forget_worker(self, worker: int) -> int:
        return 0                  # one process: no worker of its own to outlive

    # ------------------------------------------------------------------ BadGuys
    def penalty(self, service: str, ip: str) -> Optional[Penalty]:
        return self.badguys.get(service, {}).get(ip)

    def add_penalty(self, service: str, ip: str, update: Callable[[Optional[Penalty], float], float],
                    keep: int, expiry: float) -> float:
        now = self.clock()
        table = self.badguys.setdefault(service, {})
        old = table.get(ip)
        badness = update(old, now)
        table[ip] = Penalty(badness, now)
        if old is None:
            for gone in [k for k, p in table.items() if p.last <= now - expiry]:
                del table[gone]
            over = len(table) - keep
            if over > 0:
                for gone in sorted(table, key=lambda k: table[k].last)[:over]:
                    del table[gone]
        return badness

    def forgive(self, service: str, ip: str) -> None:
        self.badguys.get(service, {}).pop(ip, None)

    # ------------------------------------------------------------------ AuthService
    def record_login(self, ip: str, user: str, ttl: float) -> None:
        if ttl <= 0:
            return
        now = self.clock()
        self.popauth[ip] = Record(ip, user, now, now + ttl)
        self._maybe_purge()

    def login_record(self, ip: str) -> Optional[Record]:
        r = self.popauth.get(ip)
        return r if r is not None and r.expires > self.clock() else None

    def login_records(self) -> Iterable[Record]:
        now = self.clock()
        return [r for r in self.popauth.values() if r.expires > now]

    def _maybe_purge(self) -> None:
        """Now and then (and at once past twice POP_RECORDS: a flood of addresses costs a sort per
        POP_RECORDS logins, not per login): drop expired POP records, then those that expire first
        beyond POP_RECORDS."""
        now = time.monotonic()
        if now < self._next_purge and len(self.popauth) <= 2 * POP_RECORDS:
            return
        self._next_purge = now + PURGE_EVERY
        wall = self.clock()
        for ip in [ip for ip, r in self.popauth.items() if r.expires <= wall]:
            del self.popauth[ip]
        over = len(self.popauth) - POP_RECORDS
        if over > 0:
            for ip in sorted(self.popauth, key=lambda k: self.popauth[k].expires)[:over]:
                del self.popauth[ip]


Store = ClientState
_store: Optional[Store] = None


def use(store: Optional[Store]) -> None:
    """Make ``store`` the one this process uses (the daemon, before it forks its workers)."""
    global _store
    _store = store


def store() -> Store:
    """The store this process uses; one is made on first use where the daemon made none (a
    process serving sessions without ``mmproxy start``), and removed at exit."""
    global _store
    if _store is None:
        import atexit
        _store = LocalState.create()
        atexit.register(_store.remove)
    return _store
