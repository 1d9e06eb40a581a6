"""POP3 end to end: real slapd, real Dovecot stores, mmproxy as operators start it, poplib and curl."""
import base64
import poplib
import re
import subprocess
import time

import pytest

from mmproxy.testing.proxy import Proxy, make_cert

from helpers import PopFrom, RawClient, unused_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def proxy(mail_stack, certs):
    with Proxy(mail_stack.info(), imap=False, tls=certs,
               pop={"AuthServiceTTL": 60, "AuthService": True, "CRAMs": True}) as p:
        yield p


@pytest.fixture(scope="module")
def proxy_nopreauth(mail_stack):
    with Proxy(mail_stack.info(), imap=False, pop={"PreAuth": False}) as p:
        yield p


def pw(stack, uid):
    return stack.info()["users"][uid]["password"]


def first_message(c):
    _, lines, _ = c.retr(1)
    return b"\n".join(lines).decode()


@pytest.mark.parametrize("preauth", [True, False])
def test_user_pass_routes_to_the_right_store(preauth, proxy, proxy_nopreauth, mail_stack):
    p = proxy if preauth else proxy_nopreauth
    for uid, login, host in (("alice", "alice", "127.0.0.2"), ("bob", "bob@example.com", "127.0.0.3"),
                             ("carol", "carol@example.org", "127.0.0.3")):
        c = PopFrom(p.host, p.pop_port)
        c.user(login)
        assert c.pass_(pw(mail_stack, uid)).startswith(b"+OK")     # PASS takes the rest of the line
        assert "Welcome %s on %s" % (mail_stack.info()["users"][uid]["store_login"], host) in first_message(c)
        assert c.quit().startswith(b"+OK")


@pytest.mark.parametrize("preauth", [True, False])
def test_wrong_password_and_unknown_user_get_auth_code(preauth, proxy, proxy_nopreauth):
    p = proxy if preauth else proxy_nopreauth
    for user, password in (("alice", "wrong"), ("nobody-here", "x")):
        c = PopFrom(p.host, p.pop_port)
        c.user(user)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            c.pass_(password)
        c.close()


def test_capa_before_login(proxy):
    c = PopFrom(proxy.host, proxy.pop_port)
    caps = c.capa()
    assert {"USER", "SASL", "STLS", "RESP-CODES", "AUTH-RESP-CODE"} <= set(caps)
    assert caps["SASL"] == ["PLAIN", "LOGIN", "CRAM-MD5"]   # this proxy has CRAMs yes
    c.quit()


def test_auth_plain_with_and_without_initial_response(proxy, mail_stack):
    blob = base64.b64encode(b"\0alice\0" + pw(mail_stack, "alice").encode())
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"AUTH PLAIN " + blob + b"\r\nSTAT\r\n")
    assert r.readline().startswith(b"+OK")
    assert re.match(rb"\+OK \d+ \d+", r.readline())
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"AUTH PLAIN\r\n")
    assert r.readline().startswith(b"+ ")
    r.send(blob + b"\r\n")
    assert r.readline().startswith(b"+OK")


def test_apop_with_clear_text_directory_password(proxy, mail_stack):
    user = mail_stack.info()["users"]["user3"]
    mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: userPassword\nuserPassword: %s\n"
                                % (user["dn"], user["password"]))
    c = PopFrom(proxy.host, proxy.pop_port)
    assert c.apop("user3", user["password"]).startswith(b"+OK")
    assert "Welcome user3 on 127.0.0.2" in first_message(c)
    c.quit()
    c = PopFrom(proxy.host, proxy.pop_port)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        c.apop("user3", "wrong")
    c.close()
    c = PopFrom(proxy.host, proxy.pop_port)          # a hashed directory password cannot do APOP
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        c.apop("alice", pw(mail_stack, "alice"))
    c.close()


def test_stls_then_login_and_pipelined_plaintext_dropped(proxy, mail_stack):
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    c = PopFrom(proxy.host, proxy.pop_port)
    c.stls(context=ctx)
    assert "STLS" not in c.capa()
    c.user("bob")
    c.pass_(pw(mail_stack, "bob"))
    assert "on 127.0.0.3" in first_message(c)
    c.quit()
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"STLS\r\nUSER alice\r\n")
    assert r.readline().startswith(b"+OK")
    tls = ctx.wrap_socket(r.sock)
    tls.sendall(b"PASS alice-pw\r\n")
    assert tls.recv(1000).startswith(b"-ERR USER first")     # the pipelined USER never ran


def test_curl_pop3(proxy, mail_stack):
    # CRAMs yes makes curl prefer CRAM-MD5, which alice's hashed directory password cannot do
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-u", "alice:%s" % pw(mail_stack, "alice"),
                          "--login-options", "AUTH=PLAIN", "pop3://%s:%d/1" % (proxy.host, proxy.pop_port)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "Welcome alice on 127.0.0.2" in out.stdout


def test_store_log_shows_the_real_client_address(proxy, mail_stack):
    def erins():
        log = mail_stack.stores["127.0.0.2"].read_log()
        return [line for line in log.splitlines() if "pop3-login" in line and "Login: user=<erin>" in line]
    before = len(erins())                     # other tests may have logged erin in from elsewhere
    c = PopFrom(proxy.host, proxy.pop_port, source="127.0.0.31")
    c.user("erin")
    c.pass_(pw(mail_stack, "erin"))
    c.quit()
    deadline = time.time() + 5
    while time.time() < deadline and len(erins()) == before:
        time.sleep(0.1)
    lines = erins()[before:]
    assert lines and all("rip=127.0.0.31" in line for line in lines), lines


def test_xqueryauth_fresh_expired_and_disabled(mail_stack, proxy_nopreauth):
    with Proxy(mail_stack.info(), imap=False, pop={"AuthServiceTTL": 2, "AuthService": True}) as p:
        c = PopFrom(p.host, p.pop_port, source="127.0.0.41")
        c.user("alice")
        c.pass_(pw(mail_stack, "alice"))
        c.quit()
        q = RawClient(p.host, p.pop_port, source="127.0.0.42")
        q.expect(b"+OK")
        q.send(b"XQUERYAUTH 127.0.0.41\r\nXQUERYAUTH 127.0.0.43\r\n")
        assert re.match(rb"\+OK alice@example.com \d+\r\n", q.readline())
        assert q.readline().startswith(b"-ERR [AUTH]")
        time.sleep(2.2)
        q.send(b"XQUERYAUTH 127.0.0.41\r\n")
        assert q.readline().startswith(b"-ERR [AUTH]")              # expired
    r = RawClient(proxy_nopreauth.host, proxy_nopreauth.pop_port)
    r.expect(b"+OK")
    r.send(b"XQUERYAUTH 127.0.0.41\r\n")
    assert r.readline().startswith(b"-ERR XQUERYAUTH is not enabled")


def test_store_down_spoofs_an_empty_mailbox(mail_stack):
    port = unused_port("127.0.0.2", "127.0.0.3")
    with Proxy(mail_stack.info(), imap=False, pop={"BacksidePort": port, "SpoofEmptyMailbox": "on",
                                                   "AuthServiceTTL": 60, "AuthService": True}) as p:
        c = PopFrom(p.host, p.pop_port, source="127.0.0.51")
        c.user("alice")
        assert c.pass_(pw(mail_stack, "alice")).startswith(b"+OK")
        assert c.stat() == (0, 0)
        assert c.list()[1] == [] and c.uidl()[1] == []
        with pytest.raises(poplib.error_proto):
            c.retr(1)
        assert c.quit().startswith(b"+OK")
        r = RawClient(p.host, p.pop_port)
        r.expect(b"+OK")
        r.send(b"XQUERYAUTH 127.0.0.51\r\n")
        assert r.readline().startswith(b"-ERR [AUTH]")              # a spoofed session is no login


def test_store_down_spoofs_the_message_file(mail_stack, tmp_path):
    spool = tmp_path / "spoof.txt"
    spool.write_bytes(b"From: postmaster@example.com\nSubject: Your mailbox is resting\n\n"
                      b"Your mail is safe.\n.dotted line\nBack soon.\n.\n")
    port = unused_port("127.0.0.2", "127.0.0.3")
    with Proxy(mail_stack.info(), imap=False, pop={"BacksidePort": port, "SpoofMessageFile": str(spool)}) as p:
        c = PopFrom(p.host, p.pop_port)
        c.user("alice")
        c.pass_(pw(mail_stack, "alice"))
        expected = (b"From: postmaster@example.com\r\nSubject: Your mailbox is resting\r\n\r\n"
                    b"Your mail is safe.\r\n.dotted line\r\nBack soon.\r\n")
        assert c.stat() == (1, len(expected))
        assert c.list()[1] == [b"1 %d" % len(expected)]
        uid = c.uidl(1)
        _, lines, octets = c.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == expected            # poplib un-stuffs the dot line
        _, top, _ = c.top(1, 1)
        assert top[-1] == b"Your mail is safe." and len(top) == 4
        c.dele(1)
        assert c.stat() == (0, 0)
        c.rset()
        assert c.stat()[0] == 1
        c.quit()
        c = PopFrom(p.host, p.pop_port)
        c.user("bob")
        c.pass_(pw(mail_stack, "bob"))
        assert c.uidl(1) == uid and c.stat()[0] == 1                # stable, nothing was deleted
        c.quit()
        out = subprocess.run(["curl", "-sS", "--max-time", "10", "-u", "alice:%s" % pw(mail_stack, "alice"),
                              "pop3://%s:%d/1" % (p.host, p.pop_port)], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and "Your mail is safe." in out.stdout


def test_store_down_without_spoofing_is_a_temporary_failure(mail_stack):
    port = unused_port("127.0.0.2", "127.0.0.3")
    with Proxy(mail_stack.info(), imap=False, pop={"BacksidePort": port}) as p:
        c = PopFrom(p.host, p.pop_port)
        c.user("alice")
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            c.pass_(pw(mail_stack, "alice"))


def test_hostile_input(proxy):
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"USER " + b"a" * 400 + b"\r\n")
    assert b"-ERR" in r.read_all()                                  # RFC 2449: 255 octets
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"STAT\r\nRETR 1\r\n" + b"FROB\r\n" * 12)
    data = r.read_all()
    assert data.count(b"-ERR") == 11 and data.endswith(b"-ERR Too many errors, closing connection\r\n")
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"USER ali\x00ce\r\nPASS x\r\n")
    r.readline()
    assert r.readline().startswith(b"-ERR [AUTH]")


def test_two_worker_processes_share_records_and_replace_a_dead_worker(mail_stack):
    """NumThreads 2: SO_REUSEPORT workers; a POP login seen by one is known to the other."""
    import os
    import signal
    with Proxy(mail_stack.info(), aservice={"NumThreads": 2},
               pop={"AuthServiceTTL": 60, "AuthService": True}) as p:
        master = p.proc.pid

        def workers():
            with open("/proc/%d/task/%d/children" % (master, master)) as f:
                return f.read().split()
        assert len(workers()) == 2
        c = PopFrom(p.host, p.pop_port, source="127.0.0.61")
        c.user("alice")
        c.pass_(pw(mail_stack, "alice"))
        c.quit()
        answers = set()
        for _ in range(16):                       # the kernel spreads these over both workers
            q = RawClient(p.host, p.pop_port, source="127.0.0.62")
            q.expect(b"+OK")
            q.send(b"XQUERYAUTH 127.0.0.61\r\n")
            answers.add(q.readline().split(b" ")[:2] == [b"+OK", b"alice@example.com"])
        assert answers == {True}
        killed = workers()[0]
        os.kill(int(killed), signal.SIGKILL)
        deadline = time.time() + 10
        while len(workers()) < 2 or killed in workers():
            assert time.time() < deadline, "the dead worker was not replaced"
            time.sleep(0.1)
        for _ in range(8):
            c = PopFrom(p.host, p.pop_port)
            c.user("bob")
            assert c.pass_(pw(mail_stack, "bob")).startswith(b"+OK")
            c.quit()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(10) == 0
        assert not os.path.exists(os.path.join(p.config_dir, "mmproxy.pid"))


def test_store_in_use_code_passes_through():
    """A store that says [IN-USE] (Dovecot with pop3_lock_session) is quoted, not turned into [AUTH]."""
    from mmproxy.testing import MailStack
    with MailStack(users=1, store_conf="pop3_lock_session = yes\n") as stack, \
            Proxy(stack.info(), imap=False, pop={}) as p:
        first = PopFrom(p.host, p.pop_port)
        first.user("alice")
        first.pass_(pw(stack, "alice"))
        second = PopFrom(p.host, p.pop_port, timeout=30)     # Dovecot waits 10 s for the lock first
        second.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_(pw(stack, "alice"))
        first.quit()


def test_auth_cram_md5(proxy, mail_stack):
    import hashlib
    import hmac
    u = mail_stack.info()["users"]["user7"]
    mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: userPassword\nuserPassword: %s\n"
                                % (u["dn"], u["password"]))
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"CAPA\r\n")
    assert r.skip_to(b"SASL ").strip() == b"SASL PLAIN LOGIN CRAM-MD5"
    r.skip_to(b".")
    r.send(b"AUTH CRAM-MD5\r\n")
    challenge = base64.b64decode(r.expect(b"+ ")[2:].strip())
    digest = hmac.new(u["password"].encode(), challenge, hashlib.md5).hexdigest()
    r.send(base64.b64encode(b"user7 " + digest.encode()) + b"\r\nSTAT\r\n")
    assert r.readline().startswith(b"+OK")
    assert re.match(rb"\+OK 1 \d+", r.readline())


def test_auth_login_mechanism(proxy, mail_stack):
    """SASL LOGIN over POP (RFC 5034 framing): "Username:", "Password:", with or without initial response."""
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"AUTH LOGIN\r\n")
    r.expect_lines("+ " + base64.b64encode(b"Username:").decode())
    r.send(base64.b64encode(b"bob") + b"\r\n")
    r.expect_lines("+ " + base64.b64encode(b"Password:").decode())
    r.send(base64.b64encode(pw(mail_stack, "bob").encode()) + b"\r\nSTAT\r\n")
    r.expect(b"+OK")
    r.expect(b"+OK 1 ")
    r = RawClient(proxy.host, proxy.pop_port)
    r.expect(b"+OK")
    r.send(b"AUTH LOGIN " + base64.b64encode(b"bob") + b"\r\n")
    r.expect_lines("+ " + base64.b64encode(b"Password:").decode())
    r.send(b"*\r\n")
    r.expect_lines("-ERR Authentication cancelled")
