"""The fleet's per-client state on a real redis-server (redisstate.py): every rule of the local
stores holds across processes that share only the Redis (test_state.py runs the common rules on
it too); slots of a process that dies expire with its lease; while Redis is hung or gone every
operation falls back to the process's own store at once, with one log line per change of state,
and never blocks the hub."""
import itertools
import logging
import time

import gevent
import pytest
from test_state import children

from mmproxy import redisstate
from mmproxy.badguys import BadGuys
from mmproxy.redisstate import RedisState, SharedState, redacted
from mmproxy.state import MemoryState
from mmproxy.testing.certs import TestCA
from mmproxy.testing.redis import RedisServer

from helpers import ticker

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(password="pw with:/@ chars", workdir=str(tmp_path_factory.mktemp("redis"))) as r:
        yield r


@pytest.fixture
def prefix():
    return "rs%d-%d:" % (time.time_ns() % 10**9, next(_prefixes))


@pytest.mark.timeout(60)
def test_concurrent_acquires_across_processes_never_exceed_the_limit(server, prefix):
    """Four processes, each its own client of the Redis (as four proxies), race for 25 slots of
    one address: exactly 25 are granted in all."""
    def work(i):
        gevent.reinit()                                   # a forked child: its own hub for the sockets
        s = RedisState(server.url, prefix, "box%d" % i)
        s.renew()
        got = sum(s.acquire("imap", "192.0.2.9", 25) for _ in range(40))
        return got <= 25
    # the children's slots outlive them only by their lease: count before it ends
    assert children(4, work) == [0, 0, 0, 0]
    assert RedisState(server.url, prefix, "reader").connections("imap", "192.0.2.9") == 25


@pytest.mark.timeout(60)
def test_concurrent_failures_across_processes_all_count(server, prefix):
    """Two processes add 100 failures each for one address at once: all 200 count (the new
    sentence is written only if nobody wrote since it was read)."""
    rules = BadGuys(penalty=1, max_badness=10000, decay=900)

    def work(i):
        gevent.reinit()
        s = RedisState(server.url, prefix, "box%d" % i)
        for _ in range(100):
            s.add_penalty("pop", "192.0.2.3", rules.after_failure, keep=10, expiry=900)
        return True
    assert children(2, work) == [0, 0]
    assert RedisState(server.url, prefix, "reader").penalty("pop", "192.0.2.3").badness == 200


@pytest.mark.timeout(60)
def test_slots_of_a_process_that_dies_expire_with_its_lease(server, prefix):
    a = RedisState(server.url, prefix, "a", lease=1.0)
    b = RedisState(server.url, prefix, "b", lease=1.0)
    a.renew()
    b.renew()
    assert a.acquire("imap", "192.0.2.1", 3) and a.acquire("imap", "192.0.2.1", 3)
    assert b.acquire("imap", "192.0.2.1", 3)
    assert not b.acquire("imap", "192.0.2.1", 3)          # the fleet holds 3
    time.sleep(1.3)                                       # a "died": it renews no more
    b.renew()
    assert b.connections("imap", "192.0.2.1") == 1
    assert b.acquire("imap", "192.0.2.1", 3) and b.acquire("imap", "192.0.2.1", 3)
    assert not b.acquire("imap", "192.0.2.1", 3)
    c = RedisState(server.url, prefix, "c", lease=60)
    c.renew()
    assert c.acquire("pop", "192.0.2.1", 2) and c.acquire("pop", "192.0.2.1", 2)
    c.remove()                                            # a process that stops gives them back at once
    assert not server.cli("KEYS", prefix + "alive:c/*")
    b.renew()
    assert b.connections("pop", "192.0.2.1") == 0
    b.release("imap", "192.0.2.1")                        # releases never go below zero
    for _ in range(3):
        b.release("imap", "192.0.2.1")
    assert b.connections("imap", "192.0.2.1") == 0


@pytest.mark.timeout(60)
def test_tls_and_password(tmp_path, prefix):
    ca = TestCA(str(tmp_path / "ca"))
    cert, key = ca.issue("redis", ips=["127.0.0.1"], dns=["localhost"])
    with RedisServer(password="s3cret", tls=(cert, key, ca.path), workdir=str(tmp_path / "r")) as r:
        assert r.url.startswith("rediss://")
        s = RedisState(r.url, prefix, "tls", ca_file=ca.path)
        s.record_login("192.0.2.5", "alice@example.com", 60)
        assert s.login_record("192.0.2.5").user == "alice@example.com"
        wrong = RedisState(r.url.replace("s3cret", "wrong"), prefix, "tls", ca_file=ca.path)
        with pytest.raises(Exception) as e:
            wrong.login_record("192.0.2.5")
        assert "wrong" not in str(e.value)
        assert redacted(r.url) == "rediss://:***@127.0.0.1:%d/0" % r.port
        assert redacted("redis://S3CRETpw@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
        assert redacted("redis://10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"


@pytest.mark.timeout(90)
def test_fallback_while_redis_is_hung_or_gone(tmp_path, prefix, caplog, monkeypatch):
    """Redis stops answering (SIGSTOP), then dies, then comes back: every operation answers from
    the process's own store within REDIS_TIMEOUT of the first failure and at once after it, the hub
    keeps running, one warning per change of state, and a slot taken in Redis before the outage
    is given back there once it answers."""
    monkeypatch.setattr(redisstate, "PROBE_EVERY", 0.3)
    caplog.set_level(logging.WARNING, logger="mmproxy.state")
    with RedisServer(workdir=str(tmp_path / "r")) as r:
        shared = SharedState(RedisState(r.url, prefix, "box"), MemoryState())
        shared.start()
        gevent.sleep(0.05)
        assert shared.acquire("imap", "192.0.2.7", 1)                       # held in Redis
        assert r.cli("HGETALL", prefix + "conn:imap:192.0.2.7")
        ticks, ticking = ticker()
        try:
            r.pause()
            t = time.monotonic()
            assert shared.penalty("imap", "192.0.2.8") is None               # from the local store
            first = time.monotonic() - t
            assert first < redisstate.REDIS_TIMEOUT + 0.4, first
            assert sum(1 for x in ticks if x >= t) >= 5                      # the hub ran meanwhile
            t = time.monotonic()
            for i in range(50):
                assert shared.acquire("pop", "192.0.2.%d" % i, 1)
                shared.record_login("192.0.2.%d" % i, "u%d" % i, 60)
            assert time.monotonic() - t < 0.2                               # no request waits for Redis now
            assert shared.login_record("192.0.2.3").user == "u3"
            shared.release("imap", "192.0.2.7")                              # a Redis slot: given back later
            r.resume()
            r.kill()
            gevent.sleep(0.5)
            r.start()
            deadline = time.monotonic() + 10
            while not shared.up and time.monotonic() < deadline:
                gevent.sleep(0.05)
            assert shared.up
        finally:
            ticking.kill()
        lines = [m.getMessage() for m in caplog.records if m.name == "mmproxy.state"]
        assert len(lines) == 2, lines
        assert "does not answer" in lines[0] and "answers again" in lines[1]
        shared.acquire("imap", "192.0.2.7", 1)
        assert not shared.acquire("imap", "192.0.2.7", 1)
        shared.remove()


@pytest.mark.timeout(90)
def test_requests_that_timed_out_are_settled_once_redis_answers(tmp_path, prefix, monkeypatch):
    """Redis stalls (SIGSTOP) with an admission and a release in its socket buffers, and runs them
    when it wakes: the admission the proxy gave up on takes no slot (its tombstone), the release
    sent again takes one slot away, not two (the breaker's F1 and F2)."""
    monkeypatch.setattr(redisstate, "PROBE_EVERY", 0.3)
    ip = "198.51.100.250"
    with RedisServer(workdir=str(tmp_path / "r")) as r:
        shared = SharedState(RedisState(r.url, prefix, "box"), MemoryState())
        shared.start()
        gevent.sleep(0.05)
        other = RedisState(r.url, prefix, "other")
        other.renew()
        assert shared.acquire("pop", ip, 5) and shared.acquire("pop", ip, 5)
        assert other.connections("pop", ip) == 2
        r.pause()
        try:
            assert shared.acquire("pop", ip, 5)                 # timed out in Redis: counted here instead
            shared.release("pop", ip)                           # that local slot
            shared.release("pop", ip)                           # a Redis slot: sent when it answers
            assert not shared.up
        finally:
            r.resume()
        deadline = time.monotonic() + 10
        while not shared.up and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert shared.up
        gevent.sleep(0.5)
        assert other.connections("pop", ip) == 1, r.cli("HGETALL", prefix + "conn:pop:" + ip)
        shared.release("pop", ip)
        gevent.sleep(0.3)
        assert other.connections("pop", ip) == 0
        assert r.cli("HLEN", prefix + "conn:pop:" + ip) == "0"
        shared.remove()


class Forwarder:
    """A TCP forwarder to Redis on the hub that can lose every connection it carries without a
    word (the Redis side closed, the client's side left open and silent: a partition, a host
    that lost power), then forwards new connections as before."""

    def __init__(self, port):
        from gevent.server import StreamServer
        self.target, self.carried = port, []
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.port = self.server.server_port

    def handle(self, down, addr):
        import socket
        up = socket.create_connection(("127.0.0.1", self.target))
        rec = {"up": up, "dead": False}
        self.carried.append(rec)

        def pipe(a, b):
            try:
                while not rec["dead"]:
                    data = a.recv(65536)
                    if not data or rec["dead"]:
                        break
                    b.sendall(data)
            except OSError:
                pass
        gevent.joinall([gevent.spawn(pipe, down, up), gevent.spawn(pipe, up, down)])
        while rec["dead"]:
            gevent.sleep(1)                    # the client's side stays open, silent

    def lose_everything(self):
        for rec in self.carried:
            rec["dead"] = True
            rec["up"].close()

    def close(self):
        self.lose_everything()
        self.server.stop()


class Answers:
    """What a process's control.Control answers (the transport is what is tested here)."""

    def answer(self, request):
        return {"ok": True, "worker": None, "seen": request.get("cmd")}


@pytest.mark.timeout(60)
def test_a_subscription_lost_without_a_word_comes_back(tmp_path, prefix, monkeypatch, caplog):
    """The fleet's requests reach a process again after its connection to Redis was lost silently
    (the breaker's F3): quiet subscriptions are PINGed and one that stays unanswered is remade."""
    from mmproxy import fleet
    monkeypatch.setattr(fleet, "HEALTH_EVERY", 0.3)
    monkeypatch.setattr(redisstate, "PROBE_EVERY", 0.3)
    with RedisServer(workdir=str(tmp_path / "r")) as r:
        fwd = Forwarder(r.port)
        sub = fleet.Subscriber("redis://127.0.0.1:%d/0" % fwd.port, prefix, None, Answers(), "e")
        sub.start()
        try:
            assert sub.subscribed.wait(5)
            answers, receivers, _ = fleet.ask(r.url, prefix, None, {"cmd": "status"})
            assert receivers == 1 and [(name, a["seen"]) for name, a in answers] == [("e/main", "status")]
            fwd.lose_everything()
            gevent.sleep(0.1)
            assert fleet.ask(r.url, prefix, None, {"cmd": "status"}, wait=0.5)[:2] == ([], 0)
            deadline = time.monotonic() + 10
            while fleet.ask(r.url, prefix, None, {"cmd": "who"}, wait=0.5)[1] != 1:
                assert time.monotonic() < deadline, "the subscription never came back: %s" % [
                    m.getMessage() for m in caplog.records if m.name == "mmproxy.fleet"]
                gevent.sleep(0.2)
        finally:
            sub.close()
            fwd.close()
