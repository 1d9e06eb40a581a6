"""POP-before-SMTP records: expiry, address spellings, and sharing with forked workers."""
import os
import time

from gevent import monkey

from mmproxy.authservice import AuthRecords


def test_record_lookup_expiry_and_spellings():
    r = AuthRecords(slots=64)
    r.record("127.0.0.9", "alice@example.com", 60)
    r.record("::ffff:127.0.0.10", "bob@example.com", 0.2)
    assert r.lookup("127.0.0.9").user == "alice@example.com"
    assert r.lookup("127.0.0.10").user == "bob@example.com"      # IPv4-mapped is the same address
    assert r.lookup("127.0.0.11") is None
    r.record("127.0.0.9", "carol@example.org", 60)                # a newer login replaces the old one
    assert r.lookup("127.0.0.9").user == "carol@example.org"
    time.sleep(0.3)
    assert r.lookup("127.0.0.10") is None
    r.record("127.0.0.12", "x", -1)                               # AuthServiceTTL -1: off
    assert r.lookup("127.0.0.12") is None


def test_full_table_replaces_the_oldest_never_fails():
    r = AuthRecords(slots=4)
    for i in range(50):
        r.record("10.0.0.%d" % i, "u%d" % i, 60 + i)
    assert r.lookup("10.0.0.49").user == "u49"


def test_records_are_shared_with_forked_processes():
    r = AuthRecords(slots=64)
    fork = monkey.get_original("os", "fork")
    pid = fork()
    if pid == 0:
        r.record("127.0.0.77", "dave@example.org", 60)
        os._exit(0)
    os.waitpid(pid, 0)
    assert r.lookup("127.0.0.77").user == "dave@example.org"
