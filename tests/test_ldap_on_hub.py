"""Requests on pooled LDAP connections run on the hub (directory.py, libldap's asynchronous calls):
every concurrent login gets its own answer, and a directory hung in the middle of a big answer,
over plain LDAP, ldaps:// or StartTLS, costs the logins that wait for it their temporary failure
while relayed sessions flow.  Real slapd, Dovecot and IMAP clients; the answers pass a forwarder
that cuts them into pieces or holds them."""
import _socket
import time

import gevent
import pytest
from test_directory_faults import slow_login
from test_ldap_failover import NO_CACHE, ldap_url

from mmproxy import imap
from mmproxy.testing.certs import TestCA
from mmproxy.testing.delayproxy import _original
from mmproxy.testing.dovecot import welcome_subject
from mmproxy.testing.proxy import Proxy
from mmproxy.testing.slapd import Slapd

from helpers import ImapFrom, RawClient, proxy_log

_start_thread = _original("_thread", "start_new_thread")
_sleep = _original("time", "sleep")
NO_TEMP = b"a " + imap.NO_TEMP.encode() + b"\r\n"


class Chopper:
    """A native-thread TCP forwarder: server bytes go on in ``piece``-byte pieces ``gap`` s apart.
    Once ``hold_big`` is set, a connection that has carried that many server bytes since (counted
    across reads: TLS records and TCP segments split an answer anywhere) passes half of the read
    that crossed the mark and then nothing more, like a server hung in the middle of an answer."""

    def __init__(self, host, port, piece=1000, gap=0.002):
        self.target = (host, port)
        self.piece, self.gap = piece, gap
        self.hold_big = None          # server bytes on one connection after which it hangs
        self.holds = 0
        self.ls = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        self.ls.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.ls.settimeout(0.2)
        self.port = self.ls.getsockname()[1]
        self.stopped = False
        _start_thread(self._accept, ())

    def _accept(self):
        while not self.stopped:
            try:
                fd, _ = self.ls._accept()
            except (TimeoutError, OSError):
                continue
            c = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
            c.settimeout(None)
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            try:
                s.connect(self.target)
            except OSError:
                c.close()
                continue
            _start_thread(self._pump, (s, c, True))
            _start_thread(self._pump, (c, s, False))

    def _pump(self, src, dst, chop):
        seen = 0
        try:
            while True:
                data = src.recv(262144)
                if not data:
                    break
                if chop:
                    if self.hold_big is not None:
                        seen += len(data)
                        if seen >= self.hold_big:
                            dst.sendall(data[:len(data) // 2])
                            self.holds += 1
                            while not self.stopped:
                                _sleep(0.1)
                            raise OSError("held")
                    for i in range(0, len(data), self.piece):
                        dst.sendall(data[i:i + self.piece])
                        _sleep(self.gap)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        for x in (src, dst):
            try:
                x.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.stopped = True
        self.ls.close()


def subject_of(p, user, password, port=None, source="127.0.0.1"):
    """(tagged LOGIN answer, the Subject of INBOX message 1 or None)."""
    r = RawClient(p.host, port or p.imap_port, timeout=40, source=source)
    try:
        r.expect(b"* OK")
        q = password.replace("\\", "\\\\").replace('"', '\\"')
        r.send(b'a LOGIN %s "%s"\r\n' % (user.encode(), q.encode()))
        answer = r.skip_to(b"a ")
        if not answer.startswith(b"a OK"):
            return answer, None
        r.send(b"b SELECT INBOX\r\n")
        r.skip_to(b"b ")
        r.send(b"c FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]\r\n")
        subject = None
        while True:
            line = r.readline()
            if line.lower().startswith(b"subject:"):
                subject = line.split(b":", 1)[1].strip().decode()
            if line.startswith(b"c ") or not line:
                break
        r.send(b"z LOGOUT\r\n")
        return answer, subject
    finally:
        r.sock.close()


USERS = [("alice", "alice-pw", "alice", "127.0.0.2"), ("bob", 'b"o b\\pw', "bob", "127.0.0.3"),
         ("erin", "erin-pw", "erin", "127.0.0.2"), ("kurt", "kurt-pw", "kurt", "127.0.0.2"),
         ("carol@example.org", "carol pw", "carol@example.org", "127.0.0.3"),
         ("dave@example.org", "dave-pw", "dave@example.org", "127.0.0.2")] + \
        [("user%d" % k, "pw-user%d" % k, "user%d" % k, "127.0.0.2" if k % 2 else "127.0.0.3") for k in range(1, 11)]


def check_many(p, n=50, seed=0):
    """n concurrent logins of different users, right and wrong passwords mixed: each gets its own answer."""
    jobs = []
    for i in range(n):
        login, pw, store, ip = USERS[(i + seed) % len(USERS)]
        right = (i * 7 + seed) % 3 != 0
        jobs.append((login, pw if right else pw + "x", right, store, ip))
    results = [None] * n

    def one(i):
        login, pw, right, store, ip = jobs[i]
        results[i] = subject_of(p, login, pw, source="127.0.1.%d" % (i % 200 + 1))
    gs = [gevent.spawn(one, i) for i in range(n)]
    gevent.joinall(gs, timeout=60)
    bad = []
    for i, (login, pw, right, store, ip) in enumerate(jobs):
        got = results[i]
        if got is None:
            bad.append((login, right, "no result", gs[i].exception))
            continue
        answer, subject = got
        if right:
            if not answer.startswith(b"a OK") or subject != welcome_subject(store, ip):
                bad.append((login, right, answer, subject))
        elif not answer.startswith(b"a NO [AUTHENTICATIONFAILED]"):
            bad.append((login, right, answer, subject))
    return bad


@pytest.mark.timeout(180)
def test_fifty_concurrent_mixed_logins(mail_stack, tmp_path):
    """Four rounds of 50 logins at once, a third with a wrong password, no cache: each gets its
    own answer (its own store's INBOX, or AUTHENTICATIONFAILED), never another login's."""
    s = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"))
    s.start()
    try:
        with Proxy(mail_stack.info(), imap={**NO_CACHE, "LdapURL": ldap_url(s)}) as p:
            for seed in range(4):
                bad = check_many(p, n=50, seed=seed)
                assert not bad, (seed, bad)
            assert "Traceback" not in proxy_log(p)
    finally:
        s.close()


def bloat(s, dn, n=3000):
    """n description values (~30 octets each) on ``dn``: a search answer of ~100 KB."""
    ldif = "dn: %s\nchangetype: modify\nadd: description\n" % dn + "".join(
        "description: padding value number %06d xxxxxxxx\n" % i for i in range(n))
    s.ldapmodify(ldif + "\n")


BIG = {"MailHostAttrs": "mailHost description"}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["ldap", "ldaps", "starttls"])
def test_hung_mid_answer_does_not_block_the_hub(mail_stack, tmp_path, mode):
    """The directory sends half of a big answer and nothing more: the waiting logins get the
    temporary failure within the operation timeout; a relayed session's NOOPs keep answering."""
    ca = TestCA(str(tmp_path / "ca"))
    cert, key = ca.issue("ldap", ips=["127.0.0.1"], dns=["localhost"])
    s = Slapd(mail_stack.directory, workdir=str(tmp_path / "ldap"), tls=(cert, key, ca.path))
    s.start()
    for u in ("alice", "bob", "user1", "user2", "user3", "user4"):
        bloat(s, mail_stack.directory.user(u).dn, n=2000)
    ch = Chopper(s.host, s.ldaps_port if mode == "ldaps" else s.port, piece=100000, gap=0)
    url = {"ldaps": "ldaps://127.0.0.1:%d/o=internet", "starttls": "ldap://127.0.0.1:%d/o=internet????!StartTLS",
           "ldap": "ldap://127.0.0.1:%d/o=internet"}[mode] % ch.port
    try:
        with Proxy(mail_stack.info(), imap={**NO_CACHE, **BIG, "LdapURL": url, "LdapCAFile": ca.path}) as p:
            bad = check_many(p, n=16)
            assert not bad, bad
            held = ImapFrom(p.host, p.imap_port)
            held.login("erin", "erin-pw")
            ch.hold_big = 20000
            lat, stop = [], [False]

            def noops():
                while not stop[0]:
                    t0 = time.monotonic()
                    assert held.noop()[0] == "OK"
                    lat.append(time.monotonic() - t0)
                    gevent.sleep(0.1)
            g = gevent.spawn(noops)
            res = {}

            def one(u, pw):
                res[u] = slow_login(p, u, pw)
            hs = [gevent.spawn(one, u, "pw-" + u) for u in ("user1", "user2", "user3", "user4")]
            gevent.joinall(hs, timeout=60)
            stop[0] = True
            g.join(5)
            assert ch.holds >= 1
            for u, (took, answer) in res.items():
                assert answer == NO_TEMP and took < 13, (u, took, answer)
            assert max(lat) < 0.5, sorted(lat)[-5:]
            held.logout()
            assert "Traceback" not in proxy_log(p)
    finally:
        ch.stopped = True
        ch.close()
        s.close()
