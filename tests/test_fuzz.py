"""Fuzzing one running proxy (IMAP, POP, SMTP, against the real slapd, Dovecot and Postfix) with
generated hostile input: malformed commands, IMAP literals ({n}, {n+}, wrong counts, huge sizes),
base64 blobs in SASL exchanges (with and without initial responses, cancels), binary garbage (NUL,
8-bit, lone CR or LF), over-long lines, trickled bytes, pauses, and three ways to end: the
protocol's logout, a half-close (shutdown(SHUT_WR), often mid-command) and a reset.

After every example, and again at the end of each test:
- the proxy process is the one started for the module, and still accepts;
- a canary (a logged-in IMAP session, and fresh IMAP, POP and SMTP sessions) gets its exact answers
  within CANARY_LIMIT seconds, all along;
- every line the fuzzing client got is well-formed for the protocol and ends in CR LF; a session
  the client ends with its logout command, or that the proxy ends, ends with a goodbye (the logout
  answer, ``* BYE``, ``-ERR ... closing``, ``421``/``221``), never silence; a half-closed one is
  closed by the proxy within seconds;
- no traceback and no "internal error" in the proxy's log files or its output.
test_memory_per_session_is_bounded compares the proxy's RSS with N idle sessions and with N sessions
holding partial or oversized input.

The examples are derandomized (the same inputs every run): a failure reproduces; hypothesis prints
the smallest input, which then becomes an exact regression test (test_faults.py style, at the end).
"""
import base64
import itertools
import os
import re
import shutil
import socket
import time

import gevent
import gevent.event
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmproxy import imap, pop, smtp
from mmproxy.testing import DovecotStore, Postfix, free_port
from mmproxy.testing.base import make_tempdir
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import RawClient, proxy_log

pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.1"
CANARY_LIMIT = 5.0          # seconds a canary answer may take (2 shared cores, other agents' load)
TRICKLE = 64               # octets sent one at a time, at most, in a trickled piece
CLOSE_LIMIT = 10.0          # seconds the proxy may take to close a session the client ended or half-closed
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
_sources = itertools.count(1)


def fresh_source():
    """A loopback address of its own for each fuzzing client (ConnLimits and per-address state stay apart)."""
    n = next(_sources)
    return "127.1.%d.%d" % (n // 250 % 250, n % 250 + 1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def sasl_relay():
    """A Postfix relay with SASL (a Dovecot auth service behind it, no failure delay), so that AUTH
    exchanges really run through the proxy: 334 challenges, responses, cancels."""
    d = make_tempdir("mmproxy-fuzz-sasl-")
    sock = os.path.join(d, "auth-postfix")
    ip = "127.0.0.7"
    store = DovecotStore(ip, free_port(ip), free_port(ip), {"sasluser": "sasl-pw"},
                         extra_conf="service auth {\n  unix_listener %s {\n    mode = 0666\n  }\n}\n" % sock)
    store.start()
    pf = None
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline, "Dovecot made no auth socket"
            time.sleep(0.05)
        pf = Postfix(mynetworks="127.0.0.1/32", xclient_hosts="127.0.0.1/32", relay_domains=("example.com",),
                     main_cf={"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot", "smtpd_sasl_path": sock})
        pf.start()
        yield pf
    finally:
        if pf is not None:
            pf.close()
        store.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy(mail_stack, certs, sasl_relay):
    """One proxy for the module: IMAP, POP (CRAMs on: APOP and CRAM-MD5 reachable) and SMTP in front
    of a Postfix with SASL, with STARTTLS and implicit-TLS ports."""
    relay = "%s:%d" % (sasl_relay.host, sasl_relay.port)
    with Proxy(mail_stack.info(), tls=certs, imap={"CRAMs": True}, pop={"CRAMs": True},
               smtp={"SmtpRelays": relay, "SmtpProxyPassword": "legacy-secret", "FailoverTimeout": 5}) as p:
        p.first_pid = p.proc.pid
        yield p


# ---------------------------------------------------------------------- what the client sees
IMAP_LINE = re.compile(rb"(\* (OK|NO|BAD|BYE|CAPABILITY|ID)( .*)?|\+( .*)?|[\x21-\x7e]+ (OK|NO|BAD)( .*)?)")
IMAP_TAG_SPECIALS = re.compile(rb'[(){%*"\\+]')
POP_LINE = re.compile(rb"(\+OK( .*)?|-ERR( .*)?|\+ [A-Za-z0-9+/=]*)")
POP_BODY = {b".", b"USER", b"STLS", b"PLAIN", b"LOGIN", b"CRAM-MD5", b"IMPLEMENTATION mmproxy",
            b"SASL PLAIN LOGIN CRAM-MD5", *(c.encode() for c in pop.CAPABILITIES)}
SMTP_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)")
TLS_GO = {"imap": re.compile(rb"[\x21-\x7e]+ OK Begin TLS negotiation now"),
          "pop": re.compile(rb"\+OK Begin TLS negotiation"), "smtp": re.compile(re.escape(smtp.TLS_GO.encode()))}
IMAP_GOODBYE = re.compile(rb"\* BYE .*|[\x21-\x7e]+ OK Logout completed")
POP_GOODBYE = re.compile(rb"\+OK Bye|%s" % b"|".join(re.escape(g.encode()) for g in (
    pop.ERR_TOO_LONG, pop.ERR_TOO_MANY, pop.ERR_AUTH_FAILURES)))
SMTP_GOODBYE = re.compile(rb"221 .*|421 .*")
GOODBYE = {"imap": IMAP_GOODBYE, "pop": POP_GOODBYE, "smtp": SMTP_GOODBYE}


def reply_lines(kind, data):
    """The lines of ``data`` (each must end in CR LF, no CR, LF or NUL inside), checked against the
    protocol's syntax; the lines up to a TLS go-ahead (after it the bytes are TLS)."""
    lines = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        assert end >= 0, "a reply that does not end in CR LF: %r" % data[pos:pos + 300]
        line = data[pos:end]
        pos = end + 2
        assert b"\n" not in line and b"\r" not in line and b"\0" not in line, "bad octets in %r" % line[:300]
        lines.append(line)
        if TLS_GO[kind].fullmatch(line):
            break
    if kind == "imap":
        for line in lines:
            assert IMAP_LINE.fullmatch(line), "not an IMAP response line: %r" % line[:300]
            tag = line.split(b" ", 1)[0]
            assert tag in (b"*", b"+") or not IMAP_TAG_SPECIALS.search(tag), "bad tag in %r" % line[:300]
    elif kind == "pop":
        for line in lines:
            assert POP_LINE.fullmatch(line) or line in POP_BODY, "not a POP3 response line: %r" % line[:300]
    else:
        code = None
        for line in lines:
            m = SMTP_LINE.fullmatch(line)
            assert m, "not an SMTP reply line: %r" % line[:300]
            assert code is None or m.group(1) == code, "a multi-line reply changes its code: %r" % line[:300]
            code = m.group(1) if m.group(2) == b"-" else None
        assert code is None, "a multi-line reply that never ends: %r" % lines[-1]
    return lines


class Conversation:
    """One fuzzing client: a reader greenlet collects everything until the proxy closes, while the
    test sends; sending stops when the proxy has closed."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), 5, source_address=(fresh_source(), 0))
        self.sock.settimeout(30)
        self.data = bytearray()
        self.reset = False
        self.reader = gevent.spawn(self._read)

    def _read(self):
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                self.data += chunk
        except ConnectionResetError:
            self.reset = True
        except OSError:
            pass

    @property
    def over(self):
        return self.reader.dead

    def send(self, data, trickle=False):
        if self.over:
            return
        try:
            if trickle:                # octet by octet: the first TRICKLE of them, then the rest at once
                for i in range(min(len(data), TRICKLE)):
                    self.sock.sendall(data[i:i + 1])
                    gevent.sleep(0.002)
                data = data[TRICKLE:]
            if data:
                for i in range(0, len(data), 65536):   # a big payload stops soon after the proxy closed
                    if self.over:
                        return
                    self.sock.sendall(data[i:i + 65536])
        except OSError:            # the proxy closed (and lingered away what came after): the reader has it
            pass

    def wait_close(self, timeout=CLOSE_LIMIT):
        self.reader.join(timeout)
        return self.over

    def close(self):
        self.reader.kill()
        self.sock.close()


def half_close(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:               # the proxy has closed already
        pass


def converse(p, kind, steps, ending, sentinel):
    """Play ``steps`` ((bytes, trickle?) or a float: a pause) at ``kind``'s port, end as ``ending``
    says (``logout``: ``sentinel``, the resync and the logout command; ``half-close``; ``reset``)
    and check what came back."""
    c = Conversation(p.ports[kind])
    try:
        for step in steps:
            if isinstance(step, float):
                gevent.sleep(step)
            else:
                c.send(*step)
        if ending == "reset":
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            return
        if ending == "logout":
            c.send(sentinel)
        else:
            half_close(c.sock)
        closed = c.wait_close()
        data = bytes(c.data)
        assert closed, "the proxy neither said goodbye nor closed within %ss after %s; got %r" % (
            CLOSE_LIMIT, ending, data[-500:])
        assert data, "the proxy closed without a greeting"
        lines = reply_lines(kind, data)
        assert lines, "no complete line: %r" % data[:300]
        if TLS_GO[kind].fullmatch(lines[-1]):
            return                              # the rest was a TLS handshake with whatever followed
        greeting = {"imap": rb"\* OK ", "pop": rb"\+OK ", "smtp": rb"220 "}[kind]
        assert re.match(greeting, lines[0]), "not a greeting: %r" % lines[0][:300]
        if ending == "logout" and not c.reset:
            assert GOODBYE[kind].fullmatch(lines[-1]), "the session ended without a goodbye: %r" % lines[-5:]
    finally:
        c.close()


# ---------------------------------------------------------------------- the properties around each example
class LogWatch:
    """The proxy's log files and output, read from where the last check stopped."""

    def __init__(self, p):
        self.p = p
        self.seen = 0

    def check(self):
        text = proxy_log(self.p)
        new, self.seen = text[self.seen:], len(text)
        for bad in ("Traceback", "internal error"):
            i = new.find(bad)
            assert i < 0, "%r in the proxy's log:\n%s" % (bad, new[max(0, i - 2000):i + 3000])


class Canary:
    """Other sessions that must keep getting their exact answers: one logged-in IMAP session (NOOP at
    the store through the pump), and each round a fresh IMAP, POP and SMTP session before login."""

    def __init__(self, p, user, password):
        self.p = p
        self.user, self.password = user, password
        self.failures = []
        self.rounds = 0
        self.stopping = gevent.event.Event()
        self.greenlet = None
        self.seq = itertools.count(1)

    def start(self):
        self.session = self._login()
        self.greenlet = gevent.spawn(self._loop)
        return self

    def _login(self):
        r = RawClient(HOST, self.p.imap_port, "127.0.0.5", timeout=CANARY_LIMIT)
        r.expect(b"* OK [CAPABILITY ")
        r.send(b'c0 LOGIN %s "%s"\r\n' % (self.user.encode(), self.password.encode()))
        r.expect(b"c0 OK [CAPABILITY ")
        return r

    def one_round(self):
        t = time.monotonic()
        n = next(self.seq)
        r = self.session
        r.send(b"c%d NOOP\r\n" % n)
        line = r.readline()
        assert re.fullmatch(rb"c%d OK NOOP completed( \(.*\))?\.?\r\n" % n, line), "logged-in NOOP: %r" % line
        r = RawClient(HOST, self.p.imap_port, "127.0.0.5", timeout=CANARY_LIMIT)
        r.expect(b"* OK [CAPABILITY ")
        r.send(b"n NOOP\r\nl LOGOUT\r\n")
        r.expect_lines("n OK NOOP completed", imap.BYE_LOGOUT, "l OK Logout completed")
        r.expect_close()
        r = RawClient(HOST, self.p.pop_port, "127.0.0.5", timeout=CANARY_LIMIT)
        r.expect(b"+OK ")
        r.send(b"NOOP\r\nQUIT\r\n")
        r.expect_lines("-ERR " + pop.ERR_NOT_NOW, "+OK Bye")
        r.expect_close()
        r = RawClient(HOST, self.p.smtp_port, "127.0.0.5", timeout=CANARY_LIMIT)
        r.expect(b"220 ")
        r.send(b"NOOP\r\nQUIT\r\n")
        r.expect_lines("250 2.0.0 Ok", smtp.BYE)
        r.expect_close()
        took = time.monotonic() - t
        assert took < CANARY_LIMIT, "a canary round took %.1fs" % took
        self.rounds += 1

    def _loop(self):
        while not self.stopping.wait(0.3):
            try:
                self.one_round()
            except Exception as e:        # noqa: BLE001  # every failure is reported by check()
                self.failures.append("%s: %s" % (type(e).__name__, e))
                return

    def check(self):
        assert not self.failures, "the canary failed: %s" % self.failures

    def stop(self):
        """End the loop, then one more round in the caller's greenlet (the canary after the batch)."""
        self.stopping.set()
        if self.greenlet is not None:
            self.greenlet.join(2 * CANARY_LIMIT)
        try:
            self.check()
            self.one_round()
        finally:
            self.session.sock.close()


@pytest.fixture
def watch(proxy, mail_stack):
    """The properties checked around a fuzzing test: canary, process, logs; returns the per-example check."""
    alice = mail_stack.info()["users"]["alice"]
    canary = Canary(proxy, alice["login"], alice["password"]).start()
    logs = LogWatch(proxy)
    logs.check()

    def check():
        assert proxy.proc.poll() is None, "the proxy died:\n%s" % proxy.output()[-3000:]
        assert proxy.proc.pid == proxy.first_pid
        canary.check()

    yield check
    canary.stop()
    check()
    assert canary.rounds >= 2, "the canary hardly ran (%d rounds)" % canary.rounds
    time.sleep(0.2)
    logs.check()


# ---------------------------------------------------------------------- generators: shared pieces
EOL = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"", b"\r\r\n", b"\n\r"])
GARBAGE = st.binary(max_size=48)
SPECIAL = st.sampled_from([b"\x00", b"\xff", b"\xc3(", b"\r", b"\n", b"\t", b" ", b"\x7f", b"\x1b[0m", b"%s%n",
                           b"\xe2\x80\xae", b"\x00\x00\x00\x00"])
PAUSE = st.floats(min_value=0.0, max_value=0.15).map(float)


def b64(data):
    return base64.b64encode(data)


SASL_BLOB = st.one_of(
    st.binary(max_size=60).map(b64),
    st.tuples(st.sampled_from([b"", b"alice", b"bob@example.com"]),
              st.sampled_from([b"alice", b"", b"\xff\xfe", b"x" * 300]),
              st.binary(max_size=20)).map(lambda t: b64(b"\0".join(t))),
    st.sampled_from([b"=", b"*", b"", b" * ", b"====", b"a===", b"YWxpY2U", b"YWxpY2U=\x00", b"\xff\xfe",
                     b"*\x00", b"AGFsaWNlAA==" * 3]),
    st.integers(min_value=1000, max_value=20000).map(lambda n: b"QUFB" * (n // 4)),
    GARBAGE,
)
MECHANISM = st.one_of(st.sampled_from([b"PLAIN", b"plain", b"LOGIN", b"CRAM-MD5", b"cram-md5", b"XOAUTH2",
                                       b"GSSAPI", b"", b"PLAIN\x00", b"P\xffAIN", b"EXTERNAL"]), GARBAGE)


def piece(data, trickle=False):
    return (data, trickle)


# ---------------------------------------------------------------------- IMAP
IMAP_VERBS = [b"CAPABILITY", b"NOOP", b"LOGOUT", b"ID", b"STARTTLS", b"LOGIN", b"AUTHENTICATE", b"SELECT",
              b"FETCH", b"APPEND", b"UID", b"IDLE", b"login", b"Authenticate", b"XYZZY", b"ENABLE"]
IMAP_TAG = st.one_of(st.sampled_from([b"a1", b"A001", b"*", b"+", b"", b"t{3}", b"x" * 300, b"a\xff", b"(", b"a%",
                                      b"\x00", b"a\"b"]),
                     st.binary(min_size=1, max_size=8))
IMAP_ATOM = st.one_of(st.sampled_from([b"alice", b"INBOX", b"NIL", b"()", b"(", b")", b'"', b"\\", b"{", b"}", b"*",
                                       b'"al\\ice"', b'"a\\"b"', b'"unterminated', b'("name" "x")', b"((((((x))))))",
                                       b"(" * 6, b"~", b"alice@example.com", b'"alice-pw"', b'""']),
                      st.binary(max_size=12), SPECIAL)


@st.composite
def imap_literal(draw):
    """A literal: ``{n}`` or ``{n+}`` (leading zeros sometimes), then octets, as many as it says or not."""
    n = draw(st.one_of(st.integers(0, 40), st.sampled_from([4095, 4096, 4097, 8191, 8192, 8193, 65536, 65537,
                                                            10 ** 12, 10 ** 40])))
    plus = draw(st.sampled_from([b"", b"+", b"-", b"++"]))
    digits = draw(st.sampled_from([b"%d", b"0%d", b"000%d", b" %d", b"%d "])) % n
    head = b"{" + digits + plus + b"}" + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"x\r\n"]))
    if n > 9000:
        return [piece(head)]                # refused before any octet of it (or the session ends)
    count = max(0, n + draw(st.sampled_from([0, 0, 0, -1, 1, -3, 5])))
    body = draw(st.sampled_from([b"x", b"\x00", b"\xe4", b"\r\n", b"a b"])) * count
    return [piece(head), draw(PAUSE), piece(body[:count], draw(st.booleans()) and count < 40)]


@st.composite
def imap_command(draw):
    tag = draw(IMAP_TAG)
    verb = draw(st.one_of(st.sampled_from(IMAP_VERBS), st.binary(max_size=10)))
    steps = [piece(tag + b" " + verb)]
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)) == 0:
            steps.append(piece(b" "))
            steps += draw(imap_literal())
        else:
            steps.append(piece(b" " + draw(IMAP_ATOM)))
    steps.append(piece(draw(EOL)))
    if draw(st.integers(0, 3)) == 0:
        steps = [(s[0], len(s[0]) < 40) if isinstance(s, tuple) else s for s in steps]
    return steps


@st.composite
def imap_sasl(draw):
    tag = draw(st.sampled_from([b"s1", b"S", b"a.b"]))
    mech = draw(MECHANISM)
    line = tag + b" AUTHENTICATE " + mech
    if draw(st.booleans()):
        line += b" " + draw(SASL_BLOB)
    steps = [piece(line + draw(EOL))]
    for _ in range(draw(st.integers(0, 3))):
        steps += [draw(PAUSE), piece(draw(SASL_BLOB) + draw(EOL), draw(st.integers(0, 5)) == 0)]
    return steps


LOGIN_ID = st.one_of(st.sampled_from([b"alice", b"frank", b"nobody@example.com", b"carol@org", b"alice@example.com",
                                      b"@", b"a@b@c", b"alice@", b"@example.com", b"*", b"*)(uid=*", b"alice\\",
                                      b"%U@%V", b"alice@exa_mple.com", b"alice@example..com", b"alice@.com",
                                      b"alice@-example.com", b"u" * 300 + b"@example.com", b"\xc3(",
                                      "\u00e4lice@\u00e9xample.com".encode(), b"alice@EXAMPLE.COM.", b"a\x00b"]),
                     st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")))


@st.composite
def imap_login(draw):
    login = draw(LOGIN_ID)
    user = draw(st.sampled_from([b'"%s"', b"{%d+}\r\n%%s", b"%s"]))
    user = user % len(login) % login if b"{" in user else user % login
    password = draw(st.sampled_from([b"wrong", b'"wrong pw"', b"{3+}\r\nabc", b'"\xe4"', b"x" * 9000, b"NIL"]))
    return [piece(b"l LOGIN " + user + b" " + password + draw(EOL))]


IMAP_OVERLONG = st.sampled_from([65534, 65536, 70000, 250000]).map(lambda n: [piece(b"o NOOP " + b"x" * n + b"\r\n")])
IMAP_STEP = st.one_of(imap_command(), imap_command(), imap_sasl(), imap_login(),
                      GARBAGE.map(lambda g: [piece(g)]), SPECIAL.map(lambda g: [piece(g)]),
                      PAUSE.map(lambda f: [f]), IMAP_OVERLONG)
# After the examples' own bytes: end a partial line, fill an invited literal (at most 8192 octets),
# cancel a SASL exchange, then log out.
IMAP_SENTINEL = b"\r\n" + b"X" * 8200 + b"\r\n*\r\n*\r\nZZ9 LOGOUT\r\n"
ENDING = st.sampled_from(["logout", "logout", "logout", "half-close", "half-close", "reset"])


@st.composite
def conversation(draw, step):
    steps = [s for chunk in draw(st.lists(step, min_size=1, max_size=7)) for s in chunk]
    return steps, draw(ENDING)


def test_imap_fuzz(proxy, watch):
    @settings(FUZZ, max_examples=150)
    @given(conversation(IMAP_STEP))
    def run(case):
        steps, ending = case
        converse(proxy, "imap", steps, ending, IMAP_SENTINEL)
        watch()
    run()


# ---------------------------------------------------------------------- POP
POP_VERBS = [b"USER", b"PASS", b"APOP", b"AUTH", b"CAPA", b"STLS", b"XQUERYAUTH", b"STAT", b"LIST", b"RETR", b"TOP",
             b"DELE", b"NOOP", b"RSET", b"LAST", b"UIDL", b"user", b"pass", b"QUIT "]
POP_ARG = st.one_of(st.sampled_from([b"alice", b"alice@example.com", b"wrong pw", b"1", b"0", b"-1",
                                     b"99999999999999999999", b"127.0.0.1", b"::1", b"x" * 40, b"0" * 32,
                                     b"alice 0123456789abcdef0123456789abcdef"]),
                    st.binary(max_size=16), SPECIAL)


@st.composite
def pop_command(draw):
    line = draw(st.one_of(st.sampled_from(POP_VERBS), st.binary(max_size=8)))
    for _ in range(draw(st.integers(0, 3))):
        line += draw(st.sampled_from([b" ", b"  ", b"\t"])) + draw(POP_ARG)
    return [piece(line + draw(EOL), draw(st.integers(0, 4)) == 0 and len(line) < 40)]


@st.composite
def pop_sasl(draw):
    line = b"AUTH " + draw(MECHANISM)
    if draw(st.booleans()):
        line += b" " + draw(SASL_BLOB)
    steps = [piece(line + draw(EOL))]
    for _ in range(draw(st.integers(0, 3))):
        steps += [draw(PAUSE), piece(draw(SASL_BLOB) + draw(EOL), draw(st.integers(0, 5)) == 0)]
    return steps


@st.composite
def pop_login(draw):
    user = draw(LOGIN_ID)
    password = draw(st.sampled_from([b"wrong", b"wrong pw", b"", b" ", b"\xe4", b"p" * 240]))
    if draw(st.booleans()):
        return [piece(b"USER " + user + draw(EOL)), draw(PAUSE), piece(b"PASS " + password + draw(EOL))]
    return [piece(b"APOP " + user + b" " + draw(st.sampled_from([b"0" * 32, b"f" * 31, b"\xff" * 32])) + draw(EOL))]


POP_OVERLONG = st.sampled_from([253, 254, 255, 256, 300, 20000]).map(lambda n: [piece(b"USER " + b"u" * n + b"\r\n")])
POP_STEP = st.one_of(pop_command(), pop_command(), pop_sasl(), pop_login(), GARBAGE.map(lambda g: [piece(g)]),
                     SPECIAL.map(lambda g: [piece(g)]), PAUSE.map(lambda f: [f]), POP_OVERLONG)
POP_SENTINEL = b"\r\n*\r\n*\r\nQUIT\r\n"


def test_pop_fuzz(proxy, watch):
    @settings(FUZZ, max_examples=100)
    @given(conversation(POP_STEP))
    def run(case):
        steps, ending = case
        converse(proxy, "pop", steps, ending, POP_SENTINEL)
        watch()
    run()


# ---------------------------------------------------------------------- SMTP
SMTP_VERBS = [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP", b"ETRN",
              b"AUTH", b"STARTTLS", b"XCLIENT", b"XFORWARD", b"BDAT", b"TURN", b"ehlo", b" MAIL", b"\tRCPT"]
SMTP_ARG = st.one_of(st.sampled_from([b"client.example.net", b"FROM:<someone@example.net>", b"TO:<bob@example.com>",
                                      b"FROM:<>", b"TO:<postmaster>", b"FROM:<a@b> SIZE=99999999999", b"BODY=8BITMIME",
                                      b"NOTIFY=SUCCESS", b"ADDR=10.0.0.1", b"NAME=spoof", b"PLAIN", b"LOGIN",
                                      b"FROM:<\xff@x>", b"TO:<\x00>", b"FROM:", b"TO:<<<>>>"]),
                   st.binary(max_size=16), SPECIAL)


@st.composite
def smtp_command(draw):
    line = draw(st.one_of(st.sampled_from(SMTP_VERBS), st.binary(max_size=8)))
    for _ in range(draw(st.integers(0, 3))):
        line += b" " + draw(SMTP_ARG)
    return [piece(line + draw(EOL), draw(st.integers(0, 4)) == 0 and len(line) < 40)]


@st.composite
def smtp_message(draw):
    """A whole transaction whose text may hold bare CR or LF, long lines, a lone '.' without CR."""
    steps = [piece(b"EHLO fuzz.example\r\nMAIL FROM:<fuzz@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")]
    for _ in range(draw(st.integers(0, 4))):
        steps.append(piece(draw(st.one_of(st.sampled_from([b"Subject: fuzz\r\n", b"\r\n", b"..\r\n", b".\n",
                                                            b"a\rb\r\n", b"a\nb\r\n", b"x" * 70000 + b"\r\n",
                                                            b"\r\n.\n", b".\r"]), GARBAGE))))
    steps.append(piece(draw(st.sampled_from([b".\r\n", b"\r\n.\r\n", b".\n", b""]))))
    return steps


@st.composite
def smtp_bdat(draw):
    size = draw(st.integers(0, 300))
    head = b"BDAT " + draw(st.sampled_from([b"%d", b"%d LAST", b"%d last", b" %d", b"%d  LAST ", b"0%d", b"%dx",
                                            b"-%d", b"%d LAST extra"])) % size
    count = max(0, size + draw(st.sampled_from([0, 0, -2, 3])))
    body = draw(st.sampled_from([b"a", b"\r\n", b"\n", b"\r", b"\x00"])) * count
    return [piece(b"EHLO fuzz.example\r\nMAIL FROM:<fuzz@example.net>\r\nRCPT TO:<bob@example.com>\r\n"),
            piece(head + draw(EOL)), piece(body)]


@st.composite
def smtp_auth(draw):
    line = b"AUTH " + draw(MECHANISM)
    if draw(st.booleans()):
        line += b" " + draw(SASL_BLOB)
    steps = [piece(line + draw(EOL))]
    for _ in range(draw(st.integers(0, 2))):
        steps.append(piece(draw(SASL_BLOB) + draw(EOL)))
    return steps


SMTP_OVERLONG = st.sampled_from([16380, 16384, 20000, 1100000]).map(lambda n: [piece(b"NOOP " + b"x" * n + b"\r\n")])
SMTP_STEP = st.one_of(smtp_command(), smtp_command(), smtp_message(), smtp_bdat(), smtp_auth(),
                      GARBAGE.map(lambda g: [piece(g)]), SPECIAL.map(lambda g: [piece(g)]), PAUSE.map(lambda f: [f]),
                      SMTP_OVERLONG)
# end a partial line and any message text, fill a pending chunk (at most 300 octets), then QUIT
SMTP_SENTINEL = b"\r\n.\r\n" + b"X" * 400 + b"\r\nQUIT\r\n"


def test_smtp_fuzz(proxy, watch):
    @settings(FUZZ, max_examples=120)
    @given(conversation(SMTP_STEP))
    def run(case):
        steps, ending = case
        converse(proxy, "smtp", steps, ending, SMTP_SENTINEL)
        watch()
    run()



# ---------------------------------------------------------------------- implicit TLS ports, logged-in sessions
TLS_RECORD = st.builds(lambda kind, body: b"\x16\x03" + kind + len(body).to_bytes(2, "big") + body,
                       st.sampled_from([b"\x01", b"\x03", b"\x00", b"\xff"]), st.binary(max_size=80))
TLS_STEP = st.one_of(GARBAGE.map(lambda g: [piece(g)]), TLS_RECORD.map(lambda g: [piece(g)]),
                     PAUSE.map(lambda f: [f]), st.just([piece(b"\x16\x03\x01\xff\xff" + b"\x00" * 70000)]))


def test_tls_ports_fuzz(proxy, watch):
    """Garbage and broken TLS records at the implicit-TLS ports: the handshake fails, the proxy closes."""
    @settings(FUZZ, max_examples=20)
    @given(st.sampled_from(["imap", "pop", "smtp"]), st.lists(TLS_STEP, min_size=1, max_size=4),
           st.sampled_from(["half-close", "reset"]))
    def run(kind, chunks, ending):
        c = Conversation(proxy.tls_ports[kind])
        try:
            for step in (s for chunk in chunks for s in chunk):
                if isinstance(step, float):
                    gevent.sleep(step)
                else:
                    c.send(*step)
            if ending == "reset":
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            else:
                half_close(c.sock)
                assert c.wait_close(), "the proxy kept a failed TLS handshake open"
                assert not bytes(c.data).startswith((b"* ", b"+OK", b"-ERR", b"220")), "clear text on a TLS port"
        finally:
            c.close()
        watch()
    run()


def test_logged_in_fuzz(proxy, watch, mail_stack):
    """Garbage through the pump to the stores after a real login: the proxy carries it and closes
    when the client half-closes or resets."""
    user = mail_stack.info()["users"]["user1"]

    @settings(FUZZ, max_examples=16)
    @given(st.sampled_from(["imap", "pop"]), st.lists(st.one_of(IMAP_STEP, POP_STEP), min_size=1, max_size=4),
           st.sampled_from(["half-close", "reset"]))
    def run(kind, chunks, ending):
        c = Conversation(proxy.ports[kind])
        try:
            if kind == "imap":
                c.send(b'L LOGIN %s "%s"\r\n' % (user["login"].encode(), user["password"].encode()))
                want = b"\r\nL OK "
            else:
                c.send(b"USER %s\r\nPASS %s\r\n" % (user["login"].encode(), user["password"].encode()))
                want = b"\r\n+OK Logged in"
            deadline = time.monotonic() + CLOSE_LIMIT
            while want not in c.data:
                assert time.monotonic() < deadline and not c.over, "no login: %r" % bytes(c.data)
                gevent.sleep(0.01)
            for step in (s for chunk in chunks for s in chunk):
                if isinstance(step, float):
                    gevent.sleep(step)
                else:
                    c.send(*step)
            if ending == "reset":
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            else:
                half_close(c.sock)
                assert c.wait_close(), "a half-closed relayed session stayed open; got %r" % bytes(c.data[-300:])
        finally:
            c.close()
        watch()
    run()


# ---------------------------------------------------------------------- memory per session
def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hold_sessions(p, kind, n, payload, answer=b""):
    """``n`` sessions of ``kind``, greeted, each having sent ``payload`` and got ``answer`` (then
    held open, nothing more answered); the proxy's RSS growth in KB once they sit there."""
    before = rss_kb(p.proc.pid)
    socks = []
    try:
        for _ in range(n):
            r = RawClient(HOST, p.ports[kind], fresh_source())
            r.readline()
            socks.append(r)
        for r in socks:
            r.send(payload)
        for r in socks:
            if answer:
                r.expect_lines(answer)
        time.sleep(1.0)
        grown = rss_kb(p.proc.pid) - before
        for r in socks:                       # still open: nothing was answered
            r.sock.setblocking(False)
            try:
                got = r.sock.recv(100)
            except BlockingIOError:
                got = None
            assert got is None, "a held %s session got %r" % (kind, got)
    finally:
        for r in socks:
            r.sock.close()
    time.sleep(0.5)
    return grown


@pytest.mark.parametrize("kind,payload,answer,bound_kb", [
    # a partial line just under the 64 KB line limit
    ("imap", b"a LOGIN " + b"x" * 60000, b"", 2 * 64 + 32),
    # an invited literal, most of it sent
    ("imap", b"a LOGIN {8192}\r\n" + b"x" * 8000, b"+ Ready for literal data", 2 * 8 + 32),
    # a SASL response just under its 12 KB limit
    ("pop", b"AUTH PLAIN\r\n" + b"Q" * 12000, b"+ ", 2 * 12 + 32),
    # 600 KB of a command line that is being skipped (MAX_SKIP 1 MB): never held whole
    ("smtp", b"NOOP " + b"x" * 600000, b"", 2 * 16 + 32),
], ids=["imap-line", "imap-literal", "pop-sasl", "smtp-skip"])
def test_memory_per_session_is_bounded(proxy, kind, payload, answer, bound_kb):
    """RSS with N sessions holding input, against N sessions that sent nothing: the difference per
    session stays within about twice the limit of what may be held (the README's idle figure is
    under 2 KB a session; the bench's cap is 6 KB)."""
    n = 40
    # RSS also moves with what the rest of the process does (caches, heap fragmentation after the
    # fuzz tests), which only ever inflates a measure: the lower of two attempts counts
    tries = []
    for _ in range(2):
        idle = hold_sessions(proxy, kind, n, b"")
        held = hold_sessions(proxy, kind, n, payload, answer)
        # the idle phase may come out negative (memory freed by earlier tests): it only lowers the baseline
        tries.append(((held - max(idle, 0)) / n, idle))
        print("%s: idle %d KB, holding %d KB, %.1f KB a session more" % (kind, idle, held, tries[-1][0]))
        if tries[-1][0] <= bound_kb:
            break
    per_session, idle = min(tries)
    assert per_session <= bound_kb, "%.1f KB a session holding %d octets (bound %d KB)" % (
        per_session, len(payload), bound_kb)
    assert idle / n <= 64, "%.1f KB an idle %s session" % (idle / n, kind)
