"""The daemon's life as an operator drives it: refresh (SIGHUP) that really reloads, replacement
workers that run the configuration in force, and a stop that says goodbye.

Everything against real slapd and Dovecot, clients on raw sockets (the exact lines they see).
"""
import os
import resource
import signal
import socket
import ssl
import time

import gevent
import gevent.pool
import pytest

from mmproxy import imap, pop
from mmproxy.testing import MailStack
from mmproxy.testing.base import free_port
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import RawClient, greeting, proxy_log, refresh, wait_for_log

# Dovecot as the bench runs it: imap processes that hold many idle sessions each
STORE_CONF = """
default_client_limit = 3000
default_process_limit = 200
service imap-login {
  service_count = 0
}
service imap {
  service_count = 0
  client_limit = 250
}
"""
USERS = 50
MANY = 500


@pytest.fixture(scope="module")
def stack():
    """A stack of its own whose stores hold hundreds of sessions cheaply (users user1..user50)."""
    s = MailStack(users=USERS, store_conf=STORE_CONF)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module", autouse=True)
def descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def user(i):
    n = i % USERS + 1
    return "user%d" % n, "pw-user%d" % n


def imap_login(port, i, source="127.0.0.1"):
    """A raw IMAP session logged in as user ``i`` through the proxy, greeting and answer read."""
    r = RawClient("127.0.0.1", port, source=source, timeout=20)
    r.expect(b"* OK ")
    name, pw = user(i)
    r.send(b"a LOGIN %s %s\r\n" % (name.encode(), pw.encode()))
    r.skip_to(b"a OK")
    return r


MANY_SETTINGS = {"ConnLimits": "0.0.0.0|0.0.0.0:100000", "LogLevel": 1, "Banner": "first"}


# ---------------------------------------------------------------------- refresh
@pytest.mark.timeout(240)
def test_refresh_under_a_login_loop_drops_none_of_500_relayed_sessions(stack):
    with Proxy(stack.info(), imap=MANY_SETTINGS, aservice={"LogLevel": 1}) as p:
        pool = gevent.pool.Pool(40)
        held = pool.map(lambda i: imap_login(p.imap_port, i), range(MANY))
        stats = {"ok": 0, "failed": []}
        running = [True]

        def login_loop():
            i = 0
            while running[0]:
                try:
                    r = imap_login(p.imap_port, i)
                    r.send(b"b LOGOUT\r\n")
                    r.skip_to(b"b OK")
                    r.sock.close()
                    stats["ok"] += 1
                except Exception as e:                     # noqa: BLE001 - counted, asserted below
                    stats["failed"].append(repr(e))
                i += 1
        loops = [gevent.spawn(login_loop) for _ in range(4)]
        for n, banner in enumerate(("second", "third", "fourth")):
            gevent.sleep(0.5)
            p.settings["imap"]["Banner"] = banner
            p.write_config()
            refresh(p)
            assert ("* OK [CAPABILITY" in greeting(p.imap_port)) and banner in greeting(p.imap_port)
        gevent.sleep(0.5)
        running[0] = False
        gevent.joinall(loops, timeout=30)
        assert stats["failed"] == [] and stats["ok"] > 20, stats
        for r in held:                                     # every session from before still answers
            r.send(b"n NOOP\r\n")
        for r in held:
            r.skip_to(b"n OK")
        assert all(r.sock.close() is None for r in held)
        assert "Traceback" not in proxy_log(p)


def test_refresh_opens_and_closes_listeners_to_match_servicelist(mail_stack):
    info = mail_stack.info()
    with Proxy(info) as p:
        c = imap_session(p.imap_port, "alice", "alice-pw")
        pop_port = free_port("127.0.0.1")
        p.settings["pop"], p.ports["pop"] = {}, pop_port
        p.write_config()
        refresh(p)
        assert "configuration refreshed; listening on 127.0.0.1:%d" % pop_port in proxy_log(p)
        r = RawClient("127.0.0.1", pop_port)
        r.expect(b"+OK ")
        r.send(b"USER alice\r\nPASS alice-pw\r\n")
        r.expect_lines("+OK")
        r.expect(b"+OK ")
        del p.settings["pop"]                              # and away again: the port closes
        p.write_config()
        refresh(p)
        assert "; closed 127.0.0.1:%d" % pop_port in proxy_log(p)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", pop_port), 2)
        r.send(b"STAT\r\n")                                # the POP session from before goes on
        r.expect(b"+OK ")
        r.send(b"QUIT\r\n")
        r.expect(b"+OK")
        c.send(b"n NOOP\r\n")
        c.skip_to(b"n OK")


def imap_session(port, name, pw, source="127.0.0.1"):
    r = RawClient("127.0.0.1", port, source=source)
    r.expect(b"* OK ")
    r.send(b"a LOGIN %s %s\r\n" % (name.encode(), pw.encode()))
    r.skip_to(b"a OK")
    return r


def test_refresh_moves_a_port_into_and_out_of_sslports(mail_stack, tmp_path):
    cert, key = make_cert(str(tmp_path))
    with Proxy(mail_stack.info()) as p:
        plain = imap_session(p.imap_port, "alice", "alice-pw")
        directory, name = os.path.split(cert)
        p.settings["imap"].update({"SSLEnable": True, "SSLPorts": "127.0.0.1:%d" % p.imap_port,
                                   "SSLCacheDir": directory, "SSLCertNicknames": name[:-4], "SSLKeyFile": key})
        p.write_config()
        refresh(p)
        ctx = ssl.create_default_context(cafile=cert)
        ctx.check_hostname = False
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", p.imap_port), 5)) as s:
            assert s.recv(4096).startswith(b"* OK [CAPABILITY ")        # TLS from the first byte now
        plain.send(b"n NOOP\r\n")                                       # the plain session goes on
        plain.skip_to(b"n OK")
        del p.settings["imap"]["SSLPorts"]
        p.write_config()
        refresh(p)
        assert greeting(p.imap_port).startswith("* OK [CAPABILITY ")    # plain again


def test_refresh_with_errors_changes_nothing_and_says_where(mail_stack):
    with Proxy(mail_stack.info(), imap={"Banner": "kept"}) as p:
        cfg = os.path.join(p.config_dir, "ImapProxyAService.cfg")
        with open(cfg, "a") as f:
            f.write("default:Timeout soon\n")
        line = sum(1 for _ in open(cfg))
        refresh(p, "refresh refused")
        assert "refresh refused: %s:%d: Timeout" % (cfg, line) in proxy_log(p)
        assert "kept" in greeting(p.imap_port)


def test_refresh_reports_what_needs_a_restart(mail_stack):
    with Proxy(mail_stack.info()) as p:
        p.aservice_settings["NumThreads"] = 2
        p.write_config()
        refresh(p)
        assert ("refresh: NumThreads changed from 1 to 2: needs a restart (running with 1)"
                in proxy_log(p))
        assert "worker" not in proxy_log(p)                  # still the one process


def test_refresh_keeps_the_directory_caches(mail_stack, two_slapds):
    """After a refresh that leaves the directory settings alone, users seen before log in without
    LDAP: with the directory stopped right after the refresh too."""
    slapd = two_slapds[0]
    ldap = {"LdapURL": "%s/o=internet" % slapd.url}
    with Proxy(mail_stack.info(), imap={**ldap, "Banner": "one"}) as p:
        for name in ("alice", "erin"):
            imap_session(p.imap_port, name, name + "-pw").sock.close()
        p.settings["imap"]["Banner"] = "two"
        p.write_config()
        refresh(p)
        slapd.stop()
        for name in ("alice", "erin"):
            r = imap_session(p.imap_port, name, name + "-pw")
            r.sock.close()
        p.settings["imap"]["LdapCacheTTL"] = 600          # a directory setting changed: caches start empty
        p.write_config()
        refresh(p)
        r = RawClient("127.0.0.1", p.imap_port)
        r.expect(b"* OK ")
        r.send(b"a LOGIN alice alice-pw\r\n")
        r.expect_lines("a " + imap.NO_TEMP)


# ---------------------------------------------------------------------- workers
@pytest.mark.timeout(90)
def test_a_replaced_worker_runs_the_refreshed_configuration(mail_stack):
    with Proxy(mail_stack.info(), imap={"Banner": "before"}, aservice={"NumThreads": 2}) as p:
        p.settings["imap"]["Banner"] = "after"
        p.write_config()
        p.proc.send_signal(signal.SIGHUP)
        wait_for_log(p, "configuration refreshed")
        workers = worker_pids(p.proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(set(worker_pids(p.proc.pid)) - set(workers)) < 2:
            assert time.monotonic() < deadline, proxy_log(p)[-2000:]
            time.sleep(0.1)
        wait_for_log(p, "worker 1 started")
        time.sleep(0.5)
        banners = {greeting(p.imap_port).split("] ", 1)[1].strip() for _ in range(20)}
        assert banners == {"after"}


def worker_pids(master):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                out.append(int(d))
    return out


# ---------------------------------------------------------------------- stop
@pytest.mark.timeout(120)
def test_stop_says_goodbye_to_every_session(stack):
    with Proxy(stack.info(), imap=MANY_SETTINGS, pop={"ConnLimits": "0.0.0.0|0.0.0.0:100000"},
               aservice={"LogLevel": 1}) as p:
        pool = gevent.pool.Pool(40)
        held = pool.map(lambda i: imap_login(p.imap_port, i), range(300))
        pre = RawClient("127.0.0.1", p.imap_port)
        pre.expect(b"* OK ")
        popc = RawClient("127.0.0.1", p.pop_port)
        popc.expect(b"+OK ")
        popc.send(b"USER user1\r\nPASS pw-user1\r\n")
        popc.expect_lines("+OK")
        popc.expect(b"+OK ")
        gevent.sleep(2)
        t = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        pre.expect_lines(imap.BYE_SHUTDOWN)            # before login: at once
        pre.expect_close()
        assert time.monotonic() - t < 2
        popc.expect_lines(pop.ERR_SHUTDOWN)
        popc.expect_close()
        for r in held:                                 # quiet relayed sessions: told, then closed
            r.expect_lines(imap.BYE_SHUTDOWN)
            r.expect_close()
        assert p.proc.wait(10) == 0
        assert time.monotonic() - t < 8


@pytest.mark.timeout(60)
def test_stop_gives_busy_sessions_the_grace_and_a_second_signal_ends_it(mail_stack):
    with Proxy(mail_stack.info(), aservice={"ShutdownGrace": 60}) as p:
        busy = imap_session(p.imap_port, "alice", "alice-pw")
        running = [True]

        def chatter():
            n = 0
            while running[0]:
                n += 1
                busy.send(b"c%d NOOP\r\n" % n)
                busy.skip_to(b"c%d OK" % n)
                gevent.sleep(0.2)
        g = gevent.spawn(chatter)
        gevent.sleep(0.5)
        p.proc.send_signal(signal.SIGTERM)
        gevent.sleep(3)                                # longer than a quiet session is kept
        assert not g.dead and p.proc.poll() is None    # a busy session goes on within the grace
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.imap_port), 2)    # listeners closed at once
        t = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(10) == 0 and time.monotonic() - t < 3
        running[0] = False
        g.join(5)
        assert "stopping now" in proxy_log(p)


def test_a_worker_that_died_is_replaced_at_once_unless_it_keeps_dying(tmp_path, monkeypatch):
    """Pure logic of the master's respawn delay: 0.2 s after a worker that ran a while; doubling
    from 1 s (up to 30 s) while replacements die within 10 s of their start."""
    from mmproxy import aservice
    from mmproxy.config import load_config
    now = [1000.0]
    monkeypatch.setattr(aservice.time, "monotonic", lambda: now[0])
    m = aservice.Master(load_config(str(tmp_path)), 2)
    m.started[0] = now[0] - 3600
    assert m._respawn_delay(0) == 0.2
    delays = []
    for _ in range(7):
        m.started[0] = now[0] - 1                      # the replacement died a second after its start
        delays.append(m._respawn_delay(0))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    m.started[0] = now[0] - 60
    assert m._respawn_delay(0) == 0.2


@pytest.mark.timeout(60)
def test_workers_stop_when_the_master_is_killed(mail_stack):
    """kill -9 of the master (nothing forwards signals any more, the pid file's lock is gone): its
    workers stop within a few seconds instead of serving on as orphans."""
    with Proxy(mail_stack.info(), aservice={"NumThreads": 2}) as p:
        wait_for_log(p, "worker 1 started")
        workers = worker_pids(p.proc.pid)
        assert len(workers) == 2
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait(5)
        deadline = time.monotonic() + 10
        while any(os.path.exists("/proc/%d" % w) and not zombie(w) for w in workers):
            assert time.monotonic() < deadline, "workers still running"
            time.sleep(0.1)
        files = "".join(open(os.path.join(p.log_dir, f)).read() for f in os.listdir(p.log_dir))
        assert files.count("the master process (pid %d) is gone; stopping" % p.proc.pid) == 2
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.imap_port), 2)


def zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.timeout(60)
def test_stop_gives_the_grace_to_a_download_a_slow_client_has_not_taken_yet(mail_stack):
    """A client reading its answers slowly holds the store's bytes in the proxy (the destination
    blocked): that session is busy, not quiet, and gets ShutdownGrace; it is cut only then, with
    no goodbye inside the stream."""
    with Proxy(mail_stack.info(), aservice={"ShutdownGrace": 8}) as p:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", p.imap_port))
        s.sendall(b"a LOGIN alice alice-pw\r\nb SELECT INBOX\r\n" + b"c FETCH 1 BODY[]\r\n" * 20000)
        time.sleep(3)                                  # everything the client does not read piles up
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(4)                                  # longer than a quiet session is kept
        assert p.proc.poll() is None, "the blocked download was ended as if quiet"
        s.settimeout(10)
        data = b""
        try:
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert p.proc.wait(10) == 0
        assert data.startswith(b"* OK [CAPABILITY") and b"a OK" in data and b"* 1 FETCH" in data
        body, bye, rest = data.partition(imap.BYE_SHUTDOWN.encode() + b"\r\n")
        assert rest == b""                             # the goodbye, if any, comes last...
        assert not bye or body.rsplit(b"\r\n", 2)[-2].startswith(b"c OK")     # ...after a whole response
