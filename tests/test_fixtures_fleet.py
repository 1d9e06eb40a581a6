"""The Redis and HAProxy fixtures (mmproxy.testing.redis / .haproxy) work on this machine: a real
redis-server plain, with a password and over TLS, hung (SIGSTOP) and killed; a real haproxy that
puts a PROXY v1 / v2 / v2-with-SSL-TLV header in front of the client's bytes. Loopback only; every
process started here is stopped."""
import _socket
import os
import socket
import ssl
import struct
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mmproxy import proxyproto
from mmproxy.proxyproto import PP2_TYPE_SSL
from mmproxy.testing.base import DaemonError
from mmproxy.testing.certs import TestCA
from mmproxy.testing.delayproxy import _original
from mmproxy.testing.haproxy import Frontend, HAProxy, write_pem
from mmproxy.testing.redis import RedisServer
from mmproxy.xclient import PROXY_V2_SIGNATURE as PP2_SIGNATURE

from helpers import until

_start_thread = _original("_thread", "start_new_thread")
_allocate_lock = _original("_thread", "allocate_lock")
NO_RETRY = Retry(NoBackoff(), 0)       # redis-py retries timeouts 3 times by default


@pytest.fixture
def fleet():
    """Start daemons with ``fleet(daemon)``; all are closed at the end (a paused one continued first)."""
    started = []

    def start(daemon):
        started.append(daemon)
        return daemon.start()

    yield start
    for d in reversed(started):
        d.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    """A test CA and a server certificate for 127.0.0.1: (ca, cert, key, pem with cert + key)."""
    d = str(tmp_path_factory.mktemp("fleet-ca"))
    ca = TestCA(d)
    cert, key = ca.issue("server", ips=("127.0.0.1",))
    return ca, cert, key, write_pem(cert, key, d + "/server-combined.pem")


# ---------------------------------------------------------------------------------------- Redis
@pytest.mark.timeout(60)
def test_redis_plain(fleet):
    r = fleet(RedisServer())
    assert r.url == "redis://127.0.0.1:%d/0" % r.port
    c = redis.Redis.from_url(r.url)
    assert c.set("k", "v") and c.get("k") == b"v"
    assert r.cli("GET", "k") == "v"
    c.close()


@pytest.mark.timeout(60)
def test_redis_password(fleet):
    r = fleet(RedisServer(password="s3cret:/@"))
    assert r.url == f"redis://:s3cret%3A%2F%40@127.0.0.1:{r.port}/0"
    c = redis.Redis.from_url(r.url)
    assert c.set("k", "v") and c.get("k") == b"v"
    c.close()
    anon = redis.Redis(host="127.0.0.1", port=r.port, retry=NO_RETRY)
    with pytest.raises(redis.AuthenticationError):
        anon.get("k")
    anon.close()
    assert r.cli("GET", "k") == "v"


@pytest.mark.timeout(60)
def test_redis_tls(fleet, ca):
    authority, cert, key, _pem = ca
    r = fleet(RedisServer(tls=(cert, key, authority.path), password="pw"))
    assert r.url == "rediss://:pw@127.0.0.1:%d/0" % r.port
    c = redis.Redis.from_url(r.url, ssl_ca_certs=authority.path)      # checks the name 127.0.0.1 too
    assert c.set("k", "v") and c.get("k") == b"v"
    c.close()
    assert r.cli("GET", "k") == "v"
    plain = redis.Redis(host="127.0.0.1", port=r.port, password="pw", socket_timeout=2, retry=NO_RETRY)
    with pytest.raises(redis.ConnectionError):      # TLS only: a plain client gets nowhere
        plain.ping()
    plain.close()


@pytest.mark.timeout(60)
def test_redis_pause_resume(fleet):
    r = fleet(RedisServer())
    c = r.connect(socket_timeout=0.5, retry=NO_RETRY)
    assert c.ping()
    r.pause()
    t0 = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        c.ping()
    assert time.monotonic() - t0 < 3
    r.resume()
    c2 = r.connect(socket_timeout=2, retry=NO_RETRY)
    assert c2.ping()
    c.close()
    c2.close()
    r.pause()                        # stop() of a paused server ends it all the same
    pid = r.proc.pid
    r.stop()
    assert not r.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.timeout(60)
def test_redis_kill_and_start_on_same_port(fleet):
    r = fleet(RedisServer())
    port = r.port
    c = r.connect(socket_timeout=2, retry=NO_RETRY)
    assert c.set("k", "v")
    r.kill()
    assert not r.running
    with pytest.raises(redis.ConnectionError):
        c.get("k")
    r.start()
    assert r.port == port and r.running
    assert c.get("k") is None            # nothing is persisted: a fresh, empty server
    assert c.set("k", "w") and r.cli("GET", "k") == "w"
    c.close()


@pytest.mark.timeout(60)
def test_redis_bad_certificate_fails_fast(tmp_path, ca):
    _authority, cert, key, _pem = ca
    other = TestCA(str(tmp_path / "other"), "another CA")
    r = RedisServer(tls=(cert, key, other.path))
    try:
        t0 = time.monotonic()
        with pytest.raises(DaemonError, match="does not verify"):
            r.start()
        assert time.monotonic() - t0 < 10 and not r.running
    finally:
        r.close()


# -------------------------------------------------------------------------------------- HAProxy
class Recorder:
    """A native-thread TCP server on 127.0.0.1 that keeps every byte each connection sends, in
    order of connection (``conns``: list of bytearray)."""

    def __init__(self):
        self.ls = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.ls.settimeout(0.2)
        self.port = self.ls.getsockname()[1]
        self.conns = []
        self.lock = _allocate_lock()
        self.stopped = False
        self.socks = []
        _start_thread(self._accept, ())

    def _accept(self):
        while not self.stopped:
            try:
                fd, _ = self.ls._accept()
            except OSError:                  # timeout: look at `stopped` again
                continue
            c = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
            c.settimeout(0.2)
            buf = bytearray()
            with self.lock:
                self.conns.append(buf)
                self.socks.append(c)
            _start_thread(self._read, (c, buf))
        self.ls.close()

    def _read(self, c, buf):
        while not self.stopped:
            try:
                data = c.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self.lock:
                buf.extend(data)
        c.close()

    def first(self, nbytes, timeout=10):
        """The bytes of the first connection, once it has sent at least ``nbytes``."""
        until(lambda: self.conns and len(self.conns[0]) >= nbytes, timeout)
        with self.lock:
            return bytes(self.conns[0])

    def stop(self):
        self.stopped = True


@pytest.fixture
def recorder():
    rec = Recorder()
    yield rec
    rec.stop()


def parse_v2(data):
    """(src, dst, sport, dport, {tlv type: value}, rest) of a PROXY v2 PROXY/TCP4 header, read by
    mmproxy's own parser (proxyproto.py)."""
    assert data[:12] == PP2_SIGNATURE, data[:40]
    assert data[12:14] == b"\x21\x11", data[:40]              # v2 PROXY, TCP over IPv4
    end = 16 + struct.unpack("!H", data[14:16])[0]
    o = proxyproto.parse_v2(data[:end], ("0.0.0.0", 0), ("0.0.0.0", 0))
    return o.client[0], o.server[0], o.client[1], o.server[1], dict(proxyproto.tlvs(data[28:end])), data[end:]


PAYLOAD = b"a1 LOGIN alice secret\r\n" + bytes(range(256))


@pytest.mark.timeout(60)
def test_haproxy_send_proxy_v2(fleet, recorder):
    h = fleet(HAProxy([Frontend("imap", [("127.0.0.1", recorder.port)], send_proxy="v2")]))
    port = h.port_of("imap")
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(PAYLOAD)
        data = recorder.first(28 + len(PAYLOAD))
        sport = s.getsockname()[1]
    assert data.startswith(PP2_SIGNATURE)
    assert parse_v2(data) == ("127.0.0.1", "127.0.0.1", sport, port, {}, PAYLOAD)


@pytest.mark.timeout(60)
def test_haproxy_send_proxy_v1(fleet, recorder):
    h = fleet(HAProxy([Frontend("pop", [("127.0.0.1", recorder.port)], send_proxy="v1")]))
    port = h.port_of("pop")
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(PAYLOAD)
        sport = s.getsockname()[1]
        line = b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (sport, port)
        data = recorder.first(len(line) + len(PAYLOAD))
    assert data == line + PAYLOAD


@pytest.mark.timeout(60)
def test_haproxy_tls_termination_v2_ssl(fleet, recorder, ca):
    authority, _cert, _key, pem = ca
    h = fleet(HAProxy([Frontend("imaps", [("127.0.0.1", recorder.port)], tls_pem=pem, send_proxy="v2-ssl")]))
    port = h.port_of("imaps")
    ctx = ssl.create_default_context(cafile=authority.path)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 5), server_hostname="127.0.0.1") as s:
        s.sendall(PAYLOAD)
        until(lambda: recorder.conns and recorder.conns[0].endswith(PAYLOAD))
        data = recorder.first(0)
        sport = s.getsockname()[1]
    src, dst, got_sport, dport, tlvs, rest = parse_v2(data)
    assert (src, dst, got_sport, dport, rest) == ("127.0.0.1", "127.0.0.1", sport, port, PAYLOAD)
    ssl_tlv = tlvs[PP2_TYPE_SSL]
    assert ssl_tlv[0] & 0x01                                  # PP2_CLIENT_SSL
    assert b"TLSv1." in ssl_tlv[5:]                          # sub-TLV PP2_SUBTYPE_SSL_VERSION


@pytest.mark.timeout(60)
def test_haproxy_round_robin_and_ports(fleet):
    recs = [Recorder(), Recorder()]
    try:
        h = fleet(HAProxy([Frontend("a", [("127.0.0.1", r.port) for r in recs], send_proxy=None),
                           Frontend("b", [("127.0.0.1", 1)], send_proxy=None)]))
        assert h.port_of("a") != h.port_of("b")
        for i in range(2):
            with socket.create_connection(("127.0.0.1", h.port_of("a")), 5) as s:
                s.sendall(b"hello %d" % i)
                until(lambda: sum(len(r.conns) for r in recs) > i and any(
                    c.startswith(b"hello %d" % i) for r in recs for c in r.conns))
        assert [bytes(r.conns[0]) for r in recs] in ([b"hello 0", b"hello 1"], [b"hello 1", b"hello 0"])
    finally:
        for r in recs:
            r.stop()


@pytest.mark.timeout(60)
def test_haproxy_checks_send_proxy_and_stats_socket(fleet, recorder):
    h = fleet(HAProxy([Frontend("imap", [("127.0.0.1", recorder.port), ("127.0.0.1", 1)], check=True,
                                check_inter=0.2)], stats_socket=True))
    until(lambda: recorder.conns and len(recorder.conns[0]) >= 16)       # a check, no client yet
    assert recorder.first(16).startswith(PP2_SIGNATURE)
    # srv_op_state (6th field) of "show servers state": 2 = UP, 0 = DOWN (nothing on port 1)
    until(lambda: sorted(line.split()[3] + "=" + line.split()[5]
                         for line in h.command("show servers state imap").splitlines()[2:] if line.strip())
          == ["s0=2", "s1=0"])


@pytest.mark.timeout(60)
def test_haproxy_bad_config_raises_with_log(tmp_path):
    h = HAProxy([Frontend("x", [("127.0.0.1", 1)], tls_pem=str(tmp_path / "missing.pem"))])
    try:
        with pytest.raises(DaemonError, match="missing.pem"):
            h.start()
        assert not h.running
    finally:
        h.close()
