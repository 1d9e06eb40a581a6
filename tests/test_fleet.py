"""A fleet end to end: two mmproxy instances (one of them with two workers) sharing a real
redis-server, behind a real HAProxy that sends PROXY v2 headers (plain, and with TLS terminated
at HAProxy), over real slapd, Dovecot and Postfix.  Penalties, connection limits and
POP-before-SMTP records hold across the fleet; a user moved to another store lands there after
``mmproxy flush`` and ``kick`` without a restart; ``who``/``status --all`` see every instance;
with Redis gone no session is refused."""
import imaplib
import json
import os
import smtplib
import socket
import subprocess
import sys
import time

import pytest
from test_ldap_failover import ldap_url
from test_smtp import certs, delivered, hp, message, relay, sasl_socket, smtp_settings, subject  # noqa: F401

from mmproxy.testing.certs import TestCA
from mmproxy.testing.dovecot import welcome_subject
from mmproxy.testing.haproxy import Frontend, HAProxy, write_pem
from mmproxy.testing.proxy import Proxy
from mmproxy.testing.redis import RedisServer
from mmproxy.testing.slapd import Slapd

from helpers import ImapFrom, PopFrom, RawClient, proxy_log, until

ROOT = __file__.rsplit("/tests/", 1)[0]
MOVED = "kurt"          # on store 127.0.0.2 in the stack's data; moved to 127.0.0.3 by a test


def mmproxy(p, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "mmproxy", *args, "--config-dir", p.config_dir],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(password="fleet pw", workdir=str(tmp_path_factory.mktemp("redis"))) as r:
        yield r


@pytest.fixture(scope="module")
def slapd(mail_stack, tmp_path_factory):
    """A private directory: the test moves a user's mailHost."""
    s = Slapd(mail_stack.directory, workdir=str(tmp_path_factory.mktemp("ldap")))
    s.start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def running(mail_stack, redis_server, slapd, relay):  # noqa: F811
    """Instances a (one process) and b (NumThreads 2), clients straight to them from their own
    127.x addresses; BadGuys on for IMAP (1 s per failure, at most 2); ConnLimits 1 for 127.0.0.43;
    POP-before-SMTP."""
    proxies = []
    try:
        for name, threads in (("a", 1), ("b", 2)):
            p = Proxy(mail_stack.info(),
                      aservice={"StateRedisURL": redis_server.url, "StateRedisPrefix": "fleet-test:",
                                "InstanceName": name, "NumThreads": threads},
                      imap={"LdapURL": ldap_url(slapd), "BGPenalty": 1, "BGMaxBadness": 2,
                            "BGExcluded": "127.0.0.1/32", "ConnLimits": "127.0.0.43|255.255.255.255:1",
                            "LdapCacheTTL": 600, "AuthCacheTTL": 600},
                      pop={"LdapURL": ldap_url(slapd), "AuthServiceTTL": 60, "LdapCacheTTL": 600},
                      smtp=smtp_settings([hp(relay)], PopBeforeSmtpKludgeChannel="tcp_intranet"))
            proxies.append(p)
            p.start()
        yield proxies
    finally:
        for p in proxies:
            p.stop()


def login_answer(p, user, password, source):
    r = RawClient(p.host, p.imap_port, source=source, timeout=30)
    r.expect(b"* OK")
    t = time.monotonic()
    r.send(b'a LOGIN %s "%s"\r\n' % (user.encode(), password.encode()))
    answer = r.skip_to(b"a ")
    took = time.monotonic() - t
    r.send(b"z LOGOUT\r\n")
    r.sock.close()
    return answer, took


@pytest.mark.timeout(120)
def test_penalties_and_connection_limits_are_the_fleets(running, mail_stack):
    """A failure on a makes the address wait on b, b's failures add up on a, a success on a
    forgives it on b; a connection held on a counts against the limit on b (either worker)."""
    a, b = running
    pw = mail_stack.user("erin")["password"]
    ip = "127.0.0.41"
    answer, took = login_answer(a, "erin", "wrong", ip)
    assert answer.startswith(b"a NO [AUTHENTICATIONFAILED]") and took < 0.9, (answer, took)
    answer, took = login_answer(b, "erin", "wrong", ip)                  # waits a's sentence: 1 s
    assert answer.startswith(b"a NO [AUTHENTICATIONFAILED]") and 0.9 <= took < 1.9, (answer, took)
    answer, took = login_answer(b, "erin", "wrong", ip)                  # 2 s now (BGMaxBadness)
    assert 1.9 <= took < 2.9, took
    answer, took = login_answer(a, "erin", pw, ip)                       # waits once, then forgiven
    assert answer.startswith(b"a OK") and 1.9 <= took < 2.9, (answer, took)
    for p in (b, b):
        answer, took = login_answer(p, "erin", pw, ip)
        assert answer.startswith(b"a OK") and took < 0.9, (answer, took)
    answer, took = login_answer(a, "erin", pw, "127.0.0.42")             # another address never waited
    assert answer.startswith(b"a OK") and took < 0.9
    held = RawClient(a.host, a.imap_port, source="127.0.0.43")
    held.expect(b"* OK")
    for _ in range(4):
        refused = RawClient(b.host, b.imap_port, source="127.0.0.43")
        assert refused.read_all(5) == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
    held.send(b"z LOGOUT\r\n")
    held.expect(b"* BYE")
    time.sleep(0.3)
    again = RawClient(b.host, b.imap_port, source="127.0.0.43")
    again.expect(b"* OK")
    again.sock.close()


@pytest.mark.timeout(120)
def test_pop_before_smtp_across_instances(running, relay, mail_stack):  # noqa: F811
    a, b = running
    pop = PopFrom(a.host, a.pop_port, "127.0.0.44")
    pop.user("alice@example.com")
    assert pop.pass_(mail_stack.user("alice")["password"]).startswith(b"+OK")
    pop.quit()
    subj = subject()
    c = smtplib.SMTP(b.host, b.smtp_port, source_address=("127.0.0.44", 0), timeout=15)
    c.ehlo("client.example.net")
    c.sendmail("alice@example.com", ["friend@foreign.test"], message(subj, to="friend@foreign.test"))
    c.quit()
    delivered(relay, subj)


def inbox_subject(p, user, password, source="127.0.0.1"):
    m = ImapFrom(p.host, p.imap_port, source)
    try:
        m.login(user, password)
        m.select("INBOX", readonly=True)
        _, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return data[0][1].decode().strip().removeprefix("Subject: ")
    finally:
        try:
            m.logout()
        except (imaplib.IMAP4.abort, OSError):
            pass


@pytest.mark.timeout(120)
def test_a_user_moved_to_another_store_lands_there_after_flush_and_kick(running, mail_stack, slapd):
    a, b = running
    user = mail_stack.directory.user(MOVED)
    assert user.mailhost == "127.0.0.2"
    mail_stack.stores["127.0.0.3"].add_user(user.store_login, user.password)
    for p in (a, b):                                        # both instances have the user cached
        assert inbox_subject(p, MOVED, user.password) == welcome_subject(user.store_login, "127.0.0.2")
    logged_in = ImapFrom(a.host, a.imap_port)
    logged_in.login(MOVED, user.password)
    logged_in.select("INBOX")
    slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.3\n\n" % user.dn)
    assert inbox_subject(a, MOVED, user.password) == welcome_subject(user.store_login, "127.0.0.2")   # cached
    for nobody in ("", "a\nb"):
        r = mmproxy(a, "flush", nobody)
        assert r.returncode == 2 and "Invalid value for USER: an empty user, or one with control characters, " \
            "names nobody" in r.stderr, r.stdout + r.stderr
    r = mmproxy(a, "flush", MOVED)
    assert r.returncode == 0, r.stdout + r.stderr
    names = sorted(line.split(":")[0] for line in r.stdout.splitlines() if "cached entr" in line)
    assert names == ["a/main", "b/w0", "b/w1"], r.stdout
    assert "flushed %s on 3 process(es)" % MOVED in r.stdout
    r = mmproxy(b, "kick", MOVED)                           # from the other box: reaches a's session
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a/main: 1 session(s) closed" in r.stdout, r.stdout
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        for _ in range(20):
            logged_in.noop()
            time.sleep(0.1)
    for p in (a, b, b):
        assert inbox_subject(p, MOVED, user.password) == welcome_subject(user.store_login, "127.0.0.3")


@pytest.mark.timeout(120)
def test_who_and_status_all_see_every_instance(running, mail_stack):
    a, b = running
    pw = mail_stack.user("erin")["password"]
    sessions = []
    for p, source in ((a, "127.0.0.45"), (b, "127.0.0.46")):
        m = ImapFrom(p.host, p.imap_port, source)
        m.login("erin", pw)
        sessions.append(m)
    try:
        r = mmproxy(a, "who", "--all", "--user", "erin", "--json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert sorted((row["instance_name"], row["client"].split(":")[0]) for row in rows) == \
            [("a", "127.0.0.45"), ("b", "127.0.0.46")]
        r = mmproxy(b, "who", "--all", "--user", "erin")
        assert "a/main" in r.stdout and ("b/w0" in r.stdout or "b/w1" in r.stdout), r.stdout
        r = mmproxy(a, "status", "--all", "--json")
        info = json.loads(r.stdout)
        assert sorted(w["worker"] for w in info["workers"]) == ["a/main", "b/w0", "b/w1"]
        assert info["total"]["imap"]["relaying"] >= 2
        r = mmproxy(a, "who")                                   # without --all: this box only
        assert "127.0.0.45" in r.stdout and "127.0.0.46" not in r.stdout
    finally:
        for m in sessions:
            m.logout()


def log_files(p):
    """What the proxy's log files hold (not its terminal output, which repeats them)."""
    text = ""
    for f in sorted(os.listdir(p.log_dir)):
        with open(os.path.join(p.log_dir, f), "rb") as fh:
            text += fh.read().decode("utf-8", "backslashreplace")
    return text


@pytest.mark.timeout(180)
def test_redis_gone_refuses_nobody(running, redis_server, mail_stack):
    """Redis hung: every login goes through (the first of each process waits REDIS_TIMEOUT), one
    warning when a process loses it and one when it has it back; kick falls back to this box."""
    a, b = running
    pw = mail_stack.user("erin")["password"]
    redis_server.pause()
    try:
        for p in (a, b, a, b):
            answer, took = login_answer(p, "erin", pw, "127.0.0.47")
            assert answer.startswith(b"a OK") and took < 2, (answer, took, log_files(p)[-3000:])
        t = time.monotonic()
        r = mmproxy(a, "kick", "nobody-at-all", timeout=60)
        assert r.returncode == 1 and "0 session(s) closed" in r.stdout, r.stdout + r.stderr
        assert "asking this box only: the other proxies are not reached" in r.stderr, r.stderr
        assert time.monotonic() - t < 8                         # a hung Redis is not waited for long
    finally:
        redis_server.resume()
    for p in (a, b):
        until(lambda: log_files(p).count("answers again") == log_files(p).count("does not answer ("), timeout=15)
        log = log_files(p)
        lost = log.count("does not answer (")
        assert 1 <= lost <= (1 if p is a else 2) and log.count("answers again") == lost, log[-3000:]
        assert ":***@" in log and "fleet pw" not in log
        assert "Traceback" not in log


# ---------------------------------------------------------------------- HAProxy in front
@pytest.fixture(scope="module")
def behind_haproxy(mail_stack, redis_server, slapd, tmp_path_factory):
    """Two instances whose IMAP and POP listeners take PROXY v2 from 127.0.0.1 only, HAProxy in
    front: plain IMAP and POP frontends (send-proxy-v2) and an IMAPS frontend whose TLS HAProxy
    terminates (send-proxy-v2-ssl)."""
    d = tmp_path_factory.mktemp("haproxy")
    ca = TestCA(str(d / "ca"))
    cert, key = ca.issue("balancer", ips=["127.0.0.1"], dns=["localhost"])
    pem = write_pem(cert, key, str(d / "balancer.pem"))
    proxies = []
    for name in ("c", "d"):
        p = Proxy(mail_stack.info(),
                  aservice={"StateRedisURL": redis_server.url, "StateRedisPrefix": "fleet-lb:", "InstanceName": name},
                  imap={"LdapURL": ldap_url(slapd), "RestrictPlainPasswords": True, "ProxyProtocolFrom": "127.0.0.1"},
                  pop={"LdapURL": ldap_url(slapd), "ProxyProtocolFrom": "127.0.0.1"})
        for kind in p.settings:
            p.settings[kind]["ProxyProtocolPorts"] = "%s:%d" % (p.host, p.ports[kind])
        p.start()
        proxies.append(p)
    lb = HAProxy([Frontend("imap", [(p.host, p.imap_port) for p in proxies], send_proxy="v2"),
                  Frontend("pop", [(p.host, p.pop_port) for p in proxies], send_proxy="v2"),
                  Frontend("imaps", [(p.host, p.imap_port) for p in proxies], tls_pem=pem, send_proxy="v2-ssl")],
                 workdir=str(d / "lb"))
    lb.start()
    yield lb, proxies, ca
    lb.close()
    for p in proxies:
        p.stop()


class ImapsFrom(imaplib.IMAP4_SSL):
    """IMAP over TLS from a chosen 127.x source address."""

    def __init__(self, host, port, source, ctx):
        self._source = source
        super().__init__(host, port, ssl_context=ctx, timeout=10)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def store_lines(mail_stack, ip, needle):
    return [line for line in mail_stack.stores[ip].read_log().splitlines() if needle in line]


@pytest.mark.timeout(120)
def test_haproxy_send_proxy_v2_plain_and_tls_terminated(behind_haproxy, mail_stack):
    import ssl
    lb, proxies, ca = behind_haproxy
    erin, user3 = mail_stack.directory.user("erin"), mail_stack.directory.user("user3")
    before = len(store_lines(mail_stack, "127.0.0.2", "rip=127.0.0.61"))
    for _ in range(2):                       # round robin: both instances
        pop = PopFrom("127.0.0.1", lb.port_of("pop"), "127.0.0.61")
        pop.user("user3")
        assert pop.pass_(user3.password).startswith(b"+OK")
        pop.quit()
    until(lambda: len(store_lines(mail_stack, "127.0.0.2", "rip=127.0.0.61")) >= before + 2)
    plain = RawClient("127.0.0.1", lb.port_of("imap"), source="127.0.0.62")
    greeting = plain.expect(b"* OK")
    assert b"LOGINDISABLED" in greeting                                 # plain text to the balancer
    plain.send(b"z LOGOUT\r\n")
    plain.skip_to(b"z ")
    ctx = ssl.create_default_context(cafile=ca.path)
    before = len(store_lines(mail_stack, "127.0.0.2", "rip=127.0.0.63"))
    for _ in range(2):
        m = ImapsFrom("127.0.0.1", lb.port_of("imaps"), "127.0.0.63", ctx)
        assert "STARTTLS" not in m.capabilities and "LOGINDISABLED" not in m.capabilities, m.capabilities
        m.login("erin", erin.password)                                 # TLS at the balancer counts
        m.logout()
    until(lambda: len(store_lines(mail_stack, "127.0.0.2", "rip=127.0.0.63")) >= before + 2)
    for p in proxies:                                                   # round robin reached both
        log = proxy_log(p)
        assert "pop 127.0.0.61:" in log and "imap 127.0.0.63:" in log, log[-2000:]
    assert "imap 127.0.0.62:" in "".join(proxy_log(p) for p in proxies)
