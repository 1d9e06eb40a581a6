"""MaxConcurrentConnectionAttempts: a store that accepts connections but is slow to greet cannot tie
up every session; logins beyond the limit get the store-down replies at once, other stores are
unaffected, and every way an attempt ends gives its slot back.

The slow store is a DelayProxy on 127.0.0.4 (BacksidePort) in front of the real Dovecot on
127.0.0.2, holding back what the store sends for ``delay`` seconds per chunk.
"""
import os
import socket
import time

import gevent
import pytest

from mmproxy import backend, imap, pop
from mmproxy.errors import BackendUnavailable
from mmproxy.testing.delayproxy import DelayProxy
from mmproxy.testing.proxy import Proxy

from helpers import RawClient, proxy_log, wait_for_log

SLOW = "127.0.0.4"
HOLD = 5.0           # seconds the slow store's greeting is held back while the limit is tested

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def slow_store(mail_stack):
    """The user "stormy" (mailHost 127.0.0.4) and the delaying forwarders on 127.0.0.4 in front of
    127.0.0.2's IMAP and POP ports."""
    info = mail_stack.info()
    people = info["domains"]["example.com"]["people_dn"]
    mail_stack.slapd.add("dn: uid=stormy,%s\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n"
                         "objectClass: inetOrgPerson\nobjectClass: inetUser\nobjectClass: mailUser\nuid: stormy\n"
                         "cn: Stormy\nsn: Stormy\nmailHost: %s\nuserPassword: stormy-pw\n" % (people, SLOW))
    mail_stack.stores["127.0.0.2"].add_user("stormy", "stormy-pw")
    fwd = {kind: DelayProxy("127.0.0.2", info[port], listen_host=SLOW, listen_port=info[port]).start()
           for kind, port in (("imap", "imap_port"), ("pop", "pop3_port"))}
    yield fwd
    for f in fwd.values():
        f.stop()


@pytest.fixture(scope="module")
def proxy(mail_stack, slow_store):
    limits = {"MaxConcurrentConnectionAttempts": 2, "StoreTimeout": 30}
    with Proxy(mail_stack.info(), imap=limits, pop=dict(limits, SpoofEmptyMailbox=True)) as p:
        yield p


def log_files(p):
    """The proxy's log files (not its terminal output, which repeats the warnings)."""
    return "".join(open(os.path.join(p.log_dir, f), encoding="utf-8", errors="replace").read()
                   for f in sorted(os.listdir(p.log_dir)))


def login_lines(p, kind, user, password, source):
    """Connect, log in, and return (seconds until the answer, the lines of the answer)."""
    r = RawClient(p.host, p.imap_port if kind == "imap" else p.pop_port, source, timeout=30)
    r.expect(b"* OK" if kind == "imap" else b"+OK")
    start = time.monotonic()
    if kind == "imap":
        r.send(b"a LOGIN %s %s\r\n" % (user.encode(), password.encode()))
        lines = [r.readline()]
        if lines[0].startswith(b"* "):
            lines.append(r.readline())
    else:
        r.send(b"USER %s\r\nPASS %s\r\n" % (user.encode(), password.encode()))
        lines = [r.readline(), r.readline()]
    took = time.monotonic() - start
    r.sock.close()
    return took, [line.rstrip(b"\r\n").decode() for line in lines]


def storm(p, kind, fwd, other_user):
    """Four concurrent logins to the slow store: two hold the slots, two are refused at once; a login
    to another store meanwhile goes through; then the slow store answers again."""
    fwd.delay = HOLD
    logins = [gevent.spawn(login_lines, p, kind, "stormy", "stormy-pw", "127.0.0.%d" % (20 + i)) for i in range(4)]
    gevent.sleep(0)
    refused = []
    deadline = time.monotonic() + HOLD - 1
    while len(refused) < 2 and time.monotonic() < deadline:
        refused = [g for g in logins if g.ready()]
        gevent.sleep(0.05)
    assert len(refused) == 2, "expected two logins refused at once, got %d" % len(refused)
    other = login_lines(p, kind, other_user["login"], other_user["password"], "127.0.0.30")
    still_full = not any(g.ready() for g in logins if g not in refused)
    fwd.delay = 0
    gevent.joinall(logins, timeout=HOLD + 20)
    held = [g.value for g in logins if g not in refused]
    return [g.value for g in refused], held, other, still_full


def test_imap_logins_beyond_the_limit_get_the_store_down_reply_at_once(proxy, slow_store, mail_stack):
    user1 = mail_stack.user("user1")
    refused, held, other, still_full = storm(proxy, "imap", slow_store["imap"], user1)
    for took, lines in refused:
        assert lines == ["* OK [ALERT] Your IMAP server appears to be temporarily out of service.",
                         "a " + imap.NO_STORE]
        assert took < 2
    assert still_full, "the held logins ended before the other store's login was tried"
    assert other[1][0].startswith("a OK [CAPABILITY ") and other[0] < HOLD
    for took, lines in held:
        assert lines[0].startswith("a OK [CAPABILITY "), lines
        assert took >= HOLD - 1
    took, lines = login_lines(proxy, "imap", "stormy", "stormy-pw", "127.0.0.31")
    assert lines[0].startswith("a OK [CAPABILITY ")
    wait_for_log(proxy, "below MaxConcurrentConnectionAttempts again")
    text = log_files(proxy)
    where = "%s:%d" % (SLOW, mail_stack.imap_port)
    assert text.count("store %s: 2 connection attempts under way (MaxConcurrentConnectionAttempts): its logins get "
                      "the store-down reply until one ends" % where) == 1
    assert text.count("store %s: connection attempts below MaxConcurrentConnectionAttempts again (2 login(s) "
                      "refused meanwhile)" % where) == 1


def test_pop_logins_beyond_the_limit_see_the_spoofed_mailbox(proxy, slow_store, mail_stack):
    user2 = mail_stack.user("user2")
    refused, held, other, still_full = storm(proxy, "pop", slow_store["pop"], user2)
    for took, lines in refused:
        assert lines == ["+OK", "+OK Maildrop ready"] and took < 2
    assert still_full
    assert other[1][1].startswith("+OK") and other[1][1] != "+OK Maildrop ready" and other[0] < HOLD
    for took, lines in held:
        assert lines[1].startswith("+OK") and lines[1] != "+OK Maildrop ready" and took >= HOLD - 1, lines
    took, lines = login_lines(proxy, "pop", "stormy", "stormy-pw", "127.0.0.32")
    assert lines[1].startswith("+OK") and lines[1] != "+OK Maildrop ready"
    assert "Traceback" not in proxy_log(proxy)


def test_pop_without_spoofing_gets_the_store_down_reply(mail_stack, slow_store):
    fwd = slow_store["pop"]
    with Proxy(mail_stack.info(), imap=False, pop={"MaxConcurrentConnectionAttempts": 1}) as p:
        fwd.delay = HOLD
        try:
            before = fwd.connections
            first = gevent.spawn(login_lines, p, "pop", "stormy", "stormy-pw", "127.0.0.40")
            deadline = time.monotonic() + HOLD - 1
            while fwd.connections == before and time.monotonic() < deadline:
                gevent.sleep(0.05)         # until the first login has reached the store
            took, lines = login_lines(p, "pop", "stormy", "stormy-pw", "127.0.0.41")
            assert lines == ["+OK", pop.ERR_STORE] and took < 2
        finally:
            fwd.delay = 0
        first.join(HOLD + 20)
        assert first.value[1][1].startswith("+OK")


# ---------------------------------------------------------------------- every end gives the slot back
@pytest.fixture
def blackhole():
    """A listener on loopback that accepts connections (the kernel's backlog) and never greets."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    yield lst.getsockname()
    lst.close()


def test_a_killed_session_gives_its_slot_back(blackhole):
    host, port = blackhole
    where = "%s:%d" % (host, port)

    def waits_for_greeting():
        store = backend.Store(host, port, 30, attempts=1)
        try:
            store.readline()
        finally:
            store.close()         # as LoginSession.enter_store does on every way out
    g = gevent.spawn(waits_for_greeting)
    gevent.sleep(0.2)
    assert backend.ATTEMPTS.busy == {where: 1}
    with pytest.raises(BackendUnavailable, match="1 connection attempts under way already"):
        backend.Store(host, port, 30, attempts=1)
    g.kill(block=True)
    assert backend.ATTEMPTS.busy == {} and backend.ATTEMPTS.refused == {}
    backend.Store(host, port, 30, attempts=1).close()
    assert backend.ATTEMPTS.busy == {}


def test_a_session_killed_while_connecting_gives_its_slot_back(blackhole, monkeypatch):
    host, port = blackhole
    monkeypatch.setattr(backend, "_connect", lambda *a: gevent.sleep(30))     # a connect that hangs
    g = gevent.spawn(backend.Store, host, port, 30, attempts=1)
    gevent.sleep(0.1)
    assert backend.ATTEMPTS.busy == {"%s:%d" % (host, port): 1}
    g.kill(block=True)
    assert backend.ATTEMPTS.busy == {}


def test_failed_and_timed_out_attempts_give_their_slot_back(blackhole):
    host, port = blackhole
    store = backend.Store(host, port, 0.3, attempts=1)
    with pytest.raises(BackendUnavailable):
        store.readline()           # the greeting does not come within the phase's deadline
    store.close()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    for _ in range(3):
        with pytest.raises(BackendUnavailable, match="cannot connect"):
            backend.Store("127.0.0.1", dead_port, 1, attempts=1)
    assert backend.ATTEMPTS.busy == {}
