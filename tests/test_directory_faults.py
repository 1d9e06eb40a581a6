"""Directory faults found by trying to break it: a directory host that hangs, hostile input at the directory and
authentication-server edges; each test pins a fault found by trying it (see the test's docstring)."""
import os
import signal
import socket
import time

import pytest
from test_ldap_failover import NO_CACHE, imap_file_log, imap_login, ldap_url, logged_in, searches

from mmproxy import imap
from mmproxy.testing.certs import TestCA
from mmproxy.testing.proxy import Proxy
from mmproxy.testing.slapd import Slapd

from helpers import ImapFrom, RawClient, proxy_log, wait_for_log


def slow_login(p, user="alice", password="alice-pw", timeout=40, source="127.0.0.1"):
    """(seconds, the tagged answer) of one LOGIN, waiting up to ``timeout`` seconds for it."""
    start = time.monotonic()
    r = RawClient(p.host, p.imap_port, timeout=timeout, source=source)
    try:
        r.expect(b"* OK")
        r.send(b'a LOGIN %s "%s"\r\n' % (user.encode(), password.encode()))
        answer = r.skip_to(b"a ")
        return time.monotonic() - start, answer
    finally:
        r.sock.close()


@pytest.mark.timeout(90)
def test_a_hung_first_host_fails_no_login(mail_stack, two_slapds):
    """A first host that accepts and never answers (SIGSTOP): the login whose pooled connection
    times out goes on to the second host within the same login (it used to retry a fresh
    connection to the hung host, which accepted it and never answered: `NO [UNAVAILABLE]` after
    15 s); the next logins go straight to the second host; a relayed session goes on meanwhile."""
    a, b = two_slapds
    with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": ldap_url(a, b)}) as p:
        held = ImapFrom(p.host, p.imap_port)
        held.login("alice", "alice-pw")
        assert logged_in(imap_login(p)) and searches(b) == 0       # pooled connections to a
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            took, answer = slow_login(p)
            assert logged_in(answer), answer
            assert took < 14, took                                 # one OP_TIMEOUT, then b
            assert held.noop()[0] == "OK"
            for _ in range(3):
                took, answer = slow_login(p)
                assert logged_in(answer) and took < 2, (took, answer)
            down = "directory ldap://%s:%d is down (timed out" % (a.host, a.port)
            assert imap_file_log(p).count(down) == 1, imap_file_log(p)[-3000:]
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        wait_for_log(p, "directory ldap://%s:%d answers again" % (a.host, a.port), timeout=15)
        assert logged_in(imap_login(p))
        held.logout()
        assert "Traceback" not in proxy_log(p)


@pytest.mark.parametrize("ttl0", ["AuthCacheTTL", "LdapCacheTTL"])
def test_a_ttl_of_0_caches_nothing_even_for_an_outage(mail_stack, two_slapds, ttl0):
    """AuthCacheTTL 0 (or LdapCacheTTL 0) turns that cache off, LdapStaleGrace or not: with the
    directory down, a password verified (a user found) a moment ago is not taken from a cache
    (it was, for LdapStaleGrace seconds: an operator who turned the PreAuth cache off so that a
    changed password takes effect at once had the old one accepted through an outage)."""
    a, _ = two_slapds
    cfg = {"LdapCacheTTL": 900, "AuthCacheTTL": 900, "LdapStaleGrace": 3600, "LdapNegativeCacheTTL": 0,
           "PreAuth": True, "LdapURL": ldap_url(a), ttl0: 0}
    with Proxy(mail_stack.info(), imap=cfg) as p:
        assert logged_in(imap_login(p))
        a.stop()
        assert imap_login(p) == b"a NO [UNAVAILABLE] Temporary authentication failure, try again later\r\n"
        a.start()
        wait_for_log(p, "answers again", timeout=15)          # while every host is down, no login waits
        assert logged_in(imap_login(p))
        assert "Traceback" not in proxy_log(p)


@pytest.mark.timeout(90)
def test_an_ldaps_host_that_never_answers_is_skipped(mail_stack, tmp_path):
    """ldaps:// to a host that accepts connections and never answers (a hung server, a load
    balancer in front of a dead one): the TLS handshake ends after the connect timeout and the next
    host answers within the same login.  It used to hold its LDAP thread for ever (libldap bounds
    that handshake only on an asynchronous connect): the login got `NO [UNAVAILABLE]` after 15 s
    with the second host up, and every later probe of the hung host lost one more thread."""
    ca = TestCA(str(tmp_path / "ca"))
    cert, key = ca.issue("ldap", ips=["127.0.0.1"])
    good = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"), tls=(cert, key, ca.path))
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)                     # the kernel accepts; nobody ever reads
    good.start()
    try:
        url = "ldaps://127.0.0.1:%d %s:%d/o=internet" % (hung.getsockname()[1], good.host, good.ldaps_port)
        with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": url, "LdapCAFile": ca.path}) as p:
            took, answer = slow_login(p)
            assert logged_in(answer), answer
            assert took < 10, took
            took, answer = slow_login(p)
            assert logged_in(answer) and took < 2, (took, answer)
            assert imap_file_log(p).count("directory ldaps://127.0.0.1:%d is down" % hung.getsockname()[1]) == 1
            assert "Traceback" not in proxy_log(p)
    finally:
        hung.close()
        good.close()


@pytest.fixture(scope="module")
def bad_tls_slapds(mail_stack, tmp_path_factory):
    """Directories whose certificates LdapCAFile does not accept, each for its own reason."""
    d = str(tmp_path_factory.mktemp("badtls"))
    ca = TestCA(os.path.join(d, "ca"))
    other = TestCA(os.path.join(d, "other"), name="another CA")
    certs = {"expired": ("certificate has expired",
                         ca.issue("expired", ips=["127.0.0.1"], days=-1, not_before_days=3)),
             "mismatch": ("mismatch, certificate is not valid for '127.0.0.1'",
                          ca.issue("mismatch", dns=["ldap.example.net"])),
             "unknown": ("unable to get local issuer certificate", other.issue("unknown", ips=["127.0.0.1"]))}
    servers = {why: Slapd(mail_stack.directory, workdir=os.path.join(d, name), tls=(cert, key, ca.path))
               for name, (why, (cert, key)) in certs.items()}
    for s in servers.values():
        s.start()
    yield servers, ca.path
    for s in servers.values():
        s.close()


@pytest.mark.timeout(120)
def test_a_refused_directory_certificate_is_named_in_the_log(mail_stack, bad_tls_slapds):
    """ldaps:// and StartTLS to a directory whose certificate has expired, names another host or
    comes from another CA: the login gets the temporary failure, and the log says what is wrong
    with the certificate (libldap's words were "Can't contact LDAP server: (unknown error code)",
    as for a dead server)."""
    servers, ca = bad_tls_slapds
    for why, s in servers.items():
        for url in (s.ldaps_url + "/o=internet", "%s/o=internet????!StartTLS" % s.url):
            with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": url, "LdapCAFile": ca}) as p:
                assert imap_login(p) == b"a NO [UNAVAILABLE] Temporary authentication failure, try again later\r\n"
                host = url.split("/")[2]
                log = wait_for_log(p, "directory %s://%s: certificate not accepted: " % (url[:url.index(":")], host))
                line = next(x for x in log.splitlines() if "certificate not accepted" in x)
                assert why in line, (url, line)
                assert imap_file_log(p).count("certificate not accepted") == 1 and "Traceback" not in log


@pytest.mark.timeout(90)
def test_a_hung_sole_host_costs_one_wait_then_fails_fast(mail_stack, tmp_path):
    """The only directory host hangs (SIGSTOP): the login that finds out waits for the operation
    timeout once; while the host is down every later login gets the temporary failure at once
    (it used to wait 10 s each, piling up on the LDAP pool); when it answers again, logins work."""
    s = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"))
    s.start()
    try:
        with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": ldap_url(s)}) as p:
            assert logged_in(imap_login(p))
            os.kill(s.proc.pid, signal.SIGSTOP)
            seconds, answer = slow_login(p)
            assert answer == b"a " + imap.NO_TEMP.encode() + b"\r\n" and seconds > 5    # the one that found out
            for _ in range(5):
                t0 = time.monotonic()
                assert imap_login(p) == b"a " + imap.NO_TEMP.encode() + b"\r\n"
                assert time.monotonic() - t0 < 2
            wait_for_log(p, "every host of LdapURL is down")
            os.kill(s.proc.pid, signal.SIGCONT)
            wait_for_log(p, "answers again", timeout=30)
            assert logged_in(imap_login(p))
            down = "directory ldap://%s:%d is down (" % (s.host, s.port)
            assert imap_file_log(p).count(down) == 1 and "Traceback" not in proxy_log(p)
    finally:
        if s.running:
            os.kill(s.proc.pid, signal.SIGCONT)
        s.close()
