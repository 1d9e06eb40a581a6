"""The legacy defences that keep state per client address, end to end with real clients against
the real stack: BadGuys (delays after failed logins) and ConnLimits, with one and with two worker
processes (NumThreads 2), a worker killed with SIGKILL included."""
import os
import signal
import socket
import time

import gevent

from mmproxy.testing.proxy import Proxy

from helpers import RawClient, proxy_log, wait_for_log

FAILED = "NO [AUTHENTICATIONFAILED] Authentication failed."
FAST = 0.8            # an answer nobody delays comes well within this (a loaded 2-core CI machine)


def users(stack):
    return stack.info()["users"]


def greeted(p, source, port=None):
    c = RawClient(p.host, port or p.imap_port, source=source)
    c.expect(b"* OK")
    return c


def timed(c, line, *want):
    """Send ``line``, expect exactly ``want``; the seconds the answer took."""
    t = time.monotonic()
    c.send(line)
    c.expect_lines(*want)
    return time.monotonic() - t


def test_a_penalised_address_waits_while_another_does_not(mail_stack):
    """BGPenalty 1: the first failure is answered at once, the second after 1 s, the third after
    2 s; the greeting is never delayed; a login from another address at the same moment is not
    delayed; a success after failures waits once, then the address is forgiven."""
    pw = users(mail_stack)["alice"]["password"]
    with Proxy(mail_stack.info(), imap={"BGPenalty": 1, "BGMaxBadness": 5, "BGDecay": 60}) as p:
        bad = greeted(p, "127.0.0.81")
        assert timed(bad, b"a LOGIN alice wrong\r\n", "a " + FAILED) < FAST
        assert 1.0 <= timed(bad, b"b LOGIN alice wrong\r\n", "b " + FAILED) < 1 + FAST
        t = time.monotonic()
        again = greeted(p, "127.0.0.81")                   # a new connection: greeted at once
        assert time.monotonic() - t < FAST
        waiting = gevent.spawn(timed, again, b"c LOGIN alice wrong\r\n", "c " + FAILED)
        gevent.sleep(0.3)
        other = greeted(p, "127.0.0.82")                   # meanwhile another address
        t = time.monotonic()
        other.send(b'd LOGIN alice "%s"\r\n' % pw.encode())
        assert other.skip_to(b"d ").startswith(b"d OK") and time.monotonic() - t < FAST
        assert not waiting.ready()                         # ... while 127.0.0.81 still waits
        assert 2.0 <= waiting.get(timeout=10) < 2 + FAST
        # three failures: 3 s; the success waits them once and is then forgiven
        t = time.monotonic()
        again.send(b'e LOGIN alice "%s"\r\n' % pw.encode())
        assert again.skip_to(b"e ").startswith(b"e OK")
        assert 3.0 <= time.monotonic() - t < 3 + FAST
        after = greeted(p, "127.0.0.81")
        assert timed(after, b"f LOGIN alice wrong\r\n", "f " + FAILED) < FAST
        log = proxy_log(p)
        assert "BadGuys: answer delayed 2.0s" in log and "BadGuys: answer delayed 3.0s" in log


def test_the_store_refusal_counts_without_preauth_and_pop_counts(mail_stack):
    """PreAuth no: the store's NO counts as a failure.  POP (USER/PASS) counts too."""
    with Proxy(mail_stack.info(), imap={"PreAuth": False, "BGPenalty": 1, "BGDecay": 60},
               pop={"BGPenalty": 1, "BGDecay": 60}) as p:
        c = greeted(p, "127.0.0.83")
        c.send(b"a LOGIN alice wrong\r\n")
        assert c.skip_to(b"a ") == b"a " + FAILED.encode() + b"\r\n"
        t = time.monotonic()
        c.send(b"b LOGIN alice wrong\r\n")
        assert c.skip_to(b"b ") == b"b " + FAILED.encode() + b"\r\n"
        assert 1.0 <= time.monotonic() - t < 1 + FAST
        pop = RawClient(p.host, p.pop_port, source="127.0.0.83")
        pop.expect(b"+OK")
        for n, want in ((0, 0.0), (1, 1.0)):
            pop.send(b"USER bob\r\n")
            pop.expect(b"+OK")
            assert want <= timed(pop, b"PASS wrong\r\n", "-ERR [AUTH] Authentication failed.") < want + FAST


def test_decay_step_and_linear(mail_stack):
    """BGDecay 2: a step forgives all at once after 2 s; with BGLinear the wait falls linearly."""
    with Proxy(mail_stack.info(), imap={"BGPenalty": 2, "BGDecay": 2},
               pop={"BGPenalty": 2, "BGDecay": 4, "BGLinear": True}) as p:
        c = greeted(p, "127.0.0.84")
        assert timed(c, b"a LOGIN alice wrong\r\n", "a " + FAILED) < FAST
        time.sleep(1.0)                                     # a step: the whole sentence until BGDecay
        assert 2.0 <= timed(c, b"b LOGIN alice wrong\r\n", "b " + FAILED) < 2 + FAST
        time.sleep(2.1)                                     # BGDecay after the last failure: forgiven
        assert timed(c, b"c LOGIN alice wrong\r\n", "c " + FAILED) < FAST
        pop = RawClient(p.host, p.pop_port, source="127.0.0.84")
        pop.expect(b"+OK")
        pop.send(b"USER bob\r\n")
        pop.expect(b"+OK")
        assert timed(pop, b"PASS wrong\r\n", "-ERR [AUTH] Authentication failed.") < FAST
        time.sleep(2.0)                                     # linear: half of BGDecay gone, half of 2 s left
        pop.send(b"USER bob\r\n")
        pop.expect(b"+OK")
        assert 0.8 <= timed(pop, b"PASS wrong\r\n", "-ERR [AUTH] Authentication failed.") < 1.0 + FAST


def test_excluded_networks_are_never_penalised(mail_stack, tmp_path):
    nets = tmp_path / "bgexcluded"
    nets.write_text("# trusted webmail hosts\n127.0.0.86/255.255.255.254\n")
    with Proxy(mail_stack.info(), imap={"BGPenalty": 3, "BGExcluded": str(nets)}) as p:
        c = greeted(p, "127.0.0.87")
        for tag in (b"a", b"b"):
            assert timed(c, tag + b" LOGIN alice wrong\r\n", tag.decode() + " " + FAILED) < FAST
        c = greeted(p, "127.0.0.88")                        # outside the net: penalised
        timed(c, b"a LOGIN alice wrong\r\n", "a " + FAILED)
        assert timed(c, b"b LOGIN alice wrong\r\n", "b " + FAILED) >= 3.0


def test_a_refusal_after_the_right_password_waits_like_a_wrong_one(mail_stack):
    """gina's own filter (+imap:ALL EXCEPT 127.0.0.22) refuses her right password, frank has no
    store: those answers wait the sentence too (else their speed would tell a right password from
    a wrong one), and they do not forgive the address (nobody logged in)."""
    alert = "* OK [ALERT] Your IMAP server appears to be temporarily out of service."
    with Proxy(mail_stack.info(), imap={"BGPenalty": 1, "BGMaxBadness": 10, "BGDecay": 60}) as p:
        c = greeted(p, "127.0.0.22")
        timed(c, b"a LOGIN gina wrong\r\n", "a " + FAILED)
        assert 1.0 <= timed(c, b"b LOGIN gina wrong\r\n", "b " + FAILED) < 1 + FAST
        c = greeted(p, "127.0.0.22")
        assert 2.0 <= timed(c, b"c LOGIN gina gina-pw\r\n", "c NO [CONTACTADMIN] Access denied") < 2 + FAST
        assert 2.0 <= timed(c, b"d LOGIN frank frank-pw\r\n", alert,
                            "d NO [UNAVAILABLE] Mail store not available, try again later") < 2 + FAST
        assert 2.0 <= timed(c, b"e LOGIN gina wrong\r\n", "e " + FAILED) < 2 + FAST


def test_a_verified_password_waits_before_the_store_is_contacted(mail_stack):
    """PreAuth checked the password: the sentence is waited before the store login, so no store
    connection is held during it; then the address is forgiven."""
    store = mail_stack.stores["127.0.0.2"]
    with Proxy(mail_stack.info(), imap={"BGPenalty": 2, "BGDecay": 60}) as p:
        c = greeted(p, "127.0.0.79")
        timed(c, b"a LOGIN alice wrong\r\n", "a " + FAILED)
        before = store.read_log().count("user=<alice>")
        t = time.monotonic()
        c.send(b'b LOGIN alice "alice-pw"\r\n')
        time.sleep(1.2)
        assert store.read_log().count("user=<alice>") == before      # still waiting: the store knows nothing
        assert c.skip_to(b"b ").startswith(b"b OK [CAPABILITY ") and 2.0 <= time.monotonic() - t < 2 + FAST
        deadline = time.monotonic() + 5         # Dovecot's log process writes the login line a moment later
        while store.read_log().count("user=<alice>") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.read_log().count("user=<alice>") > before
        c = greeted(p, "127.0.0.79")
        assert timed(c, b"c LOGIN alice wrong\r\n", "c " + FAILED) < FAST      # forgiven


def test_a_stop_during_the_wait_says_goodbye(mail_stack):
    """The daemon stops while failed logins wait their sentence: the clients get the protocol's
    shutdown goodbye, not a silent close."""
    p = Proxy(mail_stack.info(), imap={"BGPenalty": 30, "BGDecay": 60}, pop={"BGPenalty": 30, "BGDecay": 60})
    with p:
        c = greeted(p, "127.0.0.78")
        timed(c, b"a LOGIN alice wrong\r\n", "a " + FAILED)
        c.send(b"b LOGIN alice wrong\r\n")
        d = RawClient(p.host, p.pop_port, source="127.0.0.78")
        d.expect(b"+OK")
        d.send(b"USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS wrong\r\n")     # POP's own sentence
        deadline = time.monotonic() + 10
        while proxy_log(p).count("BadGuys: answer delayed 30.0s") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        p.proc.send_signal(signal.SIGTERM)
        assert c.read_all() == b"* BYE [UNAVAILABLE] Server shutting down\r\n"
        assert d.read_all() == (b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
                                b"+OK\r\n-ERR [SYS/TEMP] Server shutting down\r\n")


def test_a_refresh_that_lowers_bgmaxbadness_shortens_stored_sentences(mail_stack):
    """A sentence stored before ``mmproxy refresh`` lowered BGMaxBadness waits only the new maximum."""
    with Proxy(mail_stack.info(), imap={"BGPenalty": 4, "BGMaxBadness": 60, "BGDecay": 60}) as p:
        c = greeted(p, "127.0.0.89")
        assert timed(c, b"a LOGIN alice wrong\r\n", "a " + FAILED) < FAST      # 4 s stored
        p.settings["imap"]["BGMaxBadness"] = 1
        p.write_config()
        p.proc.send_signal(signal.SIGHUP)
        wait_for_log(p, "configuration refreshed")
        c = greeted(p, "127.0.0.89")
        assert 1.0 <= timed(c, b"b LOGIN alice wrong\r\n", "b " + FAILED) < 1 + FAST


# --------------------------------------------------------------------------- several workers
def children(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(x) for x in f.read().split()]


def server_pid(proxy_port, client_port, candidates):
    """Which process holds the proxy's end of the connection from ``client_port`` (the socket's
    inode in /proc/net/tcp, then the process with a descriptor on it)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                local, remote = cols[1].rsplit(":", 1)[1], cols[2].rsplit(":", 1)[1]
                if int(local, 16) == proxy_port and int(remote, 16) == client_port and cols[9] != "0":
                    inode = cols[9]
    assert inode, "no server socket for client port %d" % client_port
    for pid in candidates:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "socket:[%s]" % inode:
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds client port %d" % client_port)


def spread(p, source, n):
    """``n`` greeted connections from ``source`` that two worker processes share (opened again
    until the kernel has given both workers some): (clients, {worker pid: [clients]})."""
    workers = children(p.proc.pid)
    assert len(workers) == 2
    for _ in range(8):
        clients = [greeted(p, source) for _ in range(n)]
        by = {}
        for c in clients:
            by.setdefault(server_pid(p.imap_port, c.sock.getsockname()[1], workers), []).append(c)
        if len(by) == 2:
            return clients, by
        for c in clients:
            c.sock.close()
        time.sleep(0.3)
    raise AssertionError("the kernel never spread the connections over both workers")


def test_conn_limits_and_penalties_hold_across_two_workers(mail_stack):
    with Proxy(mail_stack.info(), aservice={"NumThreads": 2},
               imap={"ConnLimits": "127.0.0.91|255.255.255.255:6", "BGPenalty": 1, "BGDecay": 60}) as p:
        clients, by = spread(p, "127.0.0.91", 6)
        refused = RawClient(p.host, p.imap_port, source="127.0.0.91")
        assert refused.read_all() == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
        # failures on both workers add up: 1 s after the first, 2 s after the second
        first, second = (cs[0] for cs in by.values())
        assert timed(first, b"a LOGIN alice wrong\r\n", "a " + FAILED) < FAST
        assert 1.0 <= timed(second, b"b LOGIN alice wrong\r\n", "b " + FAILED) < 1 + FAST
        assert 2.0 <= timed(first, b"c LOGIN alice wrong\r\n", "c " + FAILED) < 2 + FAST
        clients[0].send(b"z LOGOUT\r\n")
        clients[0].read_all()
        deadline = time.monotonic() + 5                      # the slot comes back for either worker
        while True:
            c = RawClient(p.host, p.imap_port, source="127.0.0.91")
            if c.readline().startswith(b"* OK"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_worker_killed_with_sigkill_leaves_no_slot_taken(mail_stack):
    with Proxy(mail_stack.info(), aservice={"NumThreads": 2},
               imap={"ConnLimits": "127.0.0.92|255.255.255.255:8"}) as p:
        clients, by = spread(p, "127.0.0.92", 8)
        victim, held = next(iter(by.items()))
        survivors = 8 - len(held)
        os.kill(victim, signal.SIGKILL)
        for c in held:
            c.expect_close()
        wait_for_log(p, "gave back %d connection slot(s) of worker" % len(held))
        assert "(pid %d) was killed by signal 9 (SIGKILL); starting a new one" % victim in proxy_log(p)
        deadline = time.monotonic() + 10
        while len(children(p.proc.pid)) < 2:                  # the master starts a replacement
            assert time.monotonic() < deadline
            time.sleep(0.1)
        new = [greeted(p, "127.0.0.92") for _ in range(8 - survivors)]
        refused = RawClient(p.host, p.imap_port, source="127.0.0.92")
        assert refused.read_all() == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
        assert len(new) == len(held)


# --------------------------------------------------------------------------- IPv6 clients
class DualStackProxy(Proxy):
    """The proxy's IMAP listener on [::1] as well (``port6``)."""

    def write_config(self):
        super().write_config()
        self.port6 = unused_ipv6_port()
        path = os.path.join(self.config_dir, "AService.cfg")
        with open(path) as f:
            text = f.read()
        listener = "@%s:%d" % (self.host, self.imap_port)
        with open(path, "w") as f:
            f.write(text.replace(listener, "%s|[::1]:%d" % (listener, self.port6)))


def unused_ipv6_port():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def connect6(port):
    deadline = time.monotonic() + 5
    while True:
        try:
            sock = socket.create_connection(("::1", port), timeout=10)
            break
        except ConnectionRefusedError:          # the IPv6 listener opens just after the IPv4 one
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    c = RawClient.__new__(RawClient)
    c.sock, c.buf = sock, b""
    return c


def test_the_legacy_catch_all_rules_cover_ipv6_clients(mail_stack):
    """ConnLimits ``0.0.0.0|0.0.0.0:N`` (the default's form, written before IPv6) limits an IPv6
    client too, and ``BGExcluded 0.0.0.0/0.0.0.0`` spares it; an IPv6 rule that covers the
    client comes first."""
    with DualStackProxy(mail_stack.info(), imap={"ConnLimits": "0.0.0.0|0.0.0.0:2", "BGPenalty": 3,
                                                 "BGExcluded": "0.0.0.0/0.0.0.0"}) as p:
        held = [connect6(p.port6) for _ in range(2)]
        for c in held:
            c.expect(b"* OK")
        assert connect6(p.port6).read_all() == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
        for tag in (b"a", b"b"):
            assert timed(held[0], tag + b" LOGIN alice wrong\r\n", tag.decode() + " " + FAILED) < FAST
        wait_for_log(p, "[::1:")
        assert "refused: this address holds its 2 connection(s) already (ConnLimits)" in proxy_log(p)
    with DualStackProxy(mail_stack.info(), imap={"ConnLimits": "0.0.0.0|0.0.0.0:2,::1/128:1"}) as p:
        first = connect6(p.port6)
        first.expect(b"* OK")
        assert connect6(p.port6).read_all() == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
