"""Third-party authentication (AuthenticationServer, MMPAUTH version 1, docs/authentication-server.md):
the protocol's pure parts, then end to end against slapd, Dovecot and the example server
(examples/authserver.py, a real process on loopback), or a misbehaving server in this process."""
import base64
import os
import sys
import time

import gevent
import pytest
from gevent.server import StreamServer

from mmproxy import imap, pop
from mmproxy.authserver import Request, decode, encode, parse_answer
from mmproxy.testing.base import Daemon, free_port, listening
from mmproxy.testing.dovecot import welcome_subject
from mmproxy.testing.proxy import Proxy

from helpers import ImapFrom, PopFrom, RawClient, proxy_log, unused_port, wait_for_log

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "authserver.py")


# --- the protocol's pure parts ------------------------------------------------------------------------

def test_every_octet_survives_the_encoding():
    octets = bytes(range(256))
    text = encode(octets)
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~@:%")
    assert decode(text.encode()) == octets
    assert encode(b"carol pw+%") == "carol%20pw%2B%25" and decode(b"a+b") == b"a+b"     # + is a plus
    for bad in (b"", b"a b", b"%4", b"%zz", b"\xe4", b"a\tb"):
        with pytest.raises(ValueError):
            decode(bad)


def test_request_line():
    req = Request("imap", False, "latin", "latin@example.com", "uid=latin,o=example.com", b"p\xe4ss wort",
                  ("127.0.0.9", 53122), ("::1", 143), [("mail", "latin@example.com"), ("cn", "L T")])
    assert req.line() == (b"MMPAUTH 1 service=imap tls=no login=latin user=latin@example.com "
                          b"dn=uid%3Dlatin%2Co%3Dexample.com password=p%E4ss%20wort client=127.0.0.9 "
                          b"client-port=53122 server=::1 server-port=143 attr.mail=latin@example.com "
                          b"attr.cn=L%20T\r\n")


@pytest.mark.parametrize("line,answer", [
    (b"OK", ("OK", "")), (b"OK tpa-user3", ("OK", "tpa-user3")), (b"OK j%C3%BCrgen", ("OK", "j\u00fcrgen")),
    (b"NO", ("NO", "")), (b"NO wrong password", ("NO", "wrong password")), (b"TEMP busy", ("TEMP", "busy")),
])
def test_answers(line, answer):
    assert parse_answer(line) == answer


@pytest.mark.parametrize("line", [b"", b"ok", b"OK ", b"OK a b", b"OK %00x", b"OK %FF", b"OK " + b"x" * 257,
                                  b"NO \xff", b"NO \x07", b"YES", b"OKAY"])
def test_garbage_answers(line):
    with pytest.raises(ValueError):
        parse_answer(line)


# --- the example server, a real process ----------------------------------------------------------------

class ExampleServer(Daemon):
    """examples/authserver.py on 127.0.0.1:<port> over a users file (lines of percent-encoded fields)."""

    name = "authserver"

    def __init__(self, users):
        super().__init__()
        self.port = free_port()
        self.users = users

    def _prepare(self):
        with open(os.path.join(self.dir, "users"), "w") as f:
            f.write("# user password [store id]\n")
            f.writelines(" ".join(encode(v) for v in row) + "\n" for row in self.users)

    def _argv(self):
        return [sys.executable, EXAMPLE, "--listen", "127.0.0.1:%d" % self.port,
                "--users", os.path.join(self.dir, "users")]

    def _ready(self):
        return listening("127.0.0.1", self.port)


@pytest.fixture(scope="module")
def example_server(mail_stack):
    """Knows alice, latin (8-bit), bob and carol (blanks in their passwords) with their directory
    passwords, and user3, whose store login it rewrites to tpa-user3 (a login of store 127.0.0.2);
    not erin, whose directory password is right."""
    info = mail_stack.info()["users"]
    mail_stack.stores["127.0.0.2"].add_user("tpa-user3", "pw-user3")
    rows = [(u["login"].encode(), u["password"].encode(u["password_charset"]))
            for u in (info[n] for n in ("alice", "latin", "bob", "carol"))]
    rows.append((b"user3@example.com", b"pw-user3", b"tpa-user3"))
    with ExampleServer(rows) as server:
        yield server


def authserver_proxy(mail_stack, port, **extra):
    settings = {"AuthenticationServer": "127.0.0.1:%d" % port, **extra}
    return Proxy(mail_stack.info(), imap=dict(settings), pop=dict(settings))


def imap_login(p, user, password, source="127.0.0.41"):
    """The tagged answer to LOGIN, the password as a literal (any octet)."""
    r = RawClient(p.host, p.imap_port, source=source)
    r.expect(b"* OK")
    r.send(b"a LOGIN %s {%d+}\r\n%s\r\n" % (user.encode(), len(password), password))
    line = r.skip_to(b"a ")
    r.sock.close()
    return line


def inbox_subjects(c):
    c.select("INBOX")
    typ, data = c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return data[0][1].decode().strip()


def test_accept_reject_and_rewrite(mail_stack, example_server):
    store = mail_stack.stores["127.0.0.2"]
    slapd_before = len(mail_stack.slapd.read_log())
    with authserver_proxy(mail_stack, example_server.port, AuthenticationLdapAttributes="mail cn") as p:
        c = ImapFrom(p.host, p.imap_port, source="127.0.0.41")
        assert c.login("alice", "alice-pw")[0] == "OK"
        assert inbox_subjects(c) == "Subject: " + welcome_subject("alice", "127.0.0.2")
        c.logout()
        # erin's directory password is right, but the server does not know her: a wrong password
        assert imap_login(p, "erin", b"erin-pw") == b"a " + imap.NO_AUTH.encode() + b"\r\n"
        # NO counts as a failed login: the third on one connection ends it
        r = RawClient(p.host, p.imap_port, source="127.0.0.41")
        r.expect(b"* OK")
        r.send(b"a1 LOGIN alice wrong\r\na2 LOGIN erin erin-pw\r\na3 LOGIN alice alice-pw2\r\n")
        r.expect_lines("a1 " + imap.NO_AUTH, "a2 " + imap.NO_AUTH, "a3 " + imap.NO_AUTH, imap.BYE_AUTH_FAILURES)
        r.expect_close()
        # the server's id is the store login: user3 lands in tpa-user3's mailbox
        c = ImapFrom(p.host, p.imap_port, source="127.0.0.41")
        assert c.login("user3", "pw-user3")[0] == "OK"
        assert inbox_subjects(c) == "Subject: " + welcome_subject("tpa-user3", "127.0.0.2")
        c.logout()
        log = wait_for_log(p, "as=tpa-user3")
        assert "login user=user3@example.com store=127.0.0.2:%d as=tpa-user3" % mail_stack.imap_port in log
        assert "login failed user='erin': auth failed: authentication server 127.0.0.1:%d said NO: wrong user or " \
               "password" % example_server.port in log
        assert "Traceback" not in proxy_log(p) and "alice-pw" not in log
    assert "user=<tpa-user3>" in store.read_log() and "user=<user3>" not in store.read_log()
    served = example_server.read_log()
    assert "user=alice@example.com service=imap client=127.0.0.41 attrs=mail,cn: OK" in served
    assert "user=user3@example.com service=imap client=127.0.0.41 attrs=mail,cn: OK as tpa-user3" in served
    assert "user=erin@example.com service=imap client=127.0.0.41 attrs=mail,cn: NO" in served
    assert "alice-pw" not in served
    # the attributes came in the user's own search: no search reads alice's entry by its DN
    slapd_log = mail_stack.slapd.read_log()[slapd_before:]
    assert 'base="%s"' % mail_stack.user("alice")["dn"] not in slapd_log
    user_searches = [set(attrs) for attrs in (line.split(" SRCH attr=")[1].split()
                                              for line in slapd_log.splitlines() if " SRCH attr=" in line)
                     if "uid" in attrs]
    assert user_searches and all({"cn", "mail", "mailHost"} <= attrs for attrs in user_searches)
    assert "BIND dn=\"%s\"" % mail_stack.user("alice")["dn"] not in slapd_log      # no LDAP password check


def test_pop_8bit_passwords_and_blanks(mail_stack, example_server):
    with authserver_proxy(mail_stack, example_server.port) as p:
        r = RawClient(p.host, p.pop_port, source="127.0.0.42")
        r.expect(b"+OK")
        r.send(b"USER latin\r\nPASS p\xe4sswort\r\n")
        r.expect(b"+OK")
        r.expect(b"+OK")                               # the store's answer
        r.send(b"QUIT\r\n")
        r.expect(b"+OK")
        r = RawClient(p.host, p.pop_port, source="127.0.0.42")
        r.expect(b"+OK")
        r.send(b"USER latin\r\nPASS p\xc3\xa4sswort\r\n")   # the UTF-8 of the same text: not the password
        r.expect(b"+OK")
        r.expect_lines(pop.ERR_AUTH)
        r = RawClient(p.host, p.pop_port, source="127.0.0.42")       # SASL PLAIN carries the same octets
        r.expect(b"+OK")
        r.send(b"AUTH PLAIN " + base64.b64encode(b"\0latin\0p\xe4sswort") + b"\r\n")
        r.expect(b"+OK")
        r.send(b"QUIT\r\n")
        r.expect(b"+OK")
        c = PopFrom(p.host, p.pop_port, source="127.0.0.42")
        c.user("carol@example.org")
        assert c.pass_("carol pw").startswith(b"+OK")
        assert b"Subject: " + welcome_subject("carol@example.org", "127.0.0.3").encode() in c.retr(1)[1]
        c.quit()
        c = PopFrom(p.host, p.pop_port, source="127.0.0.42")
        c.user("bob")
        assert c.pass_('b"o b\\pw').startswith(b"+OK")
        c.quit()
        # IMAP: the 8-bit password as a literal, the blank one quoted
        assert imap_login(p, "latin", b"p\xe4sswort").startswith(b"a OK ")
        c = ImapFrom(p.host, p.imap_port, source="127.0.0.42")
        assert c.login("carol@example.org", "carol pw")[0] == "OK"
        assert inbox_subjects(c) == "Subject: " + welcome_subject("carol@example.org", "127.0.0.3")
        c.logout()
        assert "Traceback" not in proxy_log(p)


def imap_temporary_failures(p, source, logins):
    """LOGINs (user, password) on one IMAP connection, each answered with the temporary failure
    (not counted as failed logins: the session goes on); the connection."""
    r = RawClient(p.host, p.imap_port, source=source)
    r.expect(b"* OK")
    for n, (user, password) in enumerate(logins):
        r.send(b"a%d LOGIN %s %s\r\n" % (n, user.encode(), password.encode()))
        r.expect_lines("a%d %s" % (n, imap.NO_TEMP))
    return r


def pop_temporary_failure(p, source, user, password):
    """USER/PASS answered with the temporary failure; then the proxy's log, once POP has logged it."""
    r = RawClient(p.host, p.pop_port, source=source)
    r.expect(b"+OK")
    r.send(b"USER %s\r\nPASS %s\r\n" % (user.encode(), password.encode()))
    r.expect(b"+OK")
    r.expect_lines(pop.ERR_TEMP)
    return wait_for_log(p, "[pop ")


def test_server_down_is_a_temporary_failure_never_a_wrong_password(mail_stack):
    port = unused_port()
    with authserver_proxy(mail_stack, port) as p:
        # three failed logins would end the session: these are not failures
        r = imap_temporary_failures(p, "127.0.0.43", [("alice", "alice-pw")] * 4)
        r.send(b"b LOGOUT\r\n")
        r.expect(b"* BYE")
        log = pop_temporary_failure(p, "127.0.0.43", "alice", "alice-pw")
        line = "login failed user='alice': authentication server unavailable: authentication server 127.0.0.1:%d: " \
               "Connection refused" % port
        assert log.count(line) == 5
        assert log.count("authentication server unavailable") == 5 and "Traceback" not in log


class Misbehaving:
    """An authentication server in this process that answers by the request's user: user1 OK,
    user2 never (until the proxy hangs up), user4..user9 garbage of several kinds."""

    ANSWERS = {
        "user1@example.com": b"OK\r\n",
        "user4@example.com": b"HELLO\r\n",
        "user5@example.com": b"NO " + b"x" * 2000 + b"\r\n",      # over 1024 octets
        "user6@example.com": b"",                                  # closes without an answer
        "user7@example.com": b"OK bad%0Aid\r\n",                   # a control character in the user id
        "user8@example.com": b"ok\r\n",
        "user9@example.com": b"NO \xffreason\r\n",
    }

    def __init__(self):
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.requests = []

    def handle(self, sock, addr):
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return
            line += chunk
        fields = dict(f.split(b"=", 1) for f in line.split()[2:])
        user = decode(fields[b"user"]).decode()
        self.requests.append((user, time.monotonic()))
        if user == "user2@example.com":
            sock.settimeout(30)
            sock.recv(1)                # until the proxy gives up and closes
            return
        sock.sendall(self.ANSWERS[user])

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(timeout=1)


def test_slow_server_fails_temporarily_and_blocks_nobody_else(mail_stack):
    with Misbehaving() as bad, authserver_proxy(mail_stack, bad.server.server_port,
                                               AuthenticationServerTimeout=2) as p:
        c = ImapFrom(p.host, p.imap_port, source="127.0.0.44")
        assert c.login("user1", "pw-user1")[0] == "OK"
        slow = RawClient(p.host, p.imap_port, source="127.0.0.44")
        slow.expect(b"* OK")
        start = time.monotonic()
        slow.send(b"s LOGIN user2 pw-user2\r\n")
        while not any(u == "user2@example.com" for u, _ in bad.requests):
            assert time.monotonic() - start < 5
            gevent.sleep(0.01)
        # while user2's login waits for the server: a relayed session and a new login go on
        for _ in range(3):
            t = time.monotonic()
            assert c.noop()[0] == "OK" and inbox_subjects(c) == "Subject: " + welcome_subject("user1", "127.0.0.2")
            assert time.monotonic() - t < 0.5
        t = time.monotonic()
        assert imap_login(p, "user1", b"pw-user1", source="127.0.0.44").startswith(b"a OK ")
        assert time.monotonic() - t < 1.0 and time.monotonic() - start < 1.8
        slow.expect_lines("s " + imap.NO_TEMP)
        assert 1.9 < time.monotonic() - start < 5
        c.logout()
        log = wait_for_log(p, "did not answer")
        assert "login failed user='user2': authentication server unavailable: authentication server 127.0.0.1:%d " \
               "did not answer within 2 s" % bad.server.server_port in log


def test_garbage_answers_are_temporary_failures(mail_stack):
    with Misbehaving() as bad, authserver_proxy(mail_stack, bad.server.server_port) as p:
        users = ["user4", "user5", "user6", "user7", "user8", "user9"]
        imap_temporary_failures(p, "127.0.0.45", [(user, "pw-" + user) for user in users])
        log = pop_temporary_failure(p, "127.0.0.45", "user4", "pw-user4")
        peer = "authentication server 127.0.0.1:%d" % bad.server.server_port
        for why in ("answered b'HELLO': it is not OK, NO or TEMP", "answered a line of more than 1024 octets",
                    "closed without an answer", "answered b'OK bad%0Aid': its user id is longer than 256 octets "
                    "or holds control characters", "answered b'ok': it is not OK, NO or TEMP",
                    "answered b'NO \\xffreason': its reason is not printable ASCII"):
            assert "authentication server unavailable: %s %s" % (peer, why) in log, why
        assert log.count("authentication server unavailable") == 7 and "Traceback" not in log
