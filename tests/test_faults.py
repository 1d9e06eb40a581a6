"""Fault kinds found by trying the proxy as hostile and unusual clients would, each against the real
stack (slapd, Dovecot, Postfix), asserting the exact lines a client sees.

1 bytes that are not UTF-8 in login ids, and passwords that are octets; 2 over-long lines inside SASL
exchanges; 3 over-long commands (see also test_imap); 4 tagged completions whenever the tag parses;
6 long but legal commands; 7 a finished session frees its connection at once; 9 the goodbye of every
close the proxy decides, and a store's refusal labelled right; 10 unforeseen exceptions.  Faults 5
and 8 (SMTP after a refused message, DSN/SMTPUTF8/CHUNKING) are in test_smtp.
"""
import base64
import imaplib
import os
import time

import gevent
import pytest

from mmproxy import __version__, imap, pop
from mmproxy.testing.proxy import Proxy

from helpers import ImapFrom, PopFrom, RawClient, proxy_log, tcp_pair, until_close, wait_for_log

LATIN_PW = b"p\xe4sswort"          # the ISO-8859-1 password of the fixture's user "latin"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def proxy(mail_stack):
    """IMAP and POP with PreAuth (the harness default), CRAMs for the SASL tests."""
    with Proxy(mail_stack.info(), imap={"CRAMs": True}, pop={"CRAMs": True}) as p:
        yield p


@pytest.fixture(scope="module")
def proxy_nopreauth(mail_stack):
    with Proxy(mail_stack.info(), imap={"PreAuth": False}, pop={"PreAuth": False}) as p:
        yield p


def greeted(p, kind="imap", source="127.0.0.1"):
    r = RawClient(p.host, p.imap_port if kind == "imap" else p.pop_port, source)
    r.expect(b"* OK" if kind == "imap" else b"+OK")
    return r


def no_tracebacks(p):
    text = proxy_log(p)
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:4000]
    return text


# ---------------------------------------------------------------------- 1: non-UTF-8 ids, octet passwords
@pytest.mark.parametrize("preauth", [True, False], ids=["preauth", "no-preauth"])
def test_latin1_password_logs_in_through_the_proxy(preauth, proxy, proxy_nopreauth):
    """The account logs in directly on Dovecot and by ldapwhoami (test_realparts): through mmproxy too,
    by IMAP literal, AUTHENTICATE PLAIN and POP PASS; its UTF-8 spelling is a wrong password."""
    p = proxy if preauth else proxy_nopreauth
    r = greeted(p)
    r.send(b"a LOGIN latin {%d+}\r\n%s\r\nb EXAMINE INBOX\r\n" % (len(LATIN_PW), LATIN_PW))
    r.expect(b"a OK [CAPABILITY ")
    assert r.skip_to(b"b ").startswith(b"b OK")
    r = greeted(p)
    r.send(b"a AUTHENTICATE PLAIN " + base64.b64encode(b"\0latin\0" + LATIN_PW) + b"\r\n")
    r.expect(b"a OK [CAPABILITY ")
    r = greeted(p, "pop")
    r.send(b"USER latin\r\nPASS " + LATIN_PW + b"\r\nSTAT\r\n")
    r.expect_lines("+OK")
    r.expect(b"+OK")
    r.expect(b"+OK 1 ")
    r = greeted(p)
    utf8 = "pässwort".encode()
    r.send(b"a LOGIN latin {%d+}\r\n%s\r\n" % (len(utf8), utf8))
    r.expect_lines("a " + imap.NO_AUTH)
    text = no_tracebacks(p)
    for spelling in ("p\\xe4sswort", "pässwort", "p?sswort", "cMOkc3N3b3J0"):
        assert spelling not in text


def test_login_ids_that_are_not_utf8_fail_as_logins_with_the_cause_logged(proxy):
    r = greeted(proxy)
    r.send(b'a1 LOGIN "alice@example.com\xc3(" pw\r\n')
    r.expect_lines("a1 " + imap.NO_AUTH)
    r.send(b"a2 AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\xff\0pw") + b"\r\na3 NOOP\r\n")
    r.expect_lines("a2 " + imap.NO_AUTH, "a3 OK NOOP completed")
    r.send(b"a4 LOGIN {6}\r\n")
    r.expect_lines("+ Ready for literal data")
    r.send(b"bob\xc3\x28x pw\r\n")
    r.expect_lines("a4 " + imap.NO_AUTH, imap.BYE_AUTH_FAILURES)     # the third failed login
    r.expect_close()
    r = greeted(proxy, "pop")
    r.send(b"USER alice@example.com\xc3(\r\nPASS pw\r\nQUIT\r\n")
    r.expect_lines("+OK", pop.ERR_AUTH, "+OK Bye")
    text = wait_for_log(proxy, "login id b'bob\\xc3(x' is not UTF-8")
    assert "login failed user='' : " not in text
    no_tracebacks(proxy)


def test_a_dc_tree_node_that_is_no_mail_domain_is_unknown(proxy, mail_stack):
    """carol@example.org's password with carol@org: dc=org exists, but is no hosted domain."""
    r = greeted(proxy)
    r.send(b'a LOGIN carol@org "carol pw"\r\nb LOGIN carol@example.org "carol pw"\r\n')
    r.expect_lines("a " + imap.NO_AUTH)
    r.expect(b"b OK [CAPABILITY ")
    wait_for_log(proxy, "unknown domain 'org'")


def test_a_line_break_in_a_password_is_refused_and_logged_as_such(proxy):
    r = greeted(proxy)
    r.send(b"a LOGIN alice {10+}\r\npass\r\nword\r\nb NOOP\r\n")
    r.expect_lines("a " + imap.NO_AUTH, "b OK NOOP completed")
    wait_for_log(proxy, "password of 'alice' holds a NUL, CR or LF")


# ---------------------------------------------------------------------- 2: over-long SASL lines
def test_overlong_sasl_responses_get_a_reply(proxy):
    r = greeted(proxy)
    r.send(b"a1 AUTHENTICATE PLAIN\r\n")
    r.expect_lines("+ ")
    r.send(base64.b64encode(b"x" * 6900) + b"\r\n")            # 9 KB of base64, within the limit
    r.expect_lines("a1 BAD Malformed SASL PLAIN message")
    r.send(b"a2 AUTHENTICATE PLAIN\r\n")
    r.expect_lines("+ ")
    r.send(b"A" * 20000 + b"\r\n")
    r.expect_lines("a2 BAD [TOOBIG] line of more than 12288 octets", imap.BYE_TOO_BIG)
    r.expect_close()
    for mech in (b"PLAIN", b"CRAM-MD5", b"LOGIN"):
        r = greeted(proxy, "pop")
        r.send(b"AUTH " + mech + b"\r\n")
        r.expect(b"+ ")
        r.send(b"A" * 20000 + b"\r\n")
        r.expect_lines(pop.ERR_TOO_LONG)
        r.expect_close()
    r = greeted(proxy)
    r.send(b"c AUTHENTICATE CRAM-MD5\r\n")
    r.expect(b"+ ")
    r.send(b"A" * 20000 + b"\r\n")
    r.expect_lines("c BAD [TOOBIG] line of more than 12288 octets", imap.BYE_TOO_BIG)
    no_tracebacks(proxy)


# ---------------------------------------------------------------------- 4: tagged completions
@pytest.mark.parametrize("command,reply", [
    (b'a1 LOGIN alice "pa\\ss"', "a1 BAD Only \\\\ and \\\" may be escaped in a quoted string"),
    (b'a2 LOGIN alice "unterminated', "a2 BAD Missing '\"'"),
    (b'a3 LOGIN alice "trailing\\', "a3 BAD Missing '\"'"),
    (b'a4 ID ("name" "Client\\Build")', "a4 BAD Only \\\\ and \\\" may be escaped in a quoted string"),
    (b'a5 ID ("name" "x"', "a5 BAD Missing ')'"),
    (b"a6 LOGIN alice", "a6 BAD Syntax: LOGIN user password"),
    (b"a7", "a7 BAD Missing command"),
    (b"a8 FROB {5+}\r\nhello", "a8 BAD Unknown command"),
    (b'"a9 NOOP', imap.BAD_UNTAGGED),
])
def test_a_command_whose_tag_parses_gets_a_tagged_completion(proxy, command, reply):
    r = greeted(proxy)
    r.send(command + b"\r\nz NOOP\r\n")
    r.expect_lines(reply, "z OK NOOP completed")


@pytest.mark.parametrize("size", [b"00000000012", b"0" * 5000 + b"12"])
def test_literal_sizes_with_many_digits_are_literals(proxy, size):
    """RFC 9051's number is 1*DIGIT: leading zeros make no command of the literal's content."""
    r = greeted(proxy)
    r.send(b"a1 FROB {" + size + b"+}\r\na2 LOGOUT\r\n\r\na3 NOOP\r\n")
    r.expect_lines("a1 BAD " + imap.BAD_UNKNOWN, "a3 OK NOOP completed")
    r.send(b"b1 LOGIN alice {" + size[:-2] + b"08+}\r\nalice-pw\r\n")
    r.expect(b"b1 OK [CAPABILITY ")
    r = greeted(proxy)
    r.send(b"c1 LOGIN {" + b"9" * 5000 + b"}\r\nc2 NOOP\r\n")      # a size no int() should be asked for
    r.expect_lines("c1 BAD [TOOBIG] Literal too big", "c2 OK NOOP completed")


def test_the_same_after_literals(proxy):
    r = greeted(proxy)
    r.send(b"a1 LOGIN {5}\r\n")
    r.expect_lines("+ Ready for literal data")
    r.send(b'alice "pa\\ss"\r\n')
    r.expect_lines('a1 BAD Only \\\\ and \\" may be escaped in a quoted string')
    # a syntax error before a non-synchronizing literal: the literal is skipped, never run
    r.send(b'a2 LOGIN "x\\y" {11+}\r\nz2 LOGOUT\r\n more\r\na3 NOOP\r\n')
    r.expect_lines('a2 BAD Only \\\\ and \\" may be escaped in a quoted string', "a3 OK NOOP completed")
    # ... and before a synchronizing one: no "+", so the client sends nothing more of it
    r.send(b'a4 LOGIN "x\\y" {5}\r\na5 NOOP\r\n')
    r.expect_lines('a4 BAD Only \\\\ and \\" may be escaped in a quoted string', "a5 OK NOOP completed")


def test_imaplib_gets_its_answer_at_once(proxy):
    """What timed out through the proxy before: a real client sees the tagged BAD."""
    c = ImapFrom(proxy.host, proxy.imap_port, timeout=5)
    t = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match="escaped"):
        c._simple_command("LOGIN", "alice", '"pa\\ss"')
    assert time.monotonic() - t < 2
    assert c.noop()[0] == "OK"


# ---------------------------------------------------------------------- 6: long but legal commands
def test_the_largest_rfc2971_id_fits_and_larger_commands_are_toobig(proxy):
    pairs = b" ".join(b'"field-%02d-%s" "%s"' % (i, b"f" * 20, b"v" * 1024) for i in range(30))
    assert len(pairs) > 31000                # about 32 KB on one line
    r = greeted(proxy)
    r.send(b"a ID (" + pairs + b")\r\nb NOOP\r\n")
    r.expect_lines('* ID ("name" "mmproxy" "version" "%s")' % __version__, "a OK ID completed",
                   "b OK NOOP completed")
    r.send(b'c ID ("name" "' + b"v" * (imap.MAX_STRING + 1) + b'")\r\n')
    r.expect_lines("c BAD [TOOBIG] String too long", imap.BYE_TOO_BIG)
    r.expect_close()
    r = greeted(proxy)
    r.send(b"d ID (" + b'"a" ' * (imap.MAX_ARGS + 1) + b")\r\n")
    r.expect_lines("d BAD [TOOBIG] Too many arguments", imap.BYE_TOO_BIG)
    r.expect_close()


# ---------------------------------------------------------------------- 7: a finished session frees its slot
def test_logout_closes_at_once_and_frees_the_connection_slot(mail_stack):
    info = mail_stack.info()
    with Proxy(info, imap={"ConnLimits": "127.0.0.71|255.255.255.255:1"},
               pop={"ConnLimits": "127.0.0.72|255.255.255.255:1"}) as p:
        for _ in range(3):
            c = ImapFrom(p.host, p.imap_port, "127.0.0.71")
            c.login("alice", info["users"]["alice"]["password"])
            t = time.monotonic()
            c.send(b"z LOGOUT\r\n")
            data = until_close(c.sock)             # the store's goodbye, then EOF: no half-open minute
            assert data.startswith(b"* BYE") and b"z OK" in data
            assert time.monotonic() - t < 1.0
            c.sock.close()
        for _ in range(3):
            c = PopFrom(p.host, p.pop_port, "127.0.0.72")
            c.user("bob")
            c.pass_(info["users"]["bob"]["password"])
            assert c.quit().startswith(b"+OK")
        deadline = time.monotonic() + 3         # every session ended, none waits for a grace period
        while proxy_log(p).count("(state relaying") < 6:
            assert time.monotonic() < deadline, proxy_log(p)[-3000:]
            time.sleep(0.05)


# ---------------------------------------------------------------------- 9: goodbyes; store refusals
def test_idle_closes_say_goodbye_before_and_after_login(mail_stack):
    info = mail_stack.info()
    with Proxy(info, imap={"Timeout": 2}, pop={"Timeout": 2}) as p:
        r = greeted(p)
        t = time.monotonic()
        r.expect_lines(imap.BYE_IDLE)
        r.expect_close()
        assert 1.5 < time.monotonic() - t < 4
        r = greeted(p, "pop")
        r.expect_lines(pop.ERR_IDLE)
        r.expect_close()
        r = greeted(p)
        r.send(b"a LOGIN alice alice-pw\r\n")
        r.expect(b"a OK [CAPABILITY ")
        t = time.monotonic()
        r.expect_lines(imap.BYE_IDLE)          # Timeout ends the pumped session: the proxy says so
        r.expect_close()
        assert time.monotonic() - t < 9        # Timeout, plus the sweep of idle sessions every 5 s
        r = greeted(p, "pop")
        r.send(b"USER alice\r\nPASS alice-pw\r\n")
        r.expect_lines("+OK")
        r.expect(b"+OK")
        r.expect_lines(pop.ERR_IDLE)
        r.expect_close()


def test_a_store_refusing_a_verified_password_is_no_failed_login(mail_stack):
    """PreAuth verified the password; the store refuses anyway (here: it has another password for the
    user).  Its own words pass through unchanged, and no number of them ends the session."""
    info = mail_stack.info()
    people = info["domains"]["example.com"]["people_dn"]
    mail_stack.slapd.add("dn: uid=mia,%s\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n"
                         "objectClass: inetOrgPerson\nobjectClass: inetUser\nobjectClass: mailUser\nuid: mia\ncn: Mia\n"
                         "sn: Mia\nmailHost: 127.0.0.2\nuserPassword: ldap-pw\n" % people)
    mail_stack.stores["127.0.0.2"].add_user("mia", "store-pw")
    with Proxy(info, pop={}) as p:
        r = greeted(p)
        for i in range(4):
            r.send(b"a%d LOGIN mia ldap-pw\r\n" % i)
            r.expect_lines("a%d NO [AUTHENTICATIONFAILED] Authentication failed." % i)
        r.send(b"b LOGIN mia wrong\r\n")
        r.expect_lines("b " + imap.NO_AUTH)            # a wrong password still counts
        r = greeted(p, "pop")
        for _ in range(4):
            r.send(b"USER mia\r\nPASS ldap-pw\r\n")
            r.expect_lines("+OK", "-ERR [AUTH] Authentication failed.")


@pytest.mark.parametrize("reply,verified,told,counted", [
    (b"-ERR Mailbox is locked", True, b"-ERR Mailbox is locked", False),
    (b"-ERR Mailbox is locked", False, b"-ERR [AUTH] Mailbox is locked", True),
    (b"-ERR [IN-USE] Mailbox is locked", False, b"-ERR [IN-USE] Mailbox is locked", False),
    (b"-ERR [SYS/TEMP] Try later", False, b"-ERR [SYS/TEMP] Try later", False),
    (b"-ERR [AUTH] Authentication failed.", False, b"-ERR [AUTH] Authentication failed.", True),
    (b"-ERR [AUTH] Authentication failed.", True, b"-ERR [AUTH] Authentication failed.", False),
])
def test_pop_store_refusals_are_labelled_by_what_they_say(reply, verified, told, counted):
    e = pop.store_refusal(reply, verified)
    assert (e.reply, e.bad_credentials) == (told, counted)


@pytest.mark.parametrize("reply,verified,counted", [
    (b"a NO [AUTHENTICATIONFAILED] x", False, True), (b"a NO Login failed", False, True),
    (b"a NO [UNAVAILABLE] x", False, False), (b"a NO [INUSE] x", False, False),
    (b"a NO [AUTHENTICATIONFAILED] x", True, False),
])
def test_imap_store_refusals_pass_unchanged(reply, verified, counted):
    e = imap.store_refusal(reply, verified)
    assert (e.reply, e.bad_credentials) == (reply, counted)


# ---------------------------------------------------------------------- logs
def test_every_session_leaves_one_end_line(mail_stack):
    info = mail_stack.info()
    with Proxy(info, pop={}, aservice={"LogLevel": 2}, imap={"LogLevel": 2}) as p:
        r = greeted(p)
        r.send(b"a NOOP\r\nb LOGOUT\r\n")
        r.expect_lines("a OK NOOP completed", imap.BYE_LOGOUT, "b OK Logout completed")
        r.expect_close()
        r = greeted(p, "pop")
        r.send(b"QUIT\r\n")
        r.expect_lines("+OK Bye")
        r = greeted(p)                           # a wrong password: no store was contacted
        r.send(b"a LOGIN bob wrong\r\nb LOGOUT\r\n")
        r.expect_lines("a " + imap.NO_AUTH, imap.BYE_LOGOUT, "b OK Logout completed")
        select = b"c SELECT INBOX\r\n"
        r = greeted(p)
        login = b"a LOGIN alice alice-pw\r\n"
        r.send(login + select)                   # SELECT pipelined behind LOGIN
        r.expect(b"a OK [CAPABILITY ")
        r.skip_to(b"c OK")
        r.send(b"d LOGOUT\r\n")
        r.skip_to(b"d OK")
        r.expect_close()
        text = wait_for_log(p, "state relaying")
        ends = [line for line in text.splitlines() if "session end:" in line]
        assert any("session end: logout (state not authenticated," in line for line in ends), ends
        assert any("session end: quit (state authorization," in line for line in ends), ends
        assert any("session end: logout (state not authenticated, user bob, " in line for line in ends), ends
        assert not any("user bob, store" in line for line in ends), ends
        relayed = [line for line in ends if "state relaying" in line]
        assert len(relayed) == 1 and "user alice@example.com, store 127.0.0.2:" in relayed[0], relayed
        received = int(relayed[0].split(" in ")[1].split(" B")[0])
        assert received == len(login + select + b"d LOGOUT\r\n"), relayed


def test_unforeseen_exceptions_get_a_reply_and_one_error_line(mail_stack, monkeypatch):
    """In-process, a handler that raises what nobody foresaw: the protocol's temporary failure, a
    close, one ERROR line with the session context, no traceback below LogLevel 5."""
    import logging

    from mmproxy.config import load_config
    from mmproxy.imap import ImapService, ImapSession
    from mmproxy.pop import PopService, PopSession

    info = mail_stack.info()
    p = Proxy(info, pop={}, imap={"LogLevel": 1})
    p.write_config()
    config = load_config(p.config_dir)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mmproxy").addHandler(handler)
    try:
        def boom(self, req):
            raise RuntimeError("nobody foresaw this")
        for cls, service_cls, kind, send, want in (
                (ImapSession, ImapService, "imap", b"a NOOP\r\n",
                 [b"a " + imap.NO_INTERNAL.encode(), imap.BYE_INTERNAL.encode()]),
                (PopSession, PopService, "pop", b"CAPA\r\n", [pop.ERR_INTERNAL.encode()])):
            verb = send.split()[-1].decode()
            monkeypatch.setitem(cls.COMMANDS, verb, cls.COMMANDS[verb].__class__(boom, cls.COMMANDS[verb].states))
            logging.getLogger("mmproxy." + kind).setLevel(logging.INFO)
            service = service_cls(next(e for e in config.services if e.spec.kind == kind))
            a, b = tcp_pair()
            g = gevent.spawn(service.handle, b, ("127.0.0.1", 4242), False)
            a.settimeout(5)
            a.recv(4096)                                            # the greeting
            a.sendall(send)
            assert until_close(a).split(b"\r\n")[:-1] == want
            g.join(5)
            service.close()
    finally:
        logging.getLogger("mmproxy").removeHandler(handler)
        p.stop()
    errors = [r for r in records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "internal error in state not authenticated: RuntimeError: nobody foresaw this",
        "internal error in state authorization: RuntimeError: nobody foresaw this"]
    assert all(r.exc_info is None or r.exc_info is False for r in errors)
    assert errors[0].ctx.startswith("imap 127.0.0.1:4242 #")


def test_session_ids_carry_the_worker(mail_stack):
    with Proxy(mail_stack.info(), aservice={"NumThreads": 2}) as p:
        for _ in range(8):
            r = greeted(p)
            r.send(b"a LOGOUT\r\n")
            r.skip_to(b"a OK")
        text = wait_for_log(p, "session end")
        ids = {line.split("#", 1)[1].split("]", 1)[0] for line in text.splitlines() if "] session end" in line}
        assert ids and all(i.startswith(("w0-", "w1-")) for i in ids), ids


def test_no_tracebacks_anywhere(proxy):
    """Everything above that went through this proxy left no traceback."""
    no_tracebacks(proxy)
    assert os.path.isdir(proxy.log_dir)


def test_closes_the_proxy_decides_are_clean_even_with_unread_input(proxy):
    """A goodbye with more client input unread (the rest of an over-long line, pipelined commands)
    ends in a FIN after the goodbye, not a reset that could cost the client the goodbye."""
    for kind, data, last in ((b"imap", b"a1 NOOP " + b"x" * 200000 + b"\r\n", imap.BYE_TOO_BIG),
                             (b"imap", b"".join(b"n%d FOO\r\n" % i for i in range(3000)), imap.BYE_TOO_MANY),
                             (b"pop", b"USER " + b"a" * 100000 + b"\r\n", pop.ERR_TOO_LONG)):
        r = greeted(proxy, kind.decode())
        r.sock.sendall(data)
        time.sleep(0.5)
        rest = r.buf + until_close(r.sock)      # ConnectionResetError here would be the fault
        assert rest.endswith(last.encode() + b"\r\n"), rest[-200:]


FLOOD = r"""
import socket, sys, threading, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 10, source_address=("127.0.0.81", 0))
s.recv(4096)
end = time.monotonic() + float(sys.argv[4])
def drain():
    s.settimeout(1)
    try:
        while time.monotonic() < end + 1 and s.recv(1 << 20):
            pass
    except OSError:
        pass
threading.Thread(target=drain, daemon=True).start()
chunk = sys.argv[3].encode() * 8000
while time.monotonic() < end:
    s.sendall(chunk)
"""


@pytest.mark.parametrize("kind,command", [("imap", "a NOOP\r\n"), ("pop", "CAPA\r\n")])
def test_a_client_that_floods_valid_commands_does_not_stall_the_others(proxy, kind, command):
    """Valid commands as fast as one client can send them, read as fast: the other sessions of the
    worker (here one before login and one logged in) keep answering at once."""
    import subprocess
    import sys
    before = greeted(proxy)
    logged_in = greeted(proxy)
    logged_in.send(b"a LOGIN alice alice-pw\r\n")
    logged_in.expect(b"a OK [CAPABILITY ")
    port = proxy.imap_port if kind == "imap" else proxy.pop_port
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, proxy.host, str(port), command, "3"])
    try:
        time.sleep(0.5)
        worst = 0.0
        for i in range(20):
            for r in (before, logged_in):
                t = time.monotonic()
                r.send(b"v%d NOOP\r\n" % i)
                assert r.skip_to(b"v%d " % i).startswith(b"v%d OK" % i)
                worst = max(worst, time.monotonic() - t)
            time.sleep(0.05)
        assert worst < 0.5, "a session waited %.2fs while another client flooded the worker" % worst
    finally:
        flood.wait(10)


def test_credentials_in_lines_that_are_no_commands_never_reach_the_log(mail_stack):
    """The rest of a refused SASL exchange, or a PASS the proxy cannot read as one, is no command:
    it is answered, and logged (LogLevel 5) without its bytes."""
    info = mail_stack.info()
    b64 = base64.b64encode(b"\0alice\0alice-pw")
    b64pw = base64.b64encode(b"alice-pw")
    with Proxy(info, imap=False, pop={"RestrictPlainPasswords": True},
               smtp={"SmtpRelays": "%s:%d" % (info["smtp"]["host"], info["smtp"]["port"]),
                     "SmtpProxyPassword": "x", "RestrictPlainPasswords": True}) as p:
        for port, data in ((p.smtp_port, b"EHLO x\r\nAUTH LOGIN\r\nYWxpY2U=\r\n" + b64pw + b"\r\n"),
                           (p.smtp_port, b"EHLO x\r\nAUTH\tPLAIN " + b64 + b"\r\n"),
                           (p.smtp_port, b"EHLO x\r\nAUTH PLAIN\t" + b64 + b"\r\n"),
                           (p.smtp_port, b"EHLO x\r\nAUTH PLAIN\x0b" + b64 + b"\r\n"),
                           (p.smtp_port, b"EHLO x\r\nAUTH PLAIN " + b64 + b"\r\r\n"),
                           (p.smtp_port, b"EHLO x\r\nAUTH LOGIN\r\nYWxpY2U\r\n"),
                           (p.pop_port, b"USER alice\r\nPASS\talice-pw\r\n"),
                           (p.pop_port, b"AUTH LOGIN\r\nYWxpY2U=\r\n" + b64pw + b"\r\n")):
            r = RawClient(p.host, port)
            r.readline()
            r.send(data + b"QUIT\r\n")
            r.read_all()
        text = wait_for_log(p, "session end")
        time.sleep(0.5)
        text = proxy_log(p)
        for secret in ("alice-pw", "ALICE-PW", b64.decode(), b64pw.decode(), b64pw.decode().upper(), "YWxpY2U"):
            assert secret not in text, [line for line in text.splitlines() if secret in line]


def test_stopping_says_goodbye_to_every_session(mail_stack):
    info = mail_stack.info()
    with Proxy(info, pop={}) as p:
        before = greeted(p)
        imap_in = greeted(p)
        imap_in.send(b"a LOGIN alice alice-pw\r\n")
        imap_in.expect(b"a OK [CAPABILITY ")
        pop_in = greeted(p, "pop")
        pop_in.send(b"USER bob\r\nPASS " + info["users"]["bob"]["password"].encode() + b"\r\n")
        pop_in.expect_lines("+OK")
        pop_in.expect(b"+OK")
        p.stop()
        before.expect_lines(imap.BYE_SHUTDOWN)
        imap_in.expect_lines(imap.BYE_SHUTDOWN)
        pop_in.expect_lines(pop.ERR_SHUTDOWN)
        for r in (before, imap_in, pop_in):
            r.expect_close()


def test_small_protocol_points(proxy):
    """RFC 2449 4: 255 octets a POP command line, CR LF included; RFC 3501 9: NIL in any case;
    RFC 9051: a tag has no length limit of its own."""
    r = greeted(proxy, "pop")
    r.send(b"USER " + b"a" * 248 + b"\r\n")                 # 255 octets in all
    r.expect_lines("+OK")
    r.send(b"USER " + b"a" * 249 + b"\r\n")                 # 256
    r.expect_lines(pop.ERR_TOO_LONG)
    r.expect_close()
    r = greeted(proxy)
    tag = b"t" * 5000
    r.send(b"a ID nil\r\n" + tag + b' NOOP\r\nb LOGIN alice "pw\rx"\r\n')
    r.expect_lines('* ID ("name" "mmproxy" "version" "%s")' % __version__, "a OK ID completed",
                   tag + b" OK NOOP completed", "b BAD Invalid characters in quoted string")


def test_a_spoofed_maildrop_answers_no_such_message_without_counting_it(mail_stack):
    from helpers import unused_port
    with Proxy(mail_stack.info(), imap=False, pop={"BacksidePort": unused_port("127.0.0.2", "127.0.0.3"),
                                                   "SpoofEmptyMailbox": "on"}) as p:
        r = greeted(p, "pop")
        r.send(b"USER alice\r\nPASS alice-pw\r\n")
        r.expect_lines("+OK", "+OK Maildrop ready")
        r.send(b"".join(b"RETR 1\r\nLIST 2\r\n" for _ in range(8)) + b"STAT\r\nQUIT\r\n")
        r.expect_lines(*["-ERR " + pop.NO_SUCH_MESSAGE] * 16, "+OK 0 0", "+OK Bye")


def test_a_stop_during_a_lingering_close_keeps_the_end_line(mail_stack):
    with Proxy(mail_stack.info(), imap={"LogLevel": 2}) as p:
        r = greeted(p)
        r.send(b"a LOGOUT\r\n" + b"J" * (1 << 20))        # more than is ever read: the close lingers
        r.expect_lines(imap.BYE_LOGOUT, "a OK Logout completed")
        time.sleep(0.3)
        p.proc.terminate()                                 # SIGTERM while the close lingers
        assert p.proc.wait(10) == 0
        assert "session end: logout (state not authenticated" in proxy_log(p)


def test_a_user_without_a_store_is_told_so_only_with_the_right_password(proxy):
    """PreAuth first: before the password is checked, "store unavailable" would tell who exists."""
    r = greeted(proxy)
    r.send(b"a LOGIN frank definitely-wrong\r\nb LOGIN frank frank-pw\r\n")
    r.expect_lines("a " + imap.NO_AUTH, "* OK [ALERT] Your IMAP server appears to be temporarily out of service.",
                   "b " + imap.NO_STORE)
    r = greeted(proxy, "pop")
    r.send(b"USER frank\r\nPASS definitely-wrong\r\nUSER frank\r\nPASS frank-pw\r\n")
    r.expect_lines("+OK", pop.ERR_AUTH, "+OK", pop.ERR_STORE)


def test_untagged_lines_of_the_stores_greeting_never_reach_the_client(mail_stack):
    """A store that greets twice (Dovecot's "Waiting for authentication process" before its real
    greeting): only what answers the LOGIN ([ALERT]) reaches the client.  The store here is a
    scripted peer on 127.0.0.2, to have the order every time."""
    from gevent import socket as gsocket

    lst = gsocket.socket()
    lst.bind(("127.0.0.2", 0))
    lst.listen(4)
    port = lst.getsockname()[1]

    def store():
        for literal in (False, True):
            conn, _ = lst.accept()
            conn.sendall(b"* OK Waiting for authentication process to respond..\r\n"
                         b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Store ready.\r\n")
            data = b""
            while b"X1 LOGIN" not in data:
                data += conn.recv(4096)
            if literal:                                  # the 8-bit password goes as a literal
                conn.sendall(b'* ID ("name" "store")\r\nX0 OK ID completed\r\n+ OK\r\n')
                while not data.endswith(b"\r\n") or data.count(b"\r\n") < 3:
                    data += conn.recv(4096)
            else:
                conn.sendall(b'* ID ("name" "store")\r\nX0 OK ID completed\r\n')
            conn.sendall(b"* OK [ALERT] Quota nearly full\r\nX1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
            conn.recv(4096)
            conn.close()

    g = gevent.spawn(store)
    try:
        with Proxy(mail_stack.info(), imap={"BacksidePort": port}) as p:
            for login in (b"a LOGIN alice alice-pw\r\n", b"a LOGIN latin {8+}\r\n" + LATIN_PW + b"\r\n"):
                r = greeted(p)
                r.send(login)
                r.expect_lines("* OK [ALERT] Quota nearly full", "a OK [CAPABILITY IMAP4rev1 IDLE] Logged in")
                r.sock.close()
        g.get(timeout=10)
    finally:
        g.kill()
        lst.close()
