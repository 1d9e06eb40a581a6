"""PROXY protocol in (proxyproto.py, ProxyProtocolPorts / ProxyProtocolFrom): the header's
parsing, then end to end with real slapd, Dovecot and Postfix: the address it names is the
client's for ConnLimits, TCPAccess, logs, and what the stores and relays are told; a v2 header
saying the balancer took the TLS counts as TLS; everybody else, and a balancer without a header,
is refused with the protocol's words.  (HAProxy itself in front: test_fleet.py.)"""
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_smtp import delivered, hp, message, relay_for_proxy, smtp_settings, subject

from mmproxy import proxyproto
from mmproxy.proxyproto import HeaderError, Origin, parse_v1, parse_v2
from mmproxy.testing.proxy import Proxy
from mmproxy.xclient import PROXY_V2_SIGNATURE, proxy_header

from helpers import RawClient, proxy_log, until

PEER, LOCAL = ("127.0.0.1", 5555), ("127.0.0.1", 143)
BALANCER = "127.0.0.1"            # the one trusted source
STRANGER = "127.0.0.5"            # connects straight to the marked listener


# ---------------------------------------------------------------------- parsing
def v2(body_tlvs=b"", command=0x21, family=0x11, src="192.0.2.1", dst="198.51.100.2", ports=(40000, 993)):
    """A v2 header with TLVs after the addresses."""
    import ipaddress
    addrs = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", *ports)
    body = addrs + body_tlvs
    return PROXY_V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


SSL_TLV = tlv(0x20, b"\x01" + b"\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES_256_GCM_SHA384"))


def test_v1_lines():
    assert parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 143\r\n", PEER, LOCAL) == \
        Origin(("192.0.2.1", 40000), ("198.51.100.2", 143), balancer="127.0.0.1")
    assert parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", PEER, LOCAL).client == ("2001:db8::1", 1)
    assert parse_v1(b"PROXY TCP6 ::ffff:192.0.2.130 ::ffff:127.0.0.1 1 2\r\n", PEER, LOCAL) == \
        Origin(("192.0.2.130", 1), ("127.0.0.1", 2), balancer="127.0.0.1")      # a dual-stack balancer's
    assert parse_v2(v2(family=0x21, src="::ffff:192.0.2.131", dst="::1"), PEER, LOCAL).client == ("192.0.2.131", 40000)
    assert parse_v1(b"PROXY UNKNOWN\r\n", PEER, LOCAL) == Origin(PEER, LOCAL, balancer="127.0.0.1")
    assert parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", PEER, LOCAL).client == PEER
    for bad in (b"PROXY TCP4 192.0.2.1 198.51.100.2 40000\r\n", b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
                b"PROXY TCP4 192.0.2.1 198.51.100.2 040000 143\r\n", b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 1\r\n",
                b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n", b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
                b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n", b"PROXY TCP4 192.0.2.\xe9 198.51.100.2 1 2\r\n",
                b'PROXY TCP6 2001:db8::77%"\nINJECTED ::1 4242 143\r\n',          # a zone: the breaker's F5
                b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"):
        with pytest.raises(HeaderError):
            parse_v1(bad, PEER, LOCAL)


def test_v2_headers():
    sent = proxy_header(2, ("192.0.2.1", 40000), ("198.51.100.2", 993))      # what mmproxy itself sends
    assert parse_v2(sent, PEER, LOCAL) == Origin(("192.0.2.1", 40000), ("198.51.100.2", 993), balancer="127.0.0.1")
    six = proxy_header(2, ("2001:db8::7", 1), ("2001:db8::8", 2))
    assert parse_v2(six, PEER, LOCAL).client == ("2001:db8::7", 1)
    o = parse_v2(v2(tlv(0x04, b"\0" * 5) + SSL_TLV), PEER, LOCAL)       # a NOOP TLV, then SSL
    assert o.tls and o.tls_version == "TLSv1.3" and o.client == ("192.0.2.1", 40000)
    no_tls = tlv(0x20, b"\x00" + b"\x00" * 4)                            # the TLV, but the client did not use TLS
    assert not parse_v2(v2(no_tls), PEER, LOCAL).tls
    assert parse_v2(v2(command=0x20), PEER, LOCAL) == Origin(PEER, LOCAL, balancer="127.0.0.1")   # LOCAL
    assert parse_v2(PROXY_V2_SIGNATURE + b"\x21\x00\x00\x00", PEER, LOCAL).client == PEER          # UNSPEC
    for bad in (v2(command=0x11), v2(command=0x22), v2(family=0x12), v2(tlv(0x20, b"\x01"))[:-1],
                v2(b"\x20\x00"), v2(tlv(0x20, b"\x01\x00"))):
        with pytest.raises(HeaderError):
            parse_v2(bad, PEER, LOCAL)
    with pytest.raises(HeaderError):
        parse_v2(PROXY_V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4, PEER, LOCAL)  # too short for TCP4


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_octets_give_an_origin_or_header_error(data):
    for parse, raw in ((parse_v1, b"PROXY " + data + b"\r\n"), (parse_v2, PROXY_V2_SIGNATURE + data)):
        try:
            if parse is parse_v2 and len(raw) < 16:
                continue
            assert isinstance(parse(raw, PEER, LOCAL), Origin)
        except HeaderError:
            pass


def test_trusted_sources():
    from mmproxy.config.types import Networks
    nets = Networks(hosts=True).convert("127.0.0.1, 10.0.0.0/8 ::1 192.168.0.0|255.255.0.0")
    assert [proxyproto.trusted(ip, nets) for ip in ("127.0.0.1", "::ffff:127.0.0.1", "10.9.9.9", "::1",
                                                    "192.168.4.4", "127.0.0.2", "2001:db8::1", "junk")] == \
        [True, True, True, True, True, False, False, False]


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def relay():
    pf = relay_for_proxy(inet_protocols="all")       # XCLIENT with IPv6 addresses needs IPv6 on
    pf.start()
    yield pf
    pf.close()


@pytest.fixture(scope="module")
def proxy(mail_stack, relay):
    """Every plain listener marked; only 127.0.0.1 may send headers; claimed 192.0.2.0/24 clients
    may hold one IMAP connection each; TCPAccess refuses 192.0.2.66; plain passwords only over TLS."""
    common = {"ProxyProtocolFrom": BALANCER, "HandshakeTimeout": 3}
    p = Proxy(mail_stack.info(),
              imap={**common, "ConnLimits": "192.0.2.0|255.255.255.0:1", "TCPAccess": "-imap:192.0.2.66",
                    "RestrictPlainPasswords": True},
              pop=dict(common), smtp={**common, **smtp_settings([hp(relay)])})
    for kind in ("imap", "pop", "smtp"):          # the harness picked the ports when it was made
        p.settings[kind]["ProxyProtocolPorts"] = "%s:%d" % (p.host, p.ports[kind])
    with p:
        yield p


def header(client, server_port, version=1, tls=False):
    if version == 1:
        return b"PROXY TCP4 %s 127.0.0.1 %d %d\r\n" % (client[0].encode(), client[1], server_port)
    return v2(SSL_TLV if tls else b"", src=client[0], dst="127.0.0.1", ports=(client[1], server_port))


def store_log_lines(mail_stack, needle):
    return [line for line in mail_stack.stores["127.0.0.2"].read_log().splitlines() if needle in line]


@pytest.mark.timeout(60)
def test_v1_header_with_pipelined_login_names_the_client_everywhere(proxy, mail_stack):
    """The header and the client's first commands in one write: the header is read to its last
    octet and no further; the store's log and the proxy's name the claimed client."""
    erin = mail_stack.user("erin")
    r = RawClient(proxy.host, proxy.imap_port, source=BALANCER)
    r.send(header(("192.0.2.10", 40010), proxy.imap_port) + b"a ID NIL\r\nb LOGOUT\r\n")
    r.expect(b"* OK")
    r.expect(b"* ID ")
    r.expect(b"a OK")
    r.expect(b"* BYE")
    r.expect(b"b OK")
    r.sock.close()
    before = len(store_log_lines(mail_stack, "rip=192.0.2.11"))
    s = socket.create_connection((proxy.host, proxy.imap_port), 10, source_address=(BALANCER, 0))
    s.sendall(header(("192.0.2.11", 40011), proxy.imap_port, version=2, tls=True)
              + b'a LOGIN erin "%s"\r\nb LOGOUT\r\n' % erin["password"].encode())
    got = b""
    s.settimeout(10)
    while b"b OK" not in got:
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    s.close()
    assert b"a OK" in got, got
    until(lambda: len(store_log_lines(mail_stack, "rip=192.0.2.11")) > before)
    line = store_log_lines(mail_stack, "rip=192.0.2.11")[-1]
    assert "user=<erin>" in line, line
    log = proxy_log(proxy)
    assert "imap 192.0.2.10:40010" in log and "imap 192.0.2.11:40011" in log


@pytest.mark.timeout(60)
def test_header_trickled_octet_by_octet(proxy):
    r = RawClient(proxy.host, proxy.imap_port, source=BALANCER)
    for b in header(("192.0.2.12", 40012), proxy.imap_port, version=2):
        r.send(bytes([b]))
        time.sleep(0.005)
    r.expect(b"* OK")
    r.send(b"a LOGOUT\r\n")
    r.expect(b"* BYE")
    r.expect(b"a OK")


@pytest.mark.timeout(60)
def test_everybody_else_and_a_missing_header_are_refused(proxy):
    """A stranger (even with a header), a balancer sending a command instead of a header, a
    malformed or overlong header, a header that never comes: the protocol's refusal, then close."""
    for kind, refusal in (("imap", b"* BYE Access denied\r\n"), ("pop", b"-ERR [SYS/PERM] Access denied\r\n"),
                          ("smtp", b"421 4.7.0 Access denied\r\n")):
        port = proxy.ports[kind]
        r = RawClient(proxy.host, port, source=STRANGER)
        r.send(header(("192.0.2.13", 1), port))
        assert r.read_all(5) == refusal
        for sent in (b"a LOGIN erin x\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", b"PROXY " + b"9" * 200,
                     PROXY_V2_SIGNATURE + b"\x21\x11\xff\xff"):
            r = RawClient(proxy.host, port, source=BALANCER)
            r.send(sent)
            assert r.read_all(5) == refusal, (kind, sent)
    t = time.monotonic()
    r = RawClient(proxy.host, proxy.imap_port, source=BALANCER)
    r.send(b"PROXY TCP4 192.0.2.14")
    assert r.read_all(10) == b"* BYE Access denied\r\n"
    assert 2.5 < time.monotonic() - t < 6                      # HandshakeTimeout 3 for the whole header
    log = proxy_log(proxy)
    assert "[127.0.0.5:" in log and "not a load balancer in ProxyProtocolFrom" in log
    assert "no complete PROXY header within 3s" in log and "no PROXY header: the connection starts" in log
    assert "Traceback" not in log


@pytest.mark.timeout(60)
def test_connlimits_and_tcpaccess_judge_the_named_client(proxy):
    held = RawClient(proxy.host, proxy.imap_port, source=BALANCER)
    held.send(header(("192.0.2.20", 1), proxy.imap_port))
    held.expect(b"* OK")
    second = RawClient(proxy.host, proxy.imap_port, source=BALANCER)
    second.send(header(("192.0.2.20", 2), proxy.imap_port))
    assert second.read_all(5) == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
    other = RawClient(proxy.host, proxy.imap_port, source=BALANCER)       # the balancer's own address is not counted
    other.send(header(("192.0.2.21", 3), proxy.imap_port))
    other.expect(b"* OK")
    denied = RawClient(proxy.host, proxy.imap_port, source=BALANCER)
    denied.send(header(("192.0.2.66", 4), proxy.imap_port))
    assert denied.read_all(5) == b"* BYE Access denied\r\n"
    for c in (held, other):
        c.send(b"z LOGOUT\r\n")
        c.expect(b"* BYE")


@pytest.mark.timeout(60)
def test_tls_taken_by_the_balancer_counts_as_tls(proxy, mail_stack):
    """RestrictPlainPasswords: a v2 header with the SSL TLV lets LOGIN through and offers no
    STARTTLS; the same client without the TLV is refused a plaintext LOGIN."""
    erin = mail_stack.user("erin")
    for tls, client in ((True, "192.0.2.30"), (False, "192.0.2.31")):   # two addresses: ConnLimits 1 each
        r = RawClient(proxy.host, proxy.imap_port, source=BALANCER)
        r.send(header((client, 5), proxy.imap_port, version=2, tls=tls))
        greeting = r.expect(b"* OK")
        r.send(b'a LOGIN erin "%s"\r\n' % erin["password"].encode())
        answer = r.skip_to(b"a ")
        if tls:
            assert b"STARTTLS" not in greeting and b"LOGINDISABLED" not in greeting, greeting
            assert answer.startswith(b"a OK"), answer
        else:
            assert b"LOGINDISABLED" in greeting, greeting
            assert answer.startswith(b"a NO [PRIVACYREQUIRED]"), answer
        r.send(b"z LOGOUT\r\n")
        r.skip_to(b"z ")


@pytest.mark.timeout(60)
def test_pop_xclient_and_smtp_xclient_name_the_client(proxy, mail_stack, relay):
    user3 = mail_stack.user("user3")
    before = len(store_log_lines(mail_stack, "rip=192.0.2.40"))
    r = RawClient(proxy.host, proxy.pop_port, source=BALANCER)
    r.send(header(("192.0.2.40", 6), proxy.pop_port)
           + b"USER user3\r\nPASS %s\r\nQUIT\r\n" % user3["password"].encode())
    r.expect(b"+OK")
    r.expect(b"+OK")
    assert r.readline().startswith(b"+OK"), "PASS refused"
    until(lambda: len(store_log_lines(mail_stack, "rip=192.0.2.40")) > before)
    assert "pop3-login" in store_log_lines(mail_stack, "rip=192.0.2.40")[-1]
    received = received_for(proxy, relay, header(("192.0.2.41", 7), proxy.smtp_port))
    assert "[192.0.2.41]" in received and "127.0.0.1" not in received, received
    # a client of an IPv6 listener: XCLIENT DESTADDR=IPV6:... (the breaker's F4)
    received = received_for(proxy, relay, v2(family=0x21, src="2001:db8::21", dst="::1", ports=(8, 25)))
    assert "2001:db8::21" in received, received


def received_for(proxy, relay, first):
    """One message through the SMTP listener after the header ``first``: the relay's Received line."""
    subj = subject()
    s = RawClient(proxy.host, proxy.smtp_port, source=BALANCER)
    s.send(first)
    s.expect(b"220 ")
    for line, code in ((b"EHLO client.example.net", b"250 "), (b"MAIL FROM:<someone@example.net>", b"250 "),
                       (b"RCPT TO:<bob@example.com>", b"250 "), (b"DATA", b"354 ")):
        s.send(line + b"\r\n")
        s.skip_to(code)
    s.send(message(subj).encode() + b"\r\n.\r\nQUIT\r\n")
    s.skip_to(b"250 ")
    return delivered(relay, subj).get_all("Received")[-1]


@pytest.mark.timeout(60)
def test_a_refusal_survives_what_the_client_sent_before_reading_it(proxy):
    """A client that sent more than a header (pipelined commands, junk) before reading: the
    refusal is followed by a FIN and what it sent is read away, never a reset that would destroy
    the refusal in its receive buffer (the breaker's RST finding)."""
    for source, first in ((STRANGER, header(("192.0.2.70", 1), proxy.imap_port)),
                          (BALANCER, b"a LOGIN erin x\r\n")):
        r = RawClient(proxy.host, proxy.imap_port, source=source)
        r.send(first + b"b NOOP " + b"x" * 60000 + b"\r\n")
        time.sleep(0.5)                          # the refusal and the close happen before we read
        r.sock.settimeout(5)
        got = b""
        while True:
            chunk = r.sock.recv(65536)           # a reset raises here
            if not chunk:
                break
            got += chunk
        assert got == b"* BYE Access denied\r\n"
