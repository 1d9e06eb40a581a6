"""The directory side under failure, against real slapd instances: failover between the hosts of
LdapURL within the same login, failback, a restarted server, ldaps:// and StartTLS, caches that
carry logins through an outage (LdapCacheTTL, LdapStaleGrace), the negative cache
(LdapNegativeCacheTTL), LdapRefreshInterval, and one log line per state change.

Each test has its own slapd instances (seeded with the stack's directory, so users route to the
stack's Dovecot stores) and counts operations in slapd's own `stats` log.
"""
import os
import re
import threading
import time

import pytest

from mmproxy import imap, pop
from mmproxy.testing.certs import TestCA
from mmproxy.testing.proxy import Proxy
from mmproxy.testing.slapd import Slapd

from helpers import ImapFrom, PopFrom, RawClient, proxy_log, wait_for_log

# no caching unless a test asks for it: every login reaches the directory
NO_CACHE = {"LdapCacheTTL": 0, "AuthCacheTTL": 0, "LdapStaleGrace": 0, "LdapNegativeCacheTTL": 0,
            "PreAuth": True}


def ldap_url(*servers, base="o=internet"):
    return "ldap://%s/%s" % (" ".join("%s:%d" % (s.host, s.port) for s in servers), base)


def searches(slapd):
    """How many searches slapd has logged (its `stats` log: one SRCH line per search)."""
    return len(re.findall(r" SRCH base=", slapd.read_log()))


def binds(slapd, who="uid="):
    return len(re.findall(r' BIND dn="%s' % re.escape(who), slapd.read_log()))


def imap_file_log(p):
    """The IMAP service's own log files (a service's directory lines go there, once)."""
    text = ""
    for f in sorted(os.listdir(p.log_dir)):
        if f.startswith("ImapProxy"):
            with open(os.path.join(p.log_dir, f), encoding="utf-8", errors="replace") as fh:
                text += fh.read()
    return text


def imap_login(p, user="alice", password="alice-pw", source="127.0.0.1"):
    """The tagged answer to one LOGIN, as bytes; the connection is closed."""
    r = RawClient(p.host, p.imap_port, source=source)
    try:
        r.expect(b"* OK")
        r.send(b'a LOGIN %s "%s"\r\n' % (user.encode(), password.encode()))
        return r.skip_to(b"a ")
    finally:
        r.sock.close()


def logged_in(line):
    return line.startswith(b"a OK ")


def test_failover_within_the_login_and_failback(mail_stack, two_slapds):
    """The first host dies with logged-in sessions and pooled connections to it: the next logins
    go to the second host within the same login (none fails), logged-in sessions go on, the log
    says so once; when the first host is back, traffic returns to it."""
    a, b = two_slapds
    with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": ldap_url(a, b)},
               pop={**NO_CACHE, "LdapURL": ldap_url(a, b)}) as p:
        held = []
        for _ in range(3):
            c = ImapFrom(p.host, p.imap_port)
            c.login("alice", "alice-pw")
            held.append(c)
        assert searches(a) >= 3 and searches(b) == 0            # in order: the first host serves
        a.stop()
        answers = [imap_login(p) for _ in range(10)]
        assert all(logged_in(x) for x in answers), answers
        c = PopFrom(p.host, p.pop_port)
        c.user("bob")
        assert c.pass_('b"o b\\pw').startswith(b"+OK")
        c.quit()
        for c in held:                                           # relayed sessions never noticed
            assert c.noop()[0] == "OK"
        wait_for_log(p, "is down")
        log = imap_file_log(p)
        down = "directory ldap://%s:%d is down" % (a.host, a.port)
        assert log.count(down) == 1, log[-3000:]
        assert "using ldap://%s:%d" % (b.host, b.port) in log
        assert searches(b) >= 10
        # back: a probe notices within PROBE_INTERVAL, and connections to b are replaced
        a.start()
        wait_for_log(p, "directory ldap://%s:%d answers again" % (a.host, a.port), timeout=15)
        before_a, before_b = searches(a), searches(b)
        for _ in range(5):
            assert logged_in(imap_login(p))
        assert searches(a) - before_a >= 5 and searches(b) == before_b
        for c in held:
            c.logout()
        assert imap_file_log(p).count(down) == 1 and "Traceback" not in proxy_log(p)


def test_every_host_down_is_a_temporary_failure_with_one_line(mail_stack, two_slapds):
    a, b = two_slapds
    with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": ldap_url(a, b)},
               pop={**NO_CACHE, "LdapURL": ldap_url(a, b)}) as p:
        assert logged_in(imap_login(p))
        a.stop()
        b.stop()
        for _ in range(5):
            assert imap_login(p) == b"a " + imap.NO_TEMP.encode() + b"\r\n"
        r = RawClient(p.host, p.pop_port)
        r.expect(b"+OK")
        r.send(b"USER alice\r\nPASS alice-pw\r\nQUIT\r\n")
        r.expect(b"+OK")
        r.expect_lines(pop.ERR_TEMP, b"+OK Bye")
        wait_for_log(p, "login failed user='alice': directory unavailable: no directory host answered")
        log = imap_file_log(p)
        for s in (a, b):
            assert log.count("directory ldap://%s:%d is down" % (s.host, s.port)) == 1, log[-3000:]
        assert "no other directory host answers" in log and "Traceback" not in proxy_log(p)
        a.start()
        wait_for_log(p, "answers again", timeout=15)
        assert logged_in(imap_login(p))


def test_restarted_server_fails_no_login(mail_stack, tmp_path):
    """One host, a full pool of connections; slapd restarts: every login after it answers works at
    the first try (each dead pooled connection is retried on a fresh one within the login)."""
    s = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"))
    s.start()
    try:
        with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": ldap_url(s)}) as p:
            def burst(n):
                out = [None] * n

                def one(i):
                    out[i] = imap_login(p)
                threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                return out
            assert all(logged_in(x) for x in burst(16))          # the pools fill up
            s.stop()
            s.start()
            answers = burst(16)
            assert all(logged_in(x) for x in answers), answers
            assert "Traceback" not in proxy_log(p)
    finally:
        s.close()


def test_cache_carries_known_users_through_an_outage(mail_stack, tmp_path):
    """Users looked up within LdapCacheTTL (and verified within AuthCacheTTL) log in while the
    directory is down; a user not in the cache gets the temporary failure."""
    s = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"))
    s.start()
    try:
        with Proxy(mail_stack.info(), imap={"LdapURL": ldap_url(s), "PreAuth": True}) as p:
            assert logged_in(imap_login(p, "alice", "alice-pw"))
            s.stop()
            assert logged_in(imap_login(p, "alice", "alice-pw"))
            assert imap_login(p, "alice", "wrong") == b"a " + imap.NO_TEMP.encode() + b"\r\n"   # never a bad password
            assert imap_login(p, "erin", "erin-pw") == b"a " + imap.NO_TEMP.encode() + b"\r\n"
    finally:
        s.close()


@pytest.mark.parametrize("grace", [60, 0])
def test_stale_grace(mail_stack, tmp_path, grace):
    """LdapStaleGrace: past LdapCacheTTL/AuthCacheTTL, a cached entry is used only while the
    directory cannot answer, and only within the grace."""
    s = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"))
    s.start()
    try:
        cfg = {"LdapURL": ldap_url(s), "PreAuth": True, "LdapCacheTTL": 1, "AuthCacheTTL": 1, "LdapStaleGrace": grace}
        with Proxy(mail_stack.info(), imap=cfg) as p:
            assert logged_in(imap_login(p))
            n = searches(s)
            time.sleep(1.2)
            assert logged_in(imap_login(p))                       # expired: asked again
            assert searches(s) > n
            time.sleep(1.2)
            s.stop()
            answer = imap_login(p)
            if grace:
                assert logged_in(answer), answer
                assert "using a cached entry past LdapCacheTTL" in proxy_log(p)
            else:
                assert answer == b"a " + imap.NO_TEMP.encode() + b"\r\n"
    finally:
        s.close()


@pytest.mark.parametrize("negative_ttl", [60, 0])
def test_unknown_user_flood_reaches_the_directory_once(mail_stack, tmp_path, negative_ttl):
    s = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"))
    s.start()
    try:
        with Proxy(mail_stack.info(), imap={"LdapURL": ldap_url(s), "LdapNegativeCacheTTL": negative_ttl}) as p:
            assert imap_login(p, "nosuchuser", "x") == b"a " + imap.NO_AUTH.encode() + b"\r\n"
            r = RawClient(p.host, p.imap_port)
            r.expect(b"* OK")
            r.send(b"".join(b"t%d LOGIN nosuchuser x%d\r\n" % (i, i) for i in range(2)))
            for i in range(2):
                assert r.skip_to(b"t%d " % i) == b"t%d %s\r\n" % (i, imap.NO_AUTH.encode())
            r.sock.close()
            for i in range(10):
                assert imap_login(p, "nosuchuser", "y%d" % i) == b"a " + imap.NO_AUTH.encode() + b"\r\n"
            time.sleep(0.3)
            n = s.read_log().count('filter="(uid=nosuchuser)"')
            assert n == (1 if negative_ttl else 13), n
            # a known user is not held up by it, and unknown names each cost one search
            assert logged_in(imap_login(p))
            wait_for_log(p, "login failed user='nosuchuser': unknown user")
    finally:
        s.close()


def test_refresh_interval_reopens_connections(mail_stack, tmp_path):
    s = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"))
    s.start()
    try:
        with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": ldap_url(s), "LdapRefreshInterval": 1}) as p:
            accepts = lambda: s.read_log().count(" ACCEPT from ")           # noqa: E731
            assert logged_in(imap_login(p))
            n = accepts()
            assert logged_in(imap_login(p))
            assert accepts() == n                                       # reused within the interval
            time.sleep(1.2)
            assert logged_in(imap_login(p))
            assert accepts() == n + 2                                   # a new search and a new bind connection
    finally:
        s.close()


@pytest.fixture(scope="module")
def tls_slapd(mail_stack, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ldaptls"))
    ca = TestCA(os.path.join(d, "ca"))
    cert, key = ca.issue("ldap", ips=["127.0.0.1"], dns=["localhost"])
    other = TestCA(os.path.join(d, "other"), name="another CA")
    s = Slapd(mail_stack.directory, workdir=os.path.join(d, "ldap"), tls=(cert, key, ca.path), require_tls=True)
    s.start()
    yield s, ca.path, other.path
    s.close()


def test_ldaps_and_starttls(mail_stack, tls_slapd):
    """ldaps:// and ldap://...????!StartTLS log in with LdapCAFile; a certificate from another CA
    or a plaintext URL to a directory that wants TLS is a temporary failure that says why."""
    s, ca, other = tls_slapd
    plain = "ldap://%s:%d/o=internet" % (s.host, s.port)
    cases = [({"LdapURL": s.ldaps_url + "/o=internet", "LdapCAFile": ca}, None),
             ({"LdapURL": plain + "????!StartTLS", "LdapCAFile": ca}, None),
             ({"LdapURL": s.ldaps_url + "/o=internet", "LdapCAFile": other}, "is down"),
             ({"LdapURL": plain + "????!StartTLS", "LdapCAFile": other}, "is down"),
             ({"LdapURL": plain}, "the directory wants TLS")]
    for cfg, why in cases:
        with Proxy(mail_stack.info(), imap={**NO_CACHE, **cfg}) as p:
            answer = imap_login(p)
            if why is None:
                assert logged_in(answer), (cfg, answer)
            else:
                assert answer == b"a " + imap.NO_TEMP.encode() + b"\r\n", (cfg, answer)
                log = wait_for_log(p, why)
                assert "Traceback" not in log
