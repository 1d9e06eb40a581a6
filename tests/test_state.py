"""The per-client state store shared by worker processes (state.py), the BadGuys rules
(badguys.py) and POP-before-SMTP records (authservice.py): with real forked processes and the
real SQLite store, no mocks.  The rules that hold in one process hold for the one-process store
(MemoryState) alike."""
import itertools
import os
import time

import pytest
from gevent import monkey

from mmproxy import authservice, state
from mmproxy.badguys import BadGuys
from mmproxy.config.types import parse_network
from mmproxy.redisstate import RedisState
from mmproxy.state import LocalState, MemoryState, Penalty
from mmproxy.testing.redis import RedisServer

from helpers import ticker

fork = monkey.get_original("os", "fork")
real_sleep = monkey.get_original("time", "sleep")


@pytest.fixture
def store():
    s = LocalState.create()
    state.use(s)
    yield s
    state.use(None)
    s.remove()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(workdir=str(tmp_path_factory.mktemp("redis"))) as r:
        yield r


_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "memory", "redis"])
def any_store(request):
    """Any store, made the process's: the shared SQLite one, a one-process daemon's, and a fleet's
    on a real redis-server (keys under a prefix of this test's own)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        s = RedisState(url, "t%d:" % next(_prefixes), "test")
    else:
        s = LocalState.create() if request.param == "sqlite" else MemoryState()
    state.use(s)
    yield s
    state.use(None)
    s.remove()


def clocked(s, clock):
    """A store like ``s`` whose clock is ``clock``."""
    if isinstance(s, RedisState):
        return RedisState(s.url, s.prefix, "test", clock=clock)
    return LocalState(s.path, clock=clock) if isinstance(s, LocalState) else MemoryState(clock=clock)


def test_connection_counts_in_one_process(any_store):
    s = any_store
    assert s.acquire("imap", "127.0.0.5", 2) and s.acquire("imap", "127.0.0.5", 2)
    assert not s.acquire("imap", "127.0.0.5", 2)
    assert s.acquire("pop", "127.0.0.5", 2) and s.acquire("imap", "127.0.0.6", 2)   # per service, per address
    for _ in range(3):
        s.release("imap", "127.0.0.5")                                # more releases than acquires: no negative count
    assert s.connections("imap", "127.0.0.5") == 0
    assert s.acquire("imap", "127.0.0.5", 1) and not s.acquire("imap", "127.0.0.5", 1)


def children(n, work):
    """Run work(i) in n forked processes at once; their results (0: work returned True, 3: False,
    1: it raised), told through a pipe: gevent's SIGCHLD watcher may reap a child before waitpid."""
    r, w = os.pipe()
    pids = []
    for i in range(n):
        pid = fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if work(i) else 3
            finally:
                os.write(w, bytes([i, code]))
                os._exit(code)
        pids.append(pid)
    os.close(w)
    results = {}
    with os.fdopen(r, "rb") as f:
        while len(results) < n:
            pair = f.read(2)
            if len(pair) < 2:
                break
            results[pair[0]] = pair[1]
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return [results.get(i, 1) for i in range(n)]


def test_connection_counts_hold_for_all_workers_together(store):
    a, b = LocalState(store.path, worker=1), LocalState(store.path, worker=2)
    assert a.acquire("imap", "127.0.0.5", 2) and b.acquire("imap", "127.0.0.5", 2)
    assert not a.acquire("imap", "127.0.0.5", 2) and not b.acquire("imap", "127.0.0.5", 2)
    assert a.acquire("pop", "127.0.0.5", 2)                       # per service
    assert a.acquire("imap", "127.0.0.6", 2)                      # per address
    b.release("imap", "127.0.0.5")
    b.release("imap", "127.0.0.5")                                # more releases than acquires: no negative count
    assert a.connections("imap", "127.0.0.5") == 1
    assert b.acquire("imap", "127.0.0.5", 2) and not a.acquire("imap", "127.0.0.5", 2)


def test_a_dead_workers_connections_are_forgotten(store):
    a, b = LocalState(store.path, worker=1), LocalState(store.path, worker=2)
    for _ in range(3):
        assert a.acquire("imap", "127.0.0.5", 4)
    assert b.acquire("imap", "127.0.0.5", 4)
    assert store.forget_worker(1) == 3
    assert store.connections("imap", "127.0.0.5") == 1


def test_concurrent_acquires_never_exceed_the_limit(store):
    """Four processes race for 25 slots of one address: exactly 25 are granted in all."""
    def work(i):
        s = LocalState(store.path, worker=i, sleep=real_sleep)
        got = sum(s.acquire("imap", "127.0.0.9", 25) for _ in range(40))
        return got <= 25
    assert children(4, work) == [0, 0, 0, 0]
    assert store.connections("imap", "127.0.0.9") == 25


def test_concurrent_writers_never_produce_a_record_nobody_wrote(store):
    """The fault of the shared-memory table: two processes recording logins from one address
    garbled records.  Here writers record user names that encode their writer and sequence
    number while readers check every record they see is one that was written whole."""
    def work(i):
        s = LocalState(store.path, sleep=real_sleep)
        end = time.monotonic() + 1.5
        n = 0
        while time.monotonic() < end:
            if i < 2:
                s.record_login("127.0.0.%d" % (n % 4), "writer%d-%06d@example.com" % (i, n), 60)
            else:
                for ip in ("127.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.3"):
                    rec = s.login_record(ip)
                    if rec is None:
                        continue
                    who, _, rest = rec.user.partition("-")
                    seq = rest.split("@")[0]
                    if who not in ("writer0", "writer1") or rest[6:] != "@example.com" or \
                            int(seq) % 4 != int(ip.rsplit(".", 1)[1]):
                        return False
            n += 1
        return True
    assert children(4, work) == [0, 0, 0, 0]


def test_a_writer_killed_mid_transaction_leaves_nothing_half_written(store):
    r, w = os.pipe()
    pid = fork()
    if pid == 0:
        s = LocalState(store.path, sleep=real_sleep)
        db = s.db()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO popauth VALUES ('127.0.0.44', 'half', 0, 9e99)")
        os.write(w, b"x")
        real_sleep(60)
        os._exit(0)
    os.read(r, 1)
    os.kill(pid, 9)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass        # reaped by gevent's SIGCHLD watcher already
    assert store.login_record("127.0.0.44") is None
    store.record_login("127.0.0.44", "whole@example.com", 60)      # the lock died with the process
    assert store.login_record("127.0.0.44").user == "whole@example.com"


def test_busy_store_gives_up_after_the_limit(store, monkeypatch):
    monkeypatch.setattr(state, "BUSY_LIMIT", 0.2)
    other = LocalState(store.path, sleep=real_sleep)
    db = other.db()
    db.execute("BEGIN IMMEDIATE")
    try:
        t = time.monotonic()
        with pytest.raises(state.StateBusy):
            store.acquire("imap", "127.0.0.1", 5)
        assert 0.2 <= time.monotonic() - t < 1.5
        assert store.penalty("imap", "127.0.0.1") is None         # reads go on while a writer holds the lock
    finally:
        db.rollback()


def test_pop_before_smtp_records(any_store):
    authservice.record("127.0.0.9", "alice@example.com", 60)
    authservice.record("::ffff:127.0.0.10", "bob@example.com", 0.2)
    assert authservice.lookup("127.0.0.9").user == "alice@example.com"
    assert authservice.lookup("127.0.0.10").user == "bob@example.com"     # IPv4-mapped is the same address
    assert authservice.lookup("127.0.0.11") is None
    authservice.record("127.0.0.9", "carol@example.org", 60)               # a newer login replaces the old one
    assert authservice.lookup("127.0.0.9").user == "carol@example.org"
    real_sleep(0.3)
    assert authservice.lookup("127.0.0.10") is None
    authservice.record("127.0.0.12", "x", -1)                              # AuthServiceTTL -1: off
    assert authservice.lookup("127.0.0.12") is None


def test_records_are_shared_with_forked_processes(store):
    assert children(1, lambda i: authservice.record("127.0.0.77", "dave@example.org", 60) or True) == [0]
    assert authservice.lookup("127.0.0.77").user == "dave@example.org"


# ---------------------------------------------------------------------------------- BadGuys rules
def test_sentence_step_and_linear():
    step = BadGuys(penalty=2, max_badness=5, decay=10)
    assert step.sentence(None, 100) == 0
    assert step.after_failure(None, 100) == 2
    assert step.after_failure(Penalty(2, 100), 101) == 4
    assert step.after_failure(Penalty(4, 100), 101) == 5                    # BGMaxBadness caps it
    assert step.sentence(Penalty(4, 100), 109.9) == 4                       # a step: whole until BGDecay
    assert step.sentence(Penalty(4, 100), 110) == 0
    assert step.after_failure(Penalty(4, 100), 111) == 2                    # forgiven, then a new failure
    assert step.sentence(Penalty(30, 100), 101) == 5                        # stored before BGMaxBadness was lowered
    linear = BadGuys(penalty=2, max_badness=60, decay=10, linear=True)
    assert linear.sentence(Penalty(4, 100), 105) == pytest.approx(2)
    assert linear.sentence(Penalty(4, 100), 107.5) == pytest.approx(1)
    assert linear.after_failure(Penalty(4, 100), 105) == pytest.approx(4)
    assert not BadGuys(penalty=0).active and not BadGuys(decay=0).active and BadGuys().active


def test_excluded_networks():
    rules = BadGuys(excluded=(parse_network("10.0.0.0/255.0.0.0"), parse_network("::1/128")))
    assert rules.exempt("10.1.2.3") and rules.exempt("::ffff:10.1.2.3") and rules.exempt("::1")
    assert not rules.exempt("127.0.0.1") and not rules.exempt("11.0.0.1")


def test_penalties_bounded_by_bgmax_oldest_forgotten_first(any_store):
    clock = iter(range(1000, 2000))
    s = clocked(any_store, lambda: float(next(clock)))
    rules = BadGuys(penalty=2, max_badness=60, decay=900)
    for i in range(5):
        s.add_penalty("imap", "10.0.0.%d" % i, rules.after_failure, keep=3, expiry=900)
    assert s.add_penalty("imap", "10.0.0.4", rules.after_failure, keep=3, expiry=900) == 4   # known: no eviction
    kept = [i for i in range(5) if s.penalty("imap", "10.0.0.%d" % i)]
    assert kept == [2, 3, 4]
    s.forgive("imap", "10.0.0.4")
    assert s.penalty("imap", "10.0.0.4") is None
    s.add_penalty("imap", "10.0.0.9", rules.after_failure, keep=3, expiry=2)       # a new address: the
    assert [i for i in range(10) if s.penalty("imap", "10.0.0.%d" % i)] == [9]     # expired are forgotten


def test_concurrent_failures_all_count(store):
    """Two processes add failures for one address at once: every one counts (atomic update)."""
    rules = BadGuys(penalty=1, max_badness=10000, decay=900)

    def work(i):
        s = LocalState(store.path, sleep=real_sleep)
        for _ in range(100):
            s.add_penalty("pop", "127.0.0.3", rules.after_failure, keep=10, expiry=900)
        return True
    assert children(2, work) == [0, 0]
    assert store.penalty("pop", "127.0.0.3").badness == 200


def test_a_busy_store_never_blocks_the_hub(store):
    """Another process holds the write lock for 0.6 s: an update waits for it from the hub (the
    retries sleep in gevent), and other greenlets keep running meanwhile."""
    r, w = os.pipe()
    pid = fork()
    if pid == 0:
        db = LocalState(store.path, sleep=real_sleep).db()
        db.execute("BEGIN IMMEDIATE")
        os.write(w, b"x")
        real_sleep(0.6)
        db.rollback()
        os._exit(0)
    os.read(r, 1)
    ticks, ticking = ticker()
    t = time.monotonic()
    try:
        assert store.acquire("imap", "127.0.0.8", 3)
    finally:
        ticking.kill()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass        # reaped by gevent's SIGCHLD watcher (on once an earlier test used subprocess)
    waited = time.monotonic() - t
    assert 0.4 < waited < 2.0
    assert len([x for x in ticks if t <= x <= t + waited]) >= 10


def test_pop_records_bounded_in_one_process(monkeypatch):
    """A flood of POP logins from new addresses: at most twice POP_RECORDS are held, those that
    expire first go first, and the expired go at the next sweep."""
    monkeypatch.setattr(state, "POP_RECORDS", 10)
    clock = iter(range(1000, 2000))
    s = MemoryState(clock=lambda: float(next(clock)))
    for i in range(25):
        s.record_login("10.0.%d.1" % i, "u%d" % i, 100 + i)
        assert len(s.popauth) <= 20
    assert s.login_record("10.0.24.1").user == "u24" and s.login_record("10.0.0.1") is None
