"""Reverse DNS of clients (mmproxy/hostnames.py): loopback names only (127.0.0.1 is localhost in
/etc/hosts; 127.0.0.5 has no name), cached, one request per address at a time, a timeout that
leaves the other greenlets running."""
import socket
import time

import gevent
import pytest

from mmproxy import hostnames
from mmproxy.access import HostName


@pytest.fixture(autouse=True)
def fresh():
    hostnames.clear()
    yield
    hostnames.clear()


def test_loopback_names():
    assert hostnames.lookup("127.0.0.1") == HostName("ok", "localhost")
    assert hostnames.lookup("::ffff:127.0.0.1") == HostName("ok", "localhost")
    assert hostnames.lookup("127.0.0.5").status == "none"
    assert hostnames.xclient_name("127.0.0.1") == "localhost"
    assert hostnames.xclient_name("127.0.0.5") == "[UNAVAILABLE]"


def test_answers_are_cached_and_shared(monkeypatch):
    calls = []
    real = socket.gethostbyaddr

    def counting(ip):
        calls.append(ip)
        gevent.sleep(0.1)
        return real(ip)
    monkeypatch.setattr(socket, "gethostbyaddr", counting)
    hostnames.prefetch("127.0.0.1")
    results = [g.get() for g in [gevent.spawn(hostnames.lookup, "127.0.0.1") for _ in range(5)]]
    assert results == [HostName("ok", "localhost")] * 5 and calls == ["127.0.0.1"]
    assert hostnames.lookup("127.0.0.1").name == "localhost" and calls == ["127.0.0.1"]


def test_a_name_that_does_not_map_back_is_a_spoofer(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyaddr", lambda ip: ("localhost.", [], [ip]))
    assert hostnames.lookup("127.0.0.9") == HostName("spoofed", "localhost")     # localhost is 127.0.0.1
    monkeypatch.setattr(socket, "gethostbyaddr", lambda ip: ("bad name!", [], [ip]))
    assert hostnames.lookup("127.0.0.10").status == "none"


def test_a_slow_resolver_times_out_without_stopping_the_others(monkeypatch):
    monkeypatch.setattr(hostnames, "LOOKUP_TIMEOUT", 0.3)
    monkeypatch.setattr(socket, "gethostbyaddr", lambda ip: gevent.sleep(5))
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(20)])
    start = time.monotonic()
    assert hostnames.lookup("127.0.0.11") == HostName("timeout")
    assert time.monotonic() - start < 1.0 and len(ticks) >= 3
    assert hostnames.xclient_name("127.0.0.11") == "[TEMPUNAVAIL]"        # remembered for TIMEOUT_TTL
    ticker.kill()
