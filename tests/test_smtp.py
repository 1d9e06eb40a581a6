"""SMTP end to end: real Postfix relays, mmproxy as operators start it, smtplib and raw sockets.

The relays trust only the proxy's own address (mynetworks and smtpd_authorized_xclient_hosts
127.0.0.1/32, where mmproxy listens and connects from); clients come from other 127.x addresses,
so a relay that saw the proxy instead of the client would relay for anyone.  What the tests look
at is what a client sees: reply codes, and the messages in the relays' sink mailboxes.
"""
import base64
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import uuid

import pytest

from mmproxy import smtp, xclient
from mmproxy.testing import DelayProxy, DovecotStore, Postfix, free_port
from mmproxy.testing.base import make_tempdir
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import PopFrom, RawClient, proxy_log, unused_port

CLIENT = "127.0.0.9"          # an anonymous client: not in any relay's mynetworks
SASL_USER, SASL_PW = "sasluser", "sasl-pw"


# ---------------------------------------------------------------------- real parts
@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def sasl_socket():
    """A Dovecot whose auth service answers Postfix's SASL requests (smtpd_sasl_type dovecot)."""
    d = make_tempdir("mmproxy-sasl-")
    sock = os.path.join(d, "auth-postfix")
    ip = "127.0.0.6"
    store = DovecotStore(ip, free_port(ip), free_port(ip), {SASL_USER: SASL_PW},
                         extra_conf="service auth {\n  unix_listener %s {\n    mode = 0666\n  }\n}\n" % sock)
    store.start()
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert time.monotonic() < deadline, "Dovecot made no auth socket"
        time.sleep(0.05)
    yield sock
    store.close()
    shutil.rmtree(d, ignore_errors=True)


def relay_for_proxy(**main_cf):
    """A Postfix that trusts only the proxy's address and relays to example.com; everything lands in its sink."""
    return Postfix(mynetworks="127.0.0.1/32", xclient_hosts="127.0.0.1/32", relay_domains=("example.com",),
                   main_cf=main_cf)


@pytest.fixture(scope="module")
def relay(certs, sasl_socket):
    """The main relay: SASL (AUTH only over TLS, as smtpd_tls_auth_only sites have it), STARTTLS."""
    cert, key = certs
    pf = relay_for_proxy(
        smtpd_sasl_auth_enable="yes", smtpd_sasl_type="dovecot", smtpd_sasl_path=sasl_socket,
        smtpd_relay_restrictions="permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
        smtpd_tls_security_level="may", smtpd_tls_cert_file=cert, smtpd_tls_key_file=key,
        smtpd_tls_auth_only="yes", smtpd_tls_loglevel="1")
    pf.start()
    yield pf
    pf.close()


@pytest.fixture(scope="module")
def relay2():
    """A second, plain relay (no TLS, no SASL) for round robin and failover."""
    pf = relay_for_proxy()
    pf.start()
    yield pf
    pf.close()


@pytest.fixture(scope="module")
def relay_off():
    """A plain relay that offers none of DSN, SMTPUTF8 and CHUNKING."""
    pf = relay_for_proxy(smtpd_discard_ehlo_keywords="chunking, dsn, smtputf8")
    pf.start()
    yield pf
    pf.close()


@pytest.fixture(scope="module")
def proxy_off(mail_stack, relay_off):
    with Proxy(mail_stack.info(), imap=False, smtp=smtp_settings([hp(relay_off)])) as p:
        yield p


def hp(pf):
    return "%s:%d" % (pf.host, pf.port)


def smtp_settings(relays, **extra):
    return {"SmtpRelays": " ".join(relays), "SmtpProxyPassword": "legacy-secret", "FailoverTimeout": 5, **extra}


@pytest.fixture(scope="module")
def proxy(mail_stack, certs, relay):
    """STARTTLS and SMTPS towards clients, POP-before-SMTP on (with the POP service beside it)."""
    with Proxy(mail_stack.info(), imap=False, tls=certs, pop={"AuthServiceTTL": 60},
               smtp=smtp_settings([hp(relay)], PopBeforeSmtpKludgeChannel="tcp_intranet")) as p:
        yield p


@pytest.fixture(scope="module")
def proxy_rr(mail_stack, relay, relay2):
    """Two relays round robin; extra EHLO keywords; no TLS towards clients; plaintext AUTH refused;
    ClientLookup on."""
    with Proxy(mail_stack.info(), imap=False,
               smtp=smtp_settings([hp(relay), hp(relay2)], EhloKeywords="DSN CHUNKING XCLIENT",
                                  RestrictPlainPasswords=True, ClientLookup=True)) as p:
        yield p


# ---------------------------------------------------------------------- helpers
def client(p, source=CLIENT, port=None, helo="client.example.net"):
    c = smtplib.SMTP(p.host, port or p.smtp_port, source_address=(source, 0), timeout=15)
    c.ehlo(helo)
    return c


def message(subject, sender="someone@example.net", to="bob@example.com", body="hello\r\n"):
    return "From: %s\r\nTo: %s\r\nSubject: %s\r\nMessage-ID: <%s@test>\r\n\r\n%s" % (
        sender, to, subject, uuid.uuid4().hex, body)


def subject():
    return "mmproxy test " + uuid.uuid4().hex[:12]


def find(pf, subj):
    return [m for m in pf.messages() if m["Subject"] == subj]


def delivered(pf, subj, timeout=15.0):
    """The message with this subject once it is in the relay's sink (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        found = find(pf, subj)
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError("%r not delivered by %s:%d\n%s" % (subj, pf.host, pf.port, pf.read_log()[-3000:]))
        time.sleep(0.1)


def send(p, pf, source=CLIENT, to="bob@example.com"):
    """One message through the proxy; returns it as the relay delivered it."""
    subj = subject()
    c = client(p, source)
    c.sendmail("someone@example.net", [to], message(subj, to=to))
    c.quit()
    return delivered(pf, subj)


def delivered_any(pfs, subj, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        for pf in pfs:
            found = find(pf, subj)
            if found:
                return found[0]
        assert time.monotonic() < deadline, "%r not delivered" % subj
        time.sleep(0.1)


def not_delivered(p, pf, subj):
    """Nothing with this subject reached the relay: a marker sent afterwards arrives, the subject not."""
    send(p, pf, to="marker@example.com")
    assert not find(pf, subj)


def reply(raw):
    """One (multi-line) SMTP reply from a RawClient: (code, [lines])."""
    lines = []
    while True:
        line = raw.readline()
        assert line, "connection closed; got %r" % lines
        lines.append(line.rstrip(b"\r\n"))
        if line[3:4] != b"-":
            return int(line[:3]), lines


def raw_session(p, source=CLIENT, helo=b"raw.example.net"):
    raw = RawClient(p.host, p.smtp_port, source)
    assert reply(raw)[0] == 220
    raw.send(b"EHLO " + helo + b"\r\n")
    assert reply(raw)[0] == 250
    return raw


# ---------------------------------------------------------------------- the real client reaches the relay
def test_message_arrives_with_the_client_address(proxy, relay):
    """XCLIENT: Postfix's Received header names the client and its HELO, not the proxy."""
    msg = send(proxy, relay)
    received = msg.get_all("Received")[-1]
    assert "[%s]" % CLIENT in received and "client.example.net" in received, received
    assert "127.0.0.1" not in received


def test_curl_sends_through_the_proxy(proxy, relay, tmp_path):
    """A second real client: curl's SMTP (EHLO, MAIL, RCPT, DATA), from 127.0.0.9 via --interface."""
    subj = subject()
    f = tmp_path / "mail.eml"
    f.write_bytes(message(subj).encode())
    r = subprocess.run(["curl", "-sS", "--max-time", "20", "--interface", CLIENT,
                        "smtp://%s:%d" % (proxy.host, proxy.smtp_port), "--mail-from", "someone@example.net",
                        "--mail-rcpt", "bob@example.com", "--upload-file", str(f)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "[%s]" % CLIENT in delivered(relay, subj).get_all("Received")[-1]


def test_foreign_domain_refused_for_an_anonymous_client(proxy):
    """The relay trusts 127.0.0.1 (the proxy), so this 554 proves it judged 127.0.0.9."""
    c = client(proxy)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        c.sendmail("someone@example.net", ["victim@foreign.test"], message(subject()))
    assert e.value.recipients["victim@foreign.test"][0] == 554
    c.quit()


def test_legacy_password_never_sent(proxy, relay):
    send(proxy, relay)
    assert "legacy-secret" not in relay.read_log()
    assert "legacy-secret" not in proxy_log(proxy)


def test_client_lookup_names_the_client(proxy_rr, relay, relay2):
    """ClientLookup yes: the forward-confirmed reverse name goes to the relay (XCLIENT NAME)."""
    subj = subject()
    c = client(proxy_rr, "127.0.0.1")
    c.sendmail("someone@example.net", ["bob@example.com"], message(subj))
    c.quit()
    assert "localhost [127.0.0.1]" in delivered_any((relay, relay2), subj).get_all("Received")[-1]


def test_client_lookup_per_virtual_domain(mail_stack, relay2, tmp_path):
    """vdmap.cfg: ClientLookup yes for the sessions on 127.0.0.5 only (the service has it off): the
    relay learns the client's name there, and only there."""
    (tmp_path / "vdmap.cfg").write_text("vdmap named 127.0.0.5\nnamed:ClientLookup yes\n")
    port = free_port("127.0.0.1", "127.0.0.5")
    services = "/opt/SUNWmsgsr/lib/SmtpProxyAService@127.0.0.1:%d|127.0.0.5:%d" % (port, port)
    settings = smtp_settings([hp(relay2)], VirtualDomainFile=str(tmp_path / "vdmap.cfg"))
    with Proxy(mail_stack.info(), imap=False, smtp=settings, aservice={"ServiceList": services}, smtp_port=port):
        for server, name in (("127.0.0.5", "localhost"), ("127.0.0.1", "unknown")):
            subj = subject()
            c = smtplib.SMTP(server, port, source_address=("127.0.0.1", 0), timeout=15)
            c.sendmail("someone@example.net", ["bob@example.com"], message(subj))
            c.quit()
            assert "%s [127.0.0.1]" % name in delivered(relay2, subj).get_all("Received")[-1]


def test_unresolvable_client_is_unknown(proxy_rr, relay, relay2):
    subj = subject()
    c = client(proxy_rr)
    c.sendmail("someone@example.net", ["bob@example.com"], message(subj))
    c.quit()
    assert "unknown [%s]" % CLIENT in delivered_any((relay, relay2), subj).get_all("Received")[-1]


@pytest.mark.parametrize("helo", ["a" * 251 + ".net", "long" + "+x" * 120], ids=["255", "xtext-485"])
def test_long_helo_names(proxy, relay, helo):
    """HELO goes in XCLIENT when its xtext form fits Postfix's 255 octets, else as [UNAVAILABLE]; either
    way the client's own EHLO reaches the relay next, so the Received header names it."""
    subj = subject()
    c = client(proxy, helo=helo)
    c.sendmail("someone@example.net", ["bob@example.com"], message(subj))
    c.quit()
    received = delivered(relay, subj).get_all("Received")[-1]
    assert "[%s]" % CLIENT in received
    assert helo in "".join(received.split()), received


# ---------------------------------------------------------------------- relays: round robin, failover
def test_round_robin_over_two_relays(proxy_rr, relay, relay2):
    subjects = [subject() for _ in range(4)]
    for s in subjects:
        c = client(proxy_rr)
        c.sendmail("someone@example.net", ["bob@example.com"], message(s))
        c.quit()
    where = []
    for s in subjects:
        deadline = time.monotonic() + 15
        while not (find(relay, s) or find(relay2, s)):
            assert time.monotonic() < deadline, "%s not delivered" % s
            time.sleep(0.1)
        where.append(1 if find(relay, s) else 2)
    assert where in ([1, 2, 1, 2], [2, 1, 2, 1]), where


def blackhole():
    """A listener that never accepts: connects succeed (backlog), no greeting ever comes."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_relay_down_failover_and_avoidance(mail_stack, relay2):
    """A relay that stops greeting fails after FailoverTimeout (1 s) and the session goes on to the
    next one; the failed relay is then avoided (later sessions do not wait for it)."""
    slow = DelayProxy(relay2.host, relay2.port)        # relay2 again, behind a forwarder we can stall
    slow.start()
    try:
        with Proxy(mail_stack.info(), imap=False,
                   smtp=smtp_settings(["127.0.0.1:%d" % slow.port, hp(relay2)], FailoverTimeout=1)) as p:
            slow.delay = 3.0                            # greetings now come after 3 s: too late
            times, subjects = [], []
            for _ in range(4):
                t = time.monotonic()
                c = client(p)
                times.append(time.monotonic() - t)
                subjects.append(subject())
                c.sendmail("someone@example.net", ["bob@example.com"], message(subjects[-1]))
                c.quit()
            # round robin: one of the first two sessions started at the stalled relay and waited 1 s
            assert max(times[:2]) >= 0.9 and min(times[:2]) < 0.8, times
            assert max(times[2:]) < 0.8, times          # avoided since
            for s in subjects:
                assert "[%s]" % CLIENT in delivered(relay2, s).get_all("Received")[-1]
            log = proxy_log(p)
            assert "relay 127.0.0.1:%d failed" % slow.port in log and "avoided for 1 minute" in log, log[-2000:]
    finally:
        slow.stop()


def test_failover_timeout_bounds_the_wait(mail_stack):
    """Only a silent relay: the client gets 421 after about FailoverTimeout seconds, not a hang."""
    hole = blackhole()
    try:
        with Proxy(mail_stack.info(), imap=False,
                   smtp=smtp_settings(["127.0.0.1:%d" % hole.getsockname()[1]], FailoverTimeout=1)) as p:
            time.sleep(1.5)              # let the start-up probe's session finish its own attempt
            t = time.monotonic()
            with pytest.raises(smtplib.SMTPConnectError) as e:
                smtplib.SMTP(p.host, p.smtp_port, source_address=(CLIENT, 0), timeout=15)
            took = time.monotonic() - t
            assert e.value.smtp_code == 421
            assert 0.8 <= took < 5, took
    finally:
        hole.close()


def test_all_relays_down_gets_421(mail_stack):
    with Proxy(mail_stack.info(), imap=False,
               smtp=smtp_settings(["127.0.0.1:%d" % unused_port(), "127.0.0.1:%d" % unused_port()])) as p:
        raw = RawClient(p.host, p.smtp_port, CLIENT)
        code, lines = reply(raw)
        assert (code, lines[0].decode()) == (421, smtp.RELAY_DOWN)
        assert raw.read_all(timeout=5) == b""        # and the proxy hangs up


def test_relay_refusing_xclient_is_never_used(mail_stack):
    """A relay that does not authorise the proxy for XCLIENT: 421, and nothing reaches it as the proxy."""
    pf = Postfix(mynetworks="127.0.0.1/32", xclient_hosts="127.0.0.250/32", relay_domains=("example.com",))
    pf.start()
    try:
        with Proxy(mail_stack.info(), imap=False, smtp=smtp_settings([hp(pf)])) as p:
            with pytest.raises(smtplib.SMTPConnectError) as e:
                smtplib.SMTP(p.host, p.smtp_port, source_address=(CLIENT, 0), timeout=15)
            assert e.value.smtp_code == 421
            assert e.value.smtp_error.decode() == smtp.HANDOVER_REFUSED[4:]
            time.sleep(0.5)
        assert pf.messages() == []
        assert "MAIL" not in pf.read_log() and "client=" not in pf.read_log()
    finally:
        pf.close()


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_protocol_towards_the_relay(mail_stack, version):
    """SmtpRelayProxyProtocol: the relay (smtpd_upstream_proxy_protocol haproxy) learns the client from
    the PROXY header; it offers no XCLIENT to 127.0.0.9, and none is needed."""
    pf = relay_for_proxy(smtpd_upstream_proxy_protocol="haproxy")
    pf.start()
    try:
        with Proxy(mail_stack.info(), imap=False, smtp=smtp_settings([hp(pf)], SmtpRelayProxyProtocol=version)) as p:
            msg = send(p, pf)
            assert "[%s]" % CLIENT in msg.get_all("Received")[-1]
            c = client(p)
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                c.sendmail("someone@example.net", ["victim@foreign.test"], message(subject()))
            c.quit()
    finally:
        pf.close()


def test_refresh_switches_relays_without_a_restart(mail_stack, relay, relay2):
    """SIGHUP: new sessions use the new SmtpRelays; the session open across the refresh keeps its relay."""
    with Proxy(mail_stack.info(), imap=False, smtp=smtp_settings([hp(relay)])) as p:
        before = client(p)
        p.settings["smtp"]["SmtpRelays"] = hp(relay2)
        p.write_config()
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration refreshed" not in proxy_log(p):
            assert time.monotonic() < deadline, proxy_log(p)[-2000:]
            time.sleep(0.05)
        assert "[%s]" % CLIENT in send(p, relay2).get_all("Received")[-1]
        subj = subject()
        before.sendmail("someone@example.net", ["bob@example.com"], message(subj))
        before.quit()
        delivered(relay, subj)


# ---------------------------------------------------------------------- EHLO, PIPELINING, TLS, AUTH
def test_ehlo_keywords_filtered(proxy, proxy_rr, proxy_off):
    c = client(proxy)
    f = c.esmtp_features
    assert {"pipelining", "8bitmime", "size", "enhancedstatuscodes", "etrn", "starttls", "auth",
            "dsn", "smtputf8", "chunking"} <= set(f), f
    for hidden in ("xclient", "xforward", "vrfy", "binarymime"):
        assert hidden not in f, f
    c.quit()
    c = client(proxy_rr)
    f = c.esmtp_features
    assert "dsn" in f and "chunking" in f
    assert "xclient" not in f                           # listed in EhloKeywords, but never passed
    assert "starttls" not in f                          # this proxy cannot do TLS itself
    assert "auth" not in f                              # RestrictPlainPasswords, no TLS
    c.quit()
    c = client(proxy_off)                               # a relay that offers none of them
    f = c.esmtp_features
    assert not {"dsn", "smtputf8", "chunking"} & set(f), f
    c.quit()


def test_pipelined_commands_answered_in_order(proxy, relay):
    raw = raw_session(proxy)
    subj = subject()
    raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<x@foreign.test>\r\n"
             b"RCPT TO:<carol@example.com>\r\nNOOP\r\nDATA\r\n")
    codes = [reply(raw)[0] for _ in range(6)]
    assert codes == [250, 250, 554, 250, 250, 354], codes
    # the end of data and the commands after it in one write: each answered, in order
    raw.send(message(subj).encode() + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    codes = [reply(raw)[0] for _ in range(4)]
    assert codes == [250, 250, 250, 221], codes
    msg = delivered(relay, subj)
    assert "[%s]" % CLIENT in msg.get_all("Received")[-1]


def test_starttls_towards_the_client(proxy, relay):
    c = client(proxy)
    assert "starttls" in c.esmtp_features
    c.starttls(context=ssl._create_unverified_context())
    c.ehlo("client.example.net")
    assert "starttls" not in c.esmtp_features
    subj = subject()
    c.sendmail("someone@example.net", ["bob@example.com"], message(subj))
    c.quit()
    assert "[%s]" % CLIENT in delivered(relay, subj).get_all("Received")[-1]


def test_smtps_implicit_tls(proxy, relay):
    c = smtplib.SMTP_SSL(proxy.host, proxy.smtps_port, source_address=(CLIENT, 0), timeout=15,
                         context=ssl._create_unverified_context())
    c.ehlo("client.example.net")
    assert "starttls" not in c.esmtp_features
    subj = subject()
    c.sendmail("someone@example.net", ["bob@example.com"], message(subj))
    c.quit()
    delivered(relay, subj)


def test_plaintext_pipelined_after_starttls_is_dropped(proxy):
    raw = raw_session(proxy)
    raw.send(b"STARTTLS\r\nMAIL FROM:<someone@example.net>\r\n")
    assert reply(raw)[0] == 220
    tls = ssl._create_unverified_context().wrap_socket(raw.sock, server_hostname="localhost")
    tls.sendall(b"EHLO again.example.net\r\nRCPT TO:<bob@example.com>\r\nQUIT\r\n")
    data = b""
    while data.count(b"\r\n221") == 0:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    assert b"\r\n503 " in data, data        # RCPT without MAIL: the pipelined MAIL was never run
    tls.close()


def test_starttls_forgets_what_came_before(proxy, relay):
    """RFC 3207 4.2: what was learnt before TLS is discarded, at the relay too (the client is
    introduced anew): without a new EHLO the pre-TLS name is gone; with one, the relay has it."""
    for ehlo in (b"EHLO", b"HELO"):
        raw = raw_session(proxy, helo=b"before-tls.example.net")
        raw.send(b"STARTTLS\r\n")
        assert reply(raw)[0] == 220
        raw.sock, raw.buf = ssl._create_unverified_context().wrap_socket(raw.sock, server_hostname="localhost"), b""
        raw.send(b"NOOP\r\nMAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\nAUTH PLAIN\r\n"
                 b"RSET\r\nBDAT 5 LAST\r\nhelloMAIL FROM:<someone@example.net>\r\n")
        assert [reply(raw) for _ in range(7)] == [(250, [b"250 2.0.0 Ok"])] + [(503, [smtp.EHLO_FIRST.encode()])] * 3 \
            + [(250, [b"250 2.0.0 Ok"])] + [(503, [smtp.EHLO_FIRST.encode()])] * 2
        raw.send(ehlo + b" again.example.net\r\n")
        code, lines = reply(raw)
        assert code == 250 and b"STARTTLS" not in b"".join(lines)
        subj = subject()
        raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        assert [reply(raw)[0] for _ in range(3)] == [250, 250, 354]
        raw.send(message(subj).encode() + b".\r\nQUIT\r\n")
        assert [reply(raw)[0] for _ in range(2)] == [250, 221]
        received = delivered(relay, subj).get_all("Received")[-1]
        assert "[%s]" % CLIENT in received and "before-tls" not in received, received
        assert "again.example.net" in received, received


def test_relay_leg_tls_and_auth_passthrough(proxy, relay):
    """The relay offers AUTH only over TLS (smtpd_tls_auth_only): the client sees AUTH because the proxy
    used STARTTLS towards the relay; AUTH goes through unchanged and the relay verifies it."""
    c = client(proxy)
    assert "PLAIN" in c.esmtp_features.get("auth", "").upper()
    code, _ = c.login(SASL_USER, SASL_PW)
    assert code == 235
    subj = subject()
    c.sendmail("someone@example.net", ["friend@foreign.test"], message(subj, to="friend@foreign.test"))
    c.quit()
    delivered(relay, subj)
    log = relay.read_log()
    assert "TLS connection established from" in log
    assert "sasl_username=%s" % SASL_USER in log


def test_wrong_password_refused_by_the_relay(proxy):
    c = client(proxy)
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        c.login(SASL_USER, "wrong")
    assert e.value.smtp_code == 535
    c.quit()


def test_auth_multi_step_login_mechanism(proxy):
    raw = raw_session(proxy)
    raw.send(b"AUTH LOGIN\r\n")
    assert reply(raw)[0] == 334
    raw.send(base64.b64encode(SASL_USER.encode()) + b"\r\n")
    assert reply(raw)[0] == 334
    raw.send(base64.b64encode(SASL_PW.encode()) + b"\r\n")
    assert reply(raw)[0] == 235
    raw.send(b"QUIT\r\n")
    assert reply(raw)[0] == 221


def test_plaintext_auth_refused_without_tls(proxy_rr):
    c = client(proxy_rr)
    plain = base64.b64encode(b"\0%s\0%s" % (SASL_USER.encode(), SASL_PW.encode())).decode()
    for sep in (" ", "\t", "\x0b"):             # whatever blank stands after the mechanism
        code, text = c.docmd("AUTH", "PLAIN" + sep + plain)
        assert (code, "%d %s" % (code, text.decode())) == (538, smtp.NEED_TLS)
    c.quit()


def test_restrict_plain_passwords_on_every_mechanism_until_tls(mail_stack, certs, relay):
    """RestrictPlainPasswords: before TLS no AUTH is advertised and PLAIN and LOGIN, with or without
    an initial response, get 538 unseen by the relay; after STARTTLS, or on the implicit-TLS port,
    AUTH is advertised and each of them reaches the relay (RFC 4954, RFC 3207)."""
    plain = base64.b64encode(b"\0%s\0%s" % (SASL_USER.encode(), SASL_PW.encode()))
    user, pw = base64.b64encode(SASL_USER.encode()), base64.b64encode(SASL_PW.encode())
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with Proxy(mail_stack.info(), imap=False, tls=certs,
               smtp=smtp_settings([hp(relay)], RestrictPlainPasswords=True)) as p:
        raw = raw_session(p)
        raw.send(b"EHLO raw.example.net\r\n")
        code, lines = reply(raw)
        assert code == 250 and lines[-1] == b"250 STARTTLS", lines
        assert not [line for line in lines if line[4:].upper().startswith(b"AUTH")], lines
        for line in (b"AUTH PLAIN " + plain, b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH LOGIN " + user,
                     b"auth plain " + plain, b"AUTH PLAIN ="):
            raw.send(line + b"\r\n")
            raw.expect_lines(smtp.NEED_TLS)
        raw.send(b"STARTTLS\r\n")
        raw.expect_lines(smtp.TLS_GO)
        raw.sock = ctx.wrap_socket(raw.sock)
        raw.send(b"EHLO raw.example.net\r\n")
        code, lines = reply(raw)
        assert code == 250 and b"250-AUTH PLAIN LOGIN" in lines, lines
        assert b"STARTTLS" not in b" ".join(lines)
        raw.send(b"AUTH PLAIN " + plain + b"\r\n")
        raw.expect_lines("235 2.7.0 Authentication successful")
        for dialogue in ([b"AUTH PLAIN", plain], [b"AUTH LOGIN " + user, pw], [b"AUTH LOGIN", user, pw]):
            raw = RawClient(p.host, p.smtps_port, CLIENT)
            raw.sock = ctx.wrap_socket(raw.sock)
            assert reply(raw)[0] == 220
            raw.send(b"EHLO raw.example.net\r\n")
            assert b"250-AUTH PLAIN LOGIN" in reply(raw)[1]
            for line in dialogue[:-1]:
                raw.send(line + b"\r\n")
                assert reply(raw)[0] == 334
            raw.send(dialogue[-1] + b"\r\n")
            raw.expect_lines("235 2.7.0 Authentication successful")


def test_restrict_plain_passwords_refuses_every_mechanism_that_sends_a_secret(mail_stack, certs):
    """Not only PLAIN and LOGIN: a relay may offer mechanisms that send a bearer token (XOAUTH2,
    OAUTHBEARER; Dovecot checks the password as the token).  Before TLS only those that never send
    the secret itself are advertised and passed (CRAM-MD5 here); the others get the proxy's 538,
    and work after STARTTLS."""
    d = make_tempdir("mmproxy-sasl-")
    sock, ip = os.path.join(d, "auth-postfix"), "127.0.0.6"
    store = DovecotStore(ip, free_port(ip), free_port(ip), {SASL_USER: SASL_PW}, extra_conf=(
        "auth_mechanisms = plain login xoauth2 oauthbearer cram-md5\n"
        "service auth {\n  unix_listener %s {\n    mode = 0666\n  }\n}\n" % sock))
    pf = relay_for_proxy(smtpd_sasl_auth_enable="yes", smtpd_sasl_type="dovecot", smtpd_sasl_path=sock)
    token = base64.b64encode(b"user=%s\x01auth=Bearer %s\x01\x01" % (SASL_USER.encode(), SASL_PW.encode()))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        store.start()
        pf.start()
        with Proxy(mail_stack.info(), imap=False, tls=certs,
                   smtp=smtp_settings([hp(pf)], RestrictPlainPasswords=True)) as p:
            raw = raw_session(p)
            raw.send(b"EHLO raw.example.net\r\n")
            code, lines = reply(raw)
            assert [line for line in lines if line[4:].startswith(b"AUTH")] == [b"250-AUTH CRAM-MD5"], lines
            for line in (b"AUTH XOAUTH2 " + token, b"AUTH OAUTHBEARER", b"AUTH xoauth2", b"AUTH X-UNKNOWN-MECH"):
                raw.send(line + b"\r\n")
                raw.expect_lines(smtp.NEED_TLS)
            raw.send(b"AUTH CRAM-MD5\r\n")
            assert reply(raw)[0] == 334
            raw.send(b"*\r\n")
            assert reply(raw)[0] == 501
            raw.send(b"STARTTLS\r\n")
            raw.expect_lines(smtp.TLS_GO)
            raw.sock = ctx.wrap_socket(raw.sock)
            raw.send(b"EHLO raw.example.net\r\n")
            code, lines = reply(raw)
            assert b"250-AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER CRAM-MD5" in lines, lines
            raw.send(b"AUTH XOAUTH2 " + token + b"\r\n")
            raw.expect_lines("235 2.7.0 Authentication successful")
    finally:
        pf.close()
        store.close()
        shutil.rmtree(d, ignore_errors=True)


def test_passwords_never_logged(proxy):
    c = client(proxy)
    c.login(SASL_USER, SASL_PW)
    c.quit()
    log = proxy_log(proxy)
    token = base64.b64encode(b"\0%s\0%s" % (SASL_USER.encode(), SASL_PW.encode())).decode()
    assert SASL_PW not in log and token not in log
    assert "AUTH PLAIN ********" in log


# ---------------------------------------------------------------------- hostile input
@pytest.mark.parametrize("text", [b"line one\nline two\r\n", b"line one\rline two\r\n"], ids=["bare-LF", "bare-CR"])
def test_bare_cr_or_lf_in_data_refused(proxy, relay, text):
    """SMTP smuggling: a second message hidden behind a non-standard end of data is never relayed."""
    raw = raw_session(proxy)
    subj, smuggled = subject(), subject()
    raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert [reply(raw)[0] for _ in range(3)] == [250, 250, 354]
    eod = b"\n.\r\n" if b"\n" in text[:-2] else b"\r.\r\n"
    raw.send(b"Subject: " + subj.encode() + b"\r\n\r\n" + text + eod +
             b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nSubject: " +
             smuggled.encode() + b"\r\n\r\nsmuggled\r\n.\r\n")
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (550, smtp.BARE_EOL)
    raw.send(b"NOOP\r\n")                              # pipelined after the end of data: answered
    assert raw.read_all(timeout=10) == smtp.AFTER_REFUSAL.encode() + b"\r\n"   # then the connection closes
    not_delivered(proxy, relay, subj)
    assert not find(relay, smuggled)


def test_overlong_data_line_refused(proxy, relay):
    raw = raw_session(proxy)
    subj = subject()
    raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert [reply(raw)[0] for _ in range(3)] == [250, 250, 354]
    raw.send(b"Subject: " + subj.encode() + b"\r\n\r\n" + b"x" * (smtp.MAX_DATA_LINE + 10) + b"\r\n.\r\nNOOP\r\n")
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (552, smtp.DATA_LINE_TOO_LONG)
    assert raw.read_all(timeout=10) == smtp.AFTER_REFUSAL.encode() + b"\r\n"
    not_delivered(proxy, relay, subj)


def test_long_data_lines_within_the_bound_pass_unchanged(proxy, relay):
    subj = subject()
    line = "y" * 5000
    c = client(proxy)
    c.sendmail("someone@example.net", ["bob@example.com"], message(subj, body=line + "\r\n"))
    c.quit()
    assert line in delivered(relay, subj).get_payload().replace("\n", "").replace("\r", "")


def test_client_xclient_and_xforward_refused(proxy, relay):
    raw = raw_session(proxy)
    raw.send(b"XCLIENT ADDR=127.0.0.1 NAME=localhost\r\n")
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (550, smtp.NOT_PROXIED)
    raw.send(b"XFORWARD ADDR=127.0.0.1\r\n")
    assert reply(raw)[0] == 550
    # still the real client at the relay: foreign domains refused
    raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<victim@foreign.test>\r\nQUIT\r\n")
    assert [reply(raw)[0] for _ in range(3)] == [250, 554, 221]
    assert "XCLIENT ADDR=127.0.0.1" not in relay.read_log()


def test_bdat_not_offered_and_its_chunk_never_runs(proxy_off):
    raw = raw_session(proxy_off)
    chunk = b"RSET\r\nMAIL FROM:<a@b.c>\r\n"
    raw.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (502, smtp.NO_BDAT)
    assert reply(raw)[0] == 250                         # the NOOP; the chunk was skipped, not run
    raw.send(b"RCPT TO:<bob@example.com>\r\n")
    assert reply(raw)[0] == 503                         # no MAIL was ever given


# ---------------------------------------------------------------------- CHUNKING, SMTPUTF8, DSN
def test_bdat_chunks_reach_the_relay_and_are_never_run(proxy, relay):
    """CHUNKING (RFC 3030): chunks are read by their size, whatever they hold (here lines that look
    like commands and a lone dot), and the relay gets the message as sent."""
    subj = subject()
    text = message(subj, body="RSET\r\nMAIL FROM:<evil@example.net>\r\n.\r\nbye\r\n").encode()
    cut = text.index(b"\r\n") + 1                    # the first chunk ends between CR and LF
    first, last = text[:cut], text[cut:]
    raw = raw_session(proxy)
    raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\n"
             + b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(last) + last + b"NOOP\r\n")
    assert [reply(raw)[0] for _ in range(5)] == [250, 250, 250, 250, 250]
    msg = delivered(relay, subj)
    assert "[%s]" % CLIENT in msg.get_all("Received")[-1]
    assert "MAIL FROM:<evil@example.net>\n.\nbye" in msg.get_payload().replace("\r\n", "\n")
    raw.send(b"QUIT\r\n")
    assert reply(raw)[0] == 221


@pytest.mark.parametrize("chunks", [[b"line one\nline two\r\n"], [b"line one\r", b"line two\r\n"]],
                         ids=["bare-LF", "CR-then-no-LF-across-chunks"])
def test_bdat_bare_line_ends_refused(proxy, relay, chunks):
    subj = subject()
    raw = raw_session(proxy)
    raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\n")
    assert [reply(raw)[0] for _ in range(2)] == [250, 250]
    chunks = [b"Subject: " + subj.encode() + b"\r\n\r\n" + chunks[0]] + chunks[1:]
    for i, chunk in enumerate(chunks):
        last = b" LAST" if i == len(chunks) - 1 else b""
        raw.send(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
        if last:
            code, lines = reply(raw)
            assert (code, lines[0].decode()) == (550, smtp.BARE_EOL)
        else:
            assert reply(raw)[0] == 250                 # nothing wrong yet: the LF may still come
    raw.send(b"NOOP\r\n")
    assert raw.read_all(timeout=10) == smtp.AFTER_REFUSAL.encode() + b"\r\n"
    not_delivered(proxy, relay, subj)


@pytest.mark.parametrize("line", [b"BDAT lots", b"BDAT 12 LAST\x00", b"BDAT 12 LAST\r", b"BDAT", b"bdat -1",
                                  b"BDAT 12 LAST NOW", b" BDAT x", b"\tBDAT 1\xd9\xa4"])
def test_bdat_without_a_readable_size_closes_with_421(proxy, line):
    """Nobody can tell where such a chunk ends (or whether one follows): refused, then a goodbye, then
    the close; the chunk is never run as commands."""
    raw = raw_session(proxy)
    raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\n")
    assert [reply(raw)[0] for _ in range(2)] == [250, 250]
    raw.send(line + b"\r\nNOOP\r\nNOOP\r\n")
    assert reply(raw) == (501, [smtp.BAD_BDAT.encode()])
    assert reply(raw) == (421, [smtp.BDAT_LOST.encode()])
    raw.expect_close()


def test_bdat_with_tabs_is_a_chunk(proxy, relay):
    subj = subject()
    text = message(subj).encode()
    raw = raw_session(proxy)
    raw.send(b"MAIL FROM:<someone@example.net>\r\nRCPT TO:<bob@example.com>\r\n"
             + b"BDAT\t%d\tlast\r\n" % len(text) + text + b"NOOP\r\n")
    assert [reply(raw)[0] for _ in range(4)] == [250, 250, 250, 250]
    delivered(relay, subj)


def test_smtputf8_on_and_off(proxy, relay, proxy_off):
    subj = subject()
    raw = raw_session(proxy)
    raw.send("MAIL FROM:<jürgen@exämple.net> SMTPUTF8\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n".encode())
    assert [reply(raw)[0] for _ in range(3)] == [250, 250, 354]
    raw.send(("From: Jürgen <jürgen@exämple.net>\r\nSubject: %s\r\n\r\nGrüße\r\n.\r\n" % subj).encode())
    assert reply(raw)[0] == 250
    msg = delivered(relay, subj)
    assert "jürgen@exämple.net".encode() in msg.as_bytes()
    raw = raw_session(proxy_off)                        # the relay does not offer it: its refusal reaches the client
    raw.send("MAIL FROM:<jürgen@exämple.net> SMTPUTF8\r\n".encode())
    assert reply(raw) == (501, [b"501 5.1.7 Bad sender address syntax"])


def test_dsn_parameters_reach_the_relay(proxy, relay, proxy_off, relay_off):
    """NOTIFY=SUCCESS through the proxy: the relay reports the delivery to the sender (into its sink),
    with the client's ENVID.  A relay without DSN refuses the parameters, and the client hears it."""
    envid = "mmproxy-" + uuid.uuid4().hex[:12]
    subj = subject()
    raw = raw_session(proxy)
    raw.send(b"MAIL FROM:<someone@example.net> RET=HDRS ENVID=" + envid.encode()
             + b"\r\nRCPT TO:<bob@example.com> NOTIFY=SUCCESS ORCPT=rfc822;bob@example.com\r\nDATA\r\n")
    assert [reply(raw)[0] for _ in range(3)] == [250, 250, 354]
    raw.send(message(subj).encode() + b".\r\n")
    assert reply(raw)[0] == 250
    delivered(relay, subj)
    deadline = time.monotonic() + 15
    while not [m for m in relay.messages() if envid in m.as_string() and "delivery-status" in m.as_string()]:
        assert time.monotonic() < deadline, "no success DSN with %s in the relay's sink" % envid
        time.sleep(0.2)
    raw = raw_session(proxy_off)
    raw.send(b"MAIL FROM:<someone@example.net> RET=HDRS ENVID=x\r\n")
    assert reply(raw) == (501, [b"501 5.7.1 DSN support is disabled"])


def test_auth_exchange_with_an_overlong_response(proxy):
    """An over-long line inside AUTH: the exchange is cancelled at the relay, the client is told, and
    the session goes on; a line past every bound ends it with 421."""
    raw = raw_session(proxy)
    raw.send(b"AUTH LOGIN\r\n")
    assert reply(raw)[0] == 334
    raw.send(b"A" * (smtp.MAX_COMMAND_LINE * 2) + b"\r\n")
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (500, smtp.LINE_TOO_LONG)
    raw.send(b"NOOP\r\n")
    assert reply(raw)[0] == 250
    raw.send(b"AUTH LOGIN\r\n")
    assert reply(raw)[0] == 334
    raw.send(b"A" * (smtp.MAX_SKIP + smtp.MAX_COMMAND_LINE * 2) + b"\r\n")
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (421, smtp.SKIP_TOO_LONG)


def test_overlong_command_line_answered_and_session_goes_on(proxy):
    raw = raw_session(proxy)
    raw.send(b"NOOP " + b"z" * (smtp.MAX_COMMAND_LINE * 3) + b"\r\nNOOP\r\n")
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (500, smtp.LINE_TOO_LONG)
    assert reply(raw)[0] == 250


def test_bad_command_budget(proxy):
    raw = raw_session(proxy)
    raw.send(b"".join(b"BOGUS%d\r\n" % i for i in range(12)))
    codes = [reply(raw)[0] for _ in range(10)]
    assert codes == [502] * 10
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (421, smtp.TOO_MANY)
    assert raw.read_all(timeout=5) == b""


def test_control_characters_in_commands_refused(proxy):
    raw = raw_session(proxy)
    raw.send(b"MAIL FROM:<a@b.c>\rRCPT TO:<x@foreign.test>\r\n")
    code, lines = reply(raw)
    assert (code, lines[0].decode()) == (501, smtp.BAD_SYNTAX)


def test_idle_client_gets_421_and_shutdown_says_421(mail_stack, relay2):
    with Proxy(mail_stack.info(), imap=False, smtp=smtp_settings([hp(relay2)], Timeout=2)) as p:
        raw = raw_session(p)
        t = time.monotonic()
        code, lines = reply(raw)
        assert (code, lines[0].decode()) == (421, smtp.TIMEOUT)
        assert 1.5 < time.monotonic() - t < 6
        raw = raw_session(p)
        p.stop()                                        # SIGTERM: sessions are told, then closed
        code, lines = reply(raw)
        assert (code, lines[0].decode()) == (421, smtp.SHUTDOWN)


# ---------------------------------------------------------------------- POP before SMTP
def test_pop_before_smtp(proxy, relay, mail_stack):
    """Refused to a foreign domain before a POP login from the client's address, accepted after it."""
    source = "127.0.0.20"
    c = client(proxy, source)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        c.sendmail("alice@example.com", ["friend@foreign.test"], message(subject(), to="friend@foreign.test"))
    c.quit()
    pop = PopFrom(proxy.host, proxy.pop_port, source)
    pop.user("alice@example.com")
    assert pop.pass_(mail_stack.info()["users"]["alice"]["password"]).startswith(b"+OK")
    pop.quit()
    subj = subject()
    c = client(proxy, source)
    c.sendmail("alice@example.com", ["friend@foreign.test"], message(subj, to="friend@foreign.test"))
    c.quit()
    delivered(relay, subj)
    assert "sasl_method=XCLIENT, sasl_username=alice@example.com" in relay.read_log()


# ---------------------------------------------------------------------- pure logic
def test_xtext_and_xclient_splitting():
    assert xclient.xtext(b"a+b=c d\xff") == "a+2Bb+3Dc+20d+FF"
    attrs = [("HELO", "h" * 250), ("PROTO", "ESMTP"), ("LOGIN", "u" * 250), ("PORT", "1"), ("NAME", "n" * 200),
             ("ADDR", "127.0.0.9")]
    cmds = xclient.xclient_commands(attrs)
    assert len(cmds) == 2 and all(len(c) <= xclient.XCLIENT_MAX for c in cmds), cmds
    assert cmds[-1].endswith(" NAME=%s ADDR=127.0.0.9" % ("n" * 200))
    assert all("ADDR=" not in c and "NAME=" not in c for c in cmds[:-1])
    assert "".join(cmds).count("=") == len(attrs)
    assert xclient.xclient_commands([("HELO", "h" * 256), ("ADDR", "127.0.0.9")]) == \
        ["XCLIENT HELO=[UNAVAILABLE] ADDR=127.0.0.9"]


def test_proxy_protocol_headers():
    assert xclient.proxy_header(1, ("127.0.0.9", 1234), ("127.0.0.1", 25)) == \
        b"PROXY TCP4 127.0.0.9 127.0.0.1 1234 25\r\n"
    assert xclient.proxy_header(1, ("::ffff:127.0.0.9", 1234), ("::ffff:127.0.0.1", 25)) == \
        b"PROXY TCP4 127.0.0.9 127.0.0.1 1234 25\r\n"
    assert xclient.proxy_header(1, ("2001:db8::9", 1234), ("2001:db8::1", 587)) == \
        b"PROXY TCP6 2001:db8::9 2001:db8::1 1234 587\r\n"
    assert xclient.proxy_header(1, ("127.0.0.9", 1), ("2001:db8::1", 2)) == \
        b"PROXY TCP6 ::ffff:7f00:9 2001:db8::1 1 2\r\n"
    v2 = xclient.proxy_header(2, ("127.0.0.9", 1234), ("127.0.0.1", 25))
    assert v2 == (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + bytes([127, 0, 0, 9, 127, 0, 0, 1])
                  + (1234).to_bytes(2, "big") + (25).to_bytes(2, "big"))
    v2 = xclient.proxy_header(2, ("2001:db8::9", 1234), ("2001:db8::1", 25))
    assert v2[12:16] == b"\x21\x21\x00\x24" and len(v2) == 16 + 36


def test_xclient_addr_forms():
    assert xclient.xclient_addr("127.0.0.9") == "127.0.0.9"
    assert xclient.xclient_addr("::ffff:127.0.0.9") == "127.0.0.9"
    assert xclient.xclient_addr("2001:db8::9") == "IPV6:2001:db8::9"


def test_auth_failures_delay_only_with_smtp_badguys(mail_stack, proxy, relay):
    """The seed: BadGuys does not apply to the SMTP proxy, so the relay's 535 delays nothing by
    default; SmtpBadGuys yes (an mmproxy extension) makes it count with the BG parameters of
    SmtpProxyAService.cfg; a success after failures waits once and is forgiven."""
    def attempt(p, password, source):
        c = client(p, source=source)
        t = time.monotonic()
        try:
            c.user, c.password = SASL_USER, password
            code = c.auth("PLAIN", c.auth_plain)[0]          # one AUTH (login() tries every mechanism)
        except smtplib.SMTPAuthenticationError as e:
            code = e.smtp_code
        c.quit()
        return code, time.monotonic() - t

    # Postfix itself answers failed AUTHs later and later (smtpd_error_sleep_time and more): the
    # delays are read from the proxy's log, one line per delayed answer
    def delays(p, source):
        return [line.rsplit("answer delayed ", 1)[1].split("s ")[0] for line in proxy_log(p).splitlines()
                if "BadGuys: answer delayed" in line and "[smtp %s:" % source in line]

    assert [attempt(proxy, "wrong", "127.0.0.93")[0] for _ in range(2)] == [535, 535]
    assert delays(proxy, "127.0.0.93") == []                 # the module's proxy: not delayed
    with Proxy(mail_stack.info(), imap=False, tls=None,
               smtp=smtp_settings([hp(relay)], SmtpBadGuys=True, BGPenalty=1, BGDecay=60)) as p:
        assert [attempt(p, "wrong", "127.0.0.94")[0] for _ in range(2)] == [535, 535]
        assert delays(p, "127.0.0.94") == ["1.0"]
        code, took = attempt(p, SASL_PW, "127.0.0.94")
        assert code == 235 and took >= 2.0 and delays(p, "127.0.0.94") == ["1.0", "2.0"]
        assert attempt(p, "wrong", "127.0.0.94")[0] == 535    # forgiven: not delayed
        assert delays(p, "127.0.0.94") == ["1.0", "2.0"]
