"""Access filters end to end: TCPAccess at connect and the per-user mailAllowedServiceAccess after the
directory lookup, against the real stack (slapd, Dovecot, Postfix), with clients bound to several
127.0.0.x addresses.  Only loopback names: 127.0.0.1 is localhost in /etc/hosts (KNOWN); the other
127.x addresses have no name (UNKNOWN) wherever the resolver looks."""
import imaplib
import re
import socket
import ssl
import time

import pytest

from mmproxy import imap, pop, smtp
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import ImapFrom, PopFrom, RawClient, proxy_log, wait_for_log

pytestmark = pytest.mark.timeout(120)


def relay(stack):
    return {"SmtpRelays": "%s:%d" % (stack.postfix.host, stack.postfix.port), "SmtpProxyPassword": "legacy",
            "FailoverTimeout": 5}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("access-certs")))


@pytest.fixture(scope="module")
def proxy(mail_stack, certs, tmp_path_factory):
    """IMAP, POP and SMTP, each with a TCPAccess of its own (SMTP's in a file), TLS ports too."""
    rules = tmp_path_factory.mktemp("access") / "smtp-access"
    rules.write_text("# SMTP clients\n+smtp,smtps:127.0.0.1\n+smtp:127.0.0.13\n")
    with Proxy(mail_stack.info(), tls=certs,
               imap={"TCPAccess": "-imap:127.0.0.11 127.0.0.12$-imaps:127.0.0.15"},
               pop={"TCPAccess": "-pop,pops:127.0.0.0/255.255.255.0 EXCEPT 127.0.0.1"},
               smtp={**relay(mail_stack), "TCPAccess": str(rules)}) as p:
        yield p


@pytest.fixture(scope="module")
def proxy_nopreauth(mail_stack):
    with Proxy(mail_stack.info(), imap={"PreAuth": False}, pop={"PreAuth": False}) as p:
        yield p


def lines_about(p, needle):
    return [line for line in proxy_log(p).splitlines() if needle in line]


def refused(p, port, source, *lines):
    """A client from ``source`` gets exactly ``lines`` and a close, and one log line says why."""
    r = RawClient(p.host, port, source)
    r.expect_lines(*lines)
    r.expect_close()
    text = wait_for_log(p, "[%s:" % source)
    assert len([ln for ln in text.splitlines() if "[%s:" % source in ln]) == 1, text[-3000:]


# ---------------------------------------------------------------------- TCPAccess at connect
def test_imap_refused_at_connect(proxy):
    refused(proxy, proxy.imap_port, "127.0.0.11", imap.ACCESS_DENIED)
    assert imap.ACCESS_DENIED == "* BYE Access denied"
    line = lines_about(proxy, "[127.0.0.11:")[0]
    assert re.search(r"INFO \[imap\] \[127\.0\.0\.11:\d+\] refused: TCPAccess imap: denied by rule "
                     r"'-imap:127\.0\.0\.11 127\.0\.0\.12'$", line), line
    with ImapFrom(proxy.host, proxy.imap_port, "127.0.0.13") as c:        # not in the rule
        c.login("alice", "alice-pw")


def test_pop_refused_at_connect_except_the_excepted(proxy):
    refused(proxy, proxy.pop_port, "127.0.0.12", pop.ACCESS_DENIED)
    assert pop.ACCESS_DENIED == "-ERR [SYS/PERM] Access denied"
    c = PopFrom(proxy.host, proxy.pop_port, "127.0.0.1")
    c.user("alice")
    c.pass_("alice-pw")
    c.quit()


def test_smtp_refused_at_connect_by_a_filter_file(proxy):
    refused(proxy, proxy.smtp_port, "127.0.0.14", smtp.ACCESS_DENIED)
    assert smtp.ACCESS_DENIED == "421 4.7.0 Access denied"
    for source in ("127.0.0.1", "127.0.0.13"):
        r = RawClient(proxy.host, proxy.smtp_port, source)
        r.expect(b"220 ")
        r.send(b"QUIT\r\n")
        r.skip_to(b"221 ")


def test_implicit_tls_is_a_service_of_its_own_and_refused_over_tls(proxy):
    """-imaps:127.0.0.15: plain IMAP from there is fine; on the imaps port the handshake completes
    and the refusal comes over TLS."""
    with ImapFrom(proxy.host, proxy.imap_port, "127.0.0.15") as c:
        c.login("alice", "alice-pw")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection((proxy.host, proxy.imaps_port), 10, source_address=("127.0.0.15", 0))
    with ctx.wrap_socket(raw) as s:
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data == imap.ACCESS_DENIED.encode() + b"\r\n"
    wait_for_log(proxy, "refused: TCPAccess imaps: denied by rule '-imaps:127.0.0.15'")
    # smtps from 127.0.0.1 is allowed by the file's first rule
    raw = socket.create_connection((proxy.host, proxy.smtps_port), 10, source_address=("127.0.0.1", 0))
    with ctx.wrap_socket(raw) as s:
        assert s.recv(4096).startswith(b"220 ")


@pytest.mark.parametrize("rule", ["-imap:UNKNOWN", "+imap:KNOWN", "+imap:localhost", "-imap:ALL EXCEPT LOCAL"])
def test_host_names_known_and_unknown(mail_stack, rule):
    """127.0.0.1 resolves to localhost (and back): KNOWN, LOCAL, a name; 127.0.0.16 has no name."""
    with Proxy(mail_stack.info(), imap={"TCPAccess": rule}) as p:
        with ImapFrom(p.host, p.imap_port, "127.0.0.1") as c:
            c.login("alice", "alice-pw")
        refused(p, p.imap_port, "127.0.0.16", imap.ACCESS_DENIED)


def test_client_lookup_without_host_name_rules(mail_stack):
    """ClientLookup yes looks every client up; a filter of addresses only never waits for DNS."""
    with Proxy(mail_stack.info(), imap={"TCPAccess": "-imap:127.0.0.17", "ClientLookup": True}) as p:
        with ImapFrom(p.host, p.imap_port, "127.0.0.18") as c:
            c.login("alice", "alice-pw")
        refused(p, p.imap_port, "127.0.0.17", imap.ACCESS_DENIED)


# ---------------------------------------------------------------------- the per-user attribute
def test_per_user_filter_allows_and_denies(proxy, mail_stack):
    """gina: +imap:ALL EXCEPT 127.0.0.22 (allow rules only: nothing else).  PreAuth verified her
    password, so the refusal may say what it is; the store never hears of her."""
    store = mail_stack.stores["127.0.0.2"]
    seen = store.read_log().count("user=<gina>")
    with ImapFrom(proxy.host, proxy.imap_port, "127.0.0.21") as c:
        c.login("gina", "gina-pw")
    deadline = time.monotonic() + 5                 # Dovecot's log process writes a little later
    while store.read_log().count("user=<gina>") == seen and time.monotonic() < deadline:
        time.sleep(0.05)
    before = store.read_log()
    r = RawClient(proxy.host, proxy.imap_port, "127.0.0.22")
    r.expect(b"* OK")
    r.send(b'a LOGIN gina "gina-pw"\r\nb LOGIN gina wrong\r\n')
    r.expect_lines("a " + imap.NO_ACCESS, "b " + imap.NO_AUTH)
    assert imap.NO_ACCESS == "NO [CONTACTADMIN] Access denied"
    r = RawClient(proxy.host, proxy.pop_port, "127.0.0.1")
    r.expect(b"+OK")
    r.send(b"USER gina\r\nPASS gina-pw\r\nQUIT\r\n")
    r.expect_lines("+OK", pop.ERR_ACCESS, "+OK Bye")
    text = wait_for_log(proxy, "pop denied: no allow rule matches")
    denials = [ln for ln in text.splitlines() if "access denied" in ln]
    assert len(denials) == 2, denials
    assert ("login failed user='gina': access denied: mailAllowedServiceAccess of "
            "uid=gina,ou=People,o=example.com,o=internet: imap denied: no allow rule matches") in denials[0]
    assert store.read_log()[len(before):].count("user=<gina>") == 0


def test_per_user_filter_without_preauth_answers_as_a_wrong_password(proxy_nopreauth):
    """Without PreAuth nobody has checked the password: the refusal must tell no more than a wrong
    password would (the log says what it was)."""
    r = RawClient(proxy_nopreauth.host, proxy_nopreauth.imap_port, "127.0.0.22")
    r.expect(b"* OK")
    r.send(b'a LOGIN gina "gina-pw"\r\nb LOGIN gina wrong\r\n')
    r.expect_lines("a " + imap.NO_AUTH)
    r = RawClient(proxy_nopreauth.host, proxy_nopreauth.pop_port, "127.0.0.23")
    r.expect(b"+OK")
    r.send(b"USER gina\r\nPASS gina-pw\r\nQUIT\r\n")
    r.expect_lines("+OK", pop.ERR_AUTH, "+OK Bye")
    wait_for_log(proxy_nopreauth, "login failed user='gina': auth failed: mailAllowedServiceAccess of "
                                  "uid=gina,ou=People,o=example.com,o=internet: imap denied: no allow rule matches")
    with ImapFrom(proxy_nopreauth.host, proxy_nopreauth.imap_port, "127.0.0.21") as c:
        c.login("gina", "gina-pw")


def test_a_per_user_filter_that_does_not_parse_denies(proxy):
    """hank: +imap:ALL$+popx:ALL -- fail closed, one log line naming the column."""
    with pytest.raises(imaplib.IMAP4.error, match=r"\[CONTACTADMIN\] Access denied"):
        with ImapFrom(proxy.host, proxy.imap_port, "127.0.0.24") as c:
            c.login("hank", "hank-pw")
    text = wait_for_log(proxy, "'+imap:ALL$+popx:ALL' does not parse")
    lines = [ln for ln in text.splitlines() if "does not parse" in ln]
    assert len(lines) == 1 and lines[0].endswith(
        "imap denied: '+imap:ALL$+popx:ALL' does not parse: column 12: unknown service 'popx' (known: imap "
        "imaps pop pops smtp smtps http smime, or * or ALL)"), lines


def test_per_user_filter_sees_imaps_on_the_tls_port_and_imap_after_starttls(proxy):
    """gina may use imap, not imaps: the implicit-TLS port is imaps, a STARTTLS session is imap."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with imaplib.IMAP4_SSL(proxy.host, proxy.imaps_port, ssl_context=ctx) as c:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[CONTACTADMIN\] Access denied"):
            c.login("gina", "gina-pw")
    wait_for_log(proxy, "imaps denied: no allow rule matches")
    with imaplib.IMAP4(proxy.host, proxy.imap_port) as c:
        c.starttls(ctx)
        c.login("gina", "gina-pw")


def test_tcpaccess_per_virtual_domain(mail_stack, tmp_path):
    """vdmap.cfg gives the sessions on 127.0.0.1 a TCPAccess of their own."""
    vdmap = tmp_path / "vdmap.cfg"
    vdmap.write_text("vdmap local 127.0.0.1\nlocal:TCPAccess \"-imap:127.0.0.31\"\n")
    with Proxy(mail_stack.info(), imap={"VirtualDomainFile": str(vdmap), "TCPAccess": "-imap:127.0.0.32"}) as p:
        refused(p, p.imap_port, "127.0.0.31", imap.ACCESS_DENIED)
        with ImapFrom(p.host, p.imap_port, "127.0.0.32") as c:      # the service's own filter is replaced
            c.login("alice", "alice-pw")
