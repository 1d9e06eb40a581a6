"""Deadlines: every phase has an overall time limit, so a peer that trickles bytes cannot hold a
session.  Each test runs a real proxy with the limits shortened to a few seconds, a peer that sends
one byte at a time (a raw client, or DelayProxy in front of a real store or relay), and checks the
exact lines the client sees, when it sees them, and the one log line that names the phase."""
import os
import socket
import ssl
import time

import gevent
import pytest

from mmproxy import __version__, imap, pop, smtp
from mmproxy.testing import DelayProxy
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import RawClient, wait_for_log

LOGIN_LIMITS = {"LoginTimeout": 2, "LoginIdleTimeout": 1}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls")))


def trickle(sock, data, every):
    """Send ``data`` a byte at a time, ``every`` seconds apart, until it is sent or the peer is gone."""
    def run():
        try:
            for i in range(len(data)):
                sock.sendall(data[i:i + 1])
                gevent.sleep(every)
        except OSError:
            pass
    return gevent.spawn(run)


def file_log(p):
    """The proxy's log files (not its terminal output, which repeats the warnings)."""
    text = ""
    for f in sorted(os.listdir(p.log_dir)):
        with open(os.path.join(p.log_dir, f), encoding="utf-8", errors="backslashreplace") as fh:
            text += fh.read()
    return text


def one_log_line(p, needle):
    """The one line of the proxy's log holding ``needle`` (waits for it; fails on none or several)."""
    wait_for_log(p, needle)
    time.sleep(0.2)
    lines = [line for line in file_log(p).splitlines() if needle in line]
    assert len(lines) == 1, lines
    return lines[0]


def lines_until_close(r, timeout=10):
    """Every line the server sends until it closes."""
    data = r.read_all(timeout)
    return [line for line in data.decode("utf-8", "replace").split("\r\n") if line]


def assert_took(start, seconds):
    took = time.monotonic() - start
    assert seconds - 0.2 <= took < seconds + 2, took


def client_hello():
    """The first flight of a real TLS client, as bytes."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# ---------------------------------------------------------------------- before login (IMAP, POP)
@pytest.mark.parametrize("kind", ["imap", "pop"])
def test_the_dialogue_before_login_has_a_deadline(mail_stack, kind):
    """LoginTimeout bounds the whole dialogue before login, whether the client trickles one command
    or keeps sending whole ones; LoginIdleTimeout bounds each wait."""
    bye = imap.BYE_DEADLINE if kind == "imap" else pop.ERR_DEADLINE
    noop, ok = (b"a NOOP\r\n", "a OK NOOP completed") if kind == "imap" else (b"CAPA\r\n", None)
    with Proxy(mail_stack.info(), imap=LOGIN_LIMITS if kind == "imap" else False,
               pop=LOGIN_LIMITS if kind == "pop" else None) as p:
        port = p.ports[kind]
        r = RawClient(p.host, port)
        r.expect(b"* OK [CAPABILITY " if kind == "imap" else b"+OK ")
        start = time.monotonic()                          # never idle for a second, no whole command in 2 s
        trickle(r.sock, b"a LOGIN alice alice-pw\r\n" if kind == "imap" else b"USER alice\r\n", 0.3)
        assert lines_until_close(r) == [bye]
        assert_took(start, 2)
        state = "not authenticated" if kind == "imap" else "authorization"
        one_log_line(p, "deadline passed in state %s: the dialogue before login took more than 2 s" % state)

        r = RawClient(p.host, port)                       # whole commands, each in time: the same limit
        start = time.monotonic()
        r.readline()
        sender = gevent.spawn(lambda: [r.sock.sendall(noop) or gevent.sleep(0.5) for _ in range(8)])
        got = lines_until_close(r)
        sender.kill()
        assert got[-1] == bye
        if ok:
            assert set(got[:-1]) == {ok} and len(got) >= 4, got
        assert_took(start, 2)

        r = RawClient(p.host, port)                       # silent: the idle limit
        r.readline()
        start = time.monotonic()
        assert lines_until_close(r) == [imap.BYE_IDLE if kind == "imap" else pop.ERR_IDLE]
        assert_took(start, 1)


def test_tls_handshakes_have_a_deadline(mail_stack, certs):
    """HandshakeTimeout bounds a whole TLS handshake (implicit TLS, STARTTLS, STLS) however slowly
    the ClientHello comes; mid-handshake no protocol reply can reach the client: it is disconnected."""
    hello = client_hello()
    settings = {"HandshakeTimeout": 2, "LoginTimeout": 30}
    with Proxy(mail_stack.info(), tls=certs, imap=settings, pop=settings) as p:
        def trickled_handshake_is_cut(r):
            start = time.monotonic()
            trickle(r.sock, hello, 0.2)
            assert r.read_all(10) == b""
            assert_took(start, 2)

        trickled_handshake_is_cut(RawClient(p.host, p.imaps_port))
        line = one_log_line(p, "TLS handshake took more than 2 s")
        assert "deadline passed in state not authenticated: TLS handshake took more than 2 s" in line
        for port, command, answer in ((p.imap_port, b"a STARTTLS\r\n", "a OK Begin TLS negotiation now"),
                                      (p.pop_port, b"STLS\r\n", "+OK Begin TLS negotiation")):
            r = RawClient(p.host, port)
            r.readline()
            r.send(command)
            r.expect_lines(answer)
            trickled_handshake_is_cut(r)
        wait_for_log(p, "deadline passed in state authorization: TLS handshake took more than 2 s")


def test_a_tls_handshake_before_login_ends_with_the_login_deadline(mail_stack, certs):
    """A handshake before login is part of the dialogue LoginTimeout bounds: a HandshakeTimeout
    longer than what is left of it does not lengthen the dialogue (implicit TLS, STARTTLS, STLS)."""
    hello = client_hello()
    settings = {"HandshakeTimeout": 10, **LOGIN_LIMITS}
    with Proxy(mail_stack.info(), tls=certs, imap=settings, pop=settings) as p:
        for port, command, go in ((p.imaps_port, b"", b""), (p.imap_port, b"a STARTTLS\r\n", b"a OK Begin TLS"),
                                  (p.pop_port, b"STLS\r\n", b"+OK Begin TLS")):
            start = time.monotonic()                      # LoginTimeout counts from the connect
            r = RawClient(p.host, port)
            if command:
                r.readline()
                r.send(command)
                r.expect(go)
            trickle(r.sock, hello, 0.2)
            assert r.read_all(10) == b""
            assert_took(start, 2)
        wait_for_log(p, "deadline passed in state authorization: the dialogue before login took more than 2 s")
        time.sleep(0.2)
        lines = [line for line in file_log(p).splitlines() if "deadline passed in" in line]
        assert [line.split("] ", 1)[1] for line in lines] == [
            "deadline passed in state not authenticated: the dialogue before login took more than 2 s"] * 2 + [
            "deadline passed in state authorization: the dialogue before login took more than 2 s"], lines


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["imap", "imaps"])
def test_a_client_that_does_not_read_its_answers_cannot_outlast_the_login_deadline(mail_stack, certs, implicit_tls):
    """The proxy's sends are bounded by the phase's deadline too: a client that pipelines commands
    and never reads the answers (or reads a little now and then) blocks the proxy's send, and
    held a session before login for a minute per send in clear, for ever over TLS."""
    with Proxy(mail_stack.info(), tls=certs, imap=dict(LOGIN_LIMITS, LoginIdleTimeout=2)) as p:
        start = time.monotonic()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect((p.host, p.imaps_port if implicit_tls else p.imap_port))
        if implicit_tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            s = ctx.wrap_socket(s)
        s.settimeout(0.5)
        try:
            while time.monotonic() - start < 5:           # until the proxy stops taking them
                s.send(b"a CAPABILITY\r\n" * 200)
        except (socket.timeout, ssl.SSLWantWriteError):
            pass
        line = one_log_line(p, "deadline passed in state not authenticated")
        assert line.endswith("the dialogue before login took more than 2 s"), line
        assert_took(start, 2)
        received = b""                                    # what the client can still read: answers, no goodbye
        try:
            s.settimeout(5)
            while True:
                data = s.recv(65536)
                if not data:
                    break
                received += data
        except (ConnectionResetError, ssl.SSLError):
            pass
        s.close()
        caps = "IMAP4rev1 LITERAL- SASL-IR ID%s AUTH=PLAIN AUTH=LOGIN" % ("" if implicit_tls else " STARTTLS")
        lines = received.split(b"\r\n")[:-1]
        assert lines[0] == ("* OK [CAPABILITY %s] mmproxy %s IMAP4rev1 proxy ready" % (caps, __version__)).encode()
        assert set(lines[1:]) == {("* CAPABILITY " + caps).encode(), b"a OK Capability completed"}, lines[:4]


# ---------------------------------------------------------------------- the store's part of a login
def test_a_store_that_trickles_its_answers_has_a_deadline(mail_stack):
    """StoreTimeout bounds the store's whole part of a login (connect, greeting, login): a store that
    greets and then answers a byte at a time gets the client its answer in time."""
    info = mail_stack.info()
    slow_imap = DelayProxy("127.0.0.2", info["imap_port"], listen_host="127.0.0.2", trickle=0.3, trickle_after=1)
    slow_pop = DelayProxy("127.0.0.2", info["pop3_port"], listen_host="127.0.0.2", trickle=0.3, trickle_after=1)
    with slow_imap, slow_pop, Proxy(info, imap={"BacksidePort": slow_imap.port, "StoreTimeout": 2},
                                    pop={"BacksidePort": slow_pop.port, "StoreTimeout": 2}) as p:
        r = RawClient(p.host, p.imap_port)
        r.readline()
        start = time.monotonic()
        r.send(b"a LOGIN alice alice-pw\r\n")
        r.expect_lines("* OK [ALERT] " + info_alert(p), "a " + imap.NO_STORE)
        assert_took(start, 2)
        line = one_log_line(p, "127.0.0.2:%d: the store's part of the login" % slow_imap.port)
        assert line.endswith("login failed user='alice': store unavailable: 127.0.0.2:%d: the store's part of the "
                             "login (connect, greeting, login) took more than 2 s" % slow_imap.port), line

        r = RawClient(p.host, p.pop_port)
        r.readline()
        r.send(b"USER alice\r\n")
        r.expect_lines("+OK")
        start = time.monotonic()
        r.send(b"PASS alice-pw\r\n")
        r.expect_lines(pop.ERR_STORE)
        assert_took(start, 2)
        one_log_line(p, "127.0.0.2:%d: the store's part of the login (connect, greeting, login) took more than 2 s"
                     % slow_pop.port)


def info_alert(p):
    return p.settings["imap"].get("ServerDownAlert") or "Your IMAP server appears to be temporarily out of service."


# ---------------------------------------------------------------------- SMTP
@pytest.fixture(scope="module")
def smtp_proxy(mail_stack):
    info = mail_stack.info()
    with Proxy(info, imap=False, smtp={"SmtpRelays": "%s:%d" % (info["smtp"]["host"], info["smtp"]["port"]),
                                       "SmtpProxyPassword": "x", "Timeout": 3, "SmtpMessageTimeout": 2,
                                       **LOGIN_LIMITS}) as p:
        yield p


def test_smtp_before_ehlo_each_command_and_the_message_have_deadlines(smtp_proxy):
    p = smtp_proxy
    r = RawClient(p.host, p.smtp_port)                    # before EHLO: LoginTimeout
    r.expect(b"220 ")
    start = time.monotonic()
    trickle(r.sock, b"EHLO client.example.net\r\n", 0.3)
    assert lines_until_close(r) == [smtp.TIMEOUT]
    assert_took(start, 2)
    one_log_line(p, "deadline passed in state greeting: the dialogue before EHLO took more than 2 s")

    r = RawClient(p.host, p.smtp_port)                    # a command: Timeout from its first octet
    r.expect(b"220 ")
    r.send(b"EHLO client.example.net\r\n")
    r.skip_to(b"250 ")
    start = time.monotonic()
    trickle(r.sock, b"MAIL FROM:<someone@example.net>\r\n", 0.3)
    assert lines_until_close(r) == [smtp.TIMEOUT]
    assert_took(start, 3)
    one_log_line(p, "deadline passed in state relaying: an SMTP command took more than 3 s")

    r = RawClient(p.host, p.smtp_port)                    # the message text: SmtpMessageTimeout
    r.expect(b"220 ")
    r.send(b"EHLO client.example.net\r\n")
    r.skip_to(b"250 ")
    r.send(b"MAIL FROM:<someone@example.net>\r\n")
    r.expect(b"250 ")
    r.send(b"RCPT TO:<bob@example.com>\r\n")
    r.expect(b"250 ")
    r.send(b"DATA\r\n")
    r.expect(b"354 ")
    start = time.monotonic()
    trickle(r.sock, b"Subject: slow\r\n\r\n" + b"hello\r\n" * 10 + b".\r\n", 0.2)
    assert lines_until_close(r) == [smtp.TIMEOUT]
    assert_took(start, 2)
    one_log_line(p, "deadline passed in state data: the message text took more than 2 s")


def test_a_relay_that_trickles_its_reply_has_a_deadline(mail_stack):
    """Each of the relay's replies must come whole in time (its greeting within FailoverTimeout)."""
    info = mail_stack.info()
    with DelayProxy(info["smtp"]["host"], info["smtp"]["port"], trickle=0.3) as slow, \
            Proxy(info, imap=False, smtp={"SmtpRelays": "127.0.0.1:%d" % slow.port, "SmtpProxyPassword": "x",
                                          "FailoverTimeout": 2}) as p:
        r = RawClient(p.host, p.smtp_port)
        start = time.monotonic()
        assert lines_until_close(r) == [smtp.RELAY_DOWN]
        assert_took(start, 2)
        one_log_line(p, "127.0.0.1:%d: the relay's reply took more than 2 s" % slow.port)


def test_a_tls_record_trickled_after_the_handshake_cannot_outlast_the_deadline(mail_stack, certs):
    """The ssl module's timeouts count per wait: a record sent a byte at a time would keep one
    receive going for ever.  The deadline bounds the receive as a whole."""
    settings = dict(LOGIN_LIMITS, LoginIdleTimeout=5)     # the deadline (2 s) comes first
    with Proxy(mail_stack.info(), tls=certs, imap=settings) as p:
        start = time.monotonic()                          # LoginTimeout counts from the connect
        r = RawClient(p.host, p.imaps_port)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing)
        while True:                                       # the handshake, over the raw socket
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                r.sock.sendall(outgoing.read())
                incoming.write(r.sock.recv(65536))
        r.sock.sendall(outgoing.read())
        received = b""

        def read_until_close():
            nonlocal received
            r.sock.settimeout(10)
            while True:
                try:
                    data = r.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return
                incoming.write(data)
                try:
                    while True:
                        received += tls.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    pass
        tls.write(b"a NOOP\r\n")
        record = outgoing.read()                          # one TLS record, sent a byte every 0.3 s
        trickle(r.sock, record, 0.3)
        read_until_close()
        assert received.split(b"\r\n")[1:] == [imap.BYE_DEADLINE.encode(), b""], received
        assert_took(start, 2)
