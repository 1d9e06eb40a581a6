"""IMAP end to end: real slapd, real Dovecot stores, mmproxy started as operators start it, real clients."""
import base64
import imaplib
import os
import socket
import ssl
import subprocess
import time

import gevent
import pytest

from mmproxy import __version__, imap
from mmproxy.testing.delayproxy import DelayProxy
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import ImapFrom, RawClient, unused_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def proxy(mail_stack, certs):
    """PreAuth yes, STARTTLS and an implicit-TLS port."""
    with Proxy(mail_stack.info(), tls=certs) as p:
        yield p


@pytest.fixture(scope="module")
def proxy_nopreauth(mail_stack):
    with Proxy(mail_stack.info(), imap={"PreAuth": False}) as p:
        yield p


def users(stack):
    return stack.info()["users"]


def login(proxy, user, password, source="127.0.0.1"):
    c = ImapFrom(proxy.host, proxy.imap_port, source)
    c.login(user, password)
    return c


def inbox_subjects(c):
    typ, _ = c.select("INBOX", readonly=True)
    assert typ == "OK"
    typ, data = c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return b"".join(part[1] for part in data if isinstance(part, tuple)).decode()


# ---------------------------------------------------------------------- routing and login
def test_routing_by_mailhost_to_the_right_store(proxy, mail_stack):
    u = users(mail_stack)
    for uid in ("alice", "bob", "user1", "user2"):
        c = login(proxy, uid + "@example.com", u[uid]["password"])
        assert "Welcome %s on %s" % (u[uid]["store_login"], u[uid]["mailhost"]) in inbox_subjects(c)
        c.logout()


def test_unqualified_user_gets_default_domain(proxy, mail_stack):
    c = login(proxy, "alice", users(mail_stack)["alice"]["password"])
    assert "on 127.0.0.2" in inbox_subjects(c)
    c.logout()


def test_domain_without_base_dn_and_per_domain_replay(proxy, mail_stack):
    """example.org's DC node holds its users itself and says mailAccessProxyReplay %U@%V."""
    c = login(proxy, "carol@example.org", users(mail_stack)["carol"]["password"])
    assert "Welcome carol@example.org on 127.0.0.3" in inbox_subjects(c)
    c.logout()


def test_post_login_capabilities_come_from_the_store(proxy, mail_stack):
    c = ImapFrom(proxy.host, proxy.imap_port)
    assert "STARTTLS" in c.capabilities and "LITERAL-" in c.capabilities
    typ, data = c.login("alice", users(mail_stack)["alice"]["password"])
    assert typ == "OK" and b"[CAPABILITY" in data[0] and b"IDLE" in data[0]
    c.logout()


@pytest.mark.parametrize("preauth", [True, False])
def test_wrong_password_and_unknown_user(preauth, proxy, proxy_nopreauth, mail_stack):
    p = proxy if preauth else proxy_nopreauth
    for user, pw in (("alice", "wrong"), ("nosuchuser", "x"), ("alice@nosuch.example", "x")):
        c = ImapFrom(p.host, p.imap_port)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.login(user, pw)
        c.shutdown()
    c = login(p, "bob", users(mail_stack)["bob"]["password"])
    assert "on 127.0.0.3" in inbox_subjects(c)
    c.logout()


def test_preauth_keeps_wrong_passwords_away_from_the_store(proxy, mail_stack):
    store = mail_stack.stores["127.0.0.2"]
    before = store.read_log().count("user1")
    c = ImapFrom(proxy.host, proxy.imap_port)
    with pytest.raises(imaplib.IMAP4.error):
        c.login("user1", "not-the-password")
    c.shutdown()
    time.sleep(0.3)
    assert store.read_log().count("user1") == before


def test_store_log_shows_the_real_client_address(proxy, mail_stack):
    def erins():
        log = mail_stack.stores["127.0.0.2"].read_log()
        return [line for line in log.splitlines() if "imap-login" in line and "Login: user=<erin>" in line]
    before = len(erins())                     # earlier tests log erin in from other addresses
    c = login(proxy, "erin", users(mail_stack)["erin"]["password"], source="127.0.0.9")
    c.logout()
    deadline = time.time() + 5
    while time.time() < deadline and len(erins()) == before:
        time.sleep(0.1)
    lines = erins()[before:]
    assert lines and all("rip=127.0.0.9" in line for line in lines), lines


def test_user_without_mailhost_is_a_temporary_failure(proxy, mail_stack):
    c = ImapFrom(proxy.host, proxy.imap_port)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        c.login("frank", users(mail_stack)["frank"]["password"])


def test_filter_injection_in_user_name(proxy, mail_stack):
    pw = users(mail_stack)["alice"]["password"]
    for user in ("*", "alice)(uid=*", "a*", "alice)(|(uid=*"):
        c = ImapFrom(proxy.host, proxy.imap_port)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.login('"%s"' % user, pw)          # imaplib sends the user name as given
        c.shutdown()


def test_control_characters_are_refused(proxy, mail_stack):
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a LOGIN {7}\r\n")
    r.expect_lines("+ Ready for literal data")
    r.send(b"ali\x00ce {8}\r\n")
    r.expect_lines("+ Ready for literal data")
    r.send(b"alice-pw\r\n")
    r.expect_lines("a " + imap.NO_AUTH)


# ---------------------------------------------------------------------- syntax: literals, SASL
def test_literals_synchronizing_and_not(proxy, mail_stack):
    pw = users(mail_stack)["bob"]["password"].encode()
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a1 LOGIN {3}\r\n")
    r.expect_lines("+ Ready for literal data")
    r.send(b"bob {%d+}\r\n%s\r\n" % (len(pw), pw))
    r.expect(b"a1 OK [CAPABILITY ")
    r.send(b"a2 SELECT INBOX\r\n")
    assert b"a2 OK" in r.skip_to(b"a2 ")          # the store's untagged lines come first


def test_authenticate_plain_with_and_without_initial_response(proxy, mail_stack):
    pw = users(mail_stack)["alice"]["password"]
    c = ImapFrom(proxy.host, proxy.imap_port)        # imaplib sends no initial response: "+ " first
    typ, _ = c.authenticate("PLAIN", lambda _: "\0alice\0%s" % pw)
    assert typ == "OK" and "127.0.0.2" in inbox_subjects(c)
    c.logout()
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a AUTHENTICATE PLAIN " + base64.b64encode(b"alice\0alice\0" + pw.encode()) + b"\r\n")
    r.expect(b"a OK [CAPABILITY ")


def test_authenticate_login_mechanism(proxy, mail_stack):
    """SASL LOGIN (Outlook-era clients): "Username:", "Password:"; also with the user as initial response."""
    pw = users(mail_stack)["bob"]["password"].encode()
    r = RawClient(proxy.host, proxy.imap_port)
    assert b"AUTH=LOGIN" in r.expect(b"* OK [CAPABILITY ")
    r.send(b"a AUTHENTICATE LOGIN\r\n")
    r.expect_lines("+ " + base64.b64encode(b"Username:").decode())
    r.send(base64.b64encode(b"bob") + b"\r\n")
    r.expect_lines("+ " + base64.b64encode(b"Password:").decode())
    r.send(base64.b64encode(pw) + b"\r\n")
    r.expect(b"a OK [CAPABILITY ")
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a AUTHENTICATE LOGIN " + base64.b64encode(b"bob") + b"\r\n")
    r.expect_lines("+ " + base64.b64encode(b"Password:").decode())
    r.send(base64.b64encode(b"wrong") + b"\r\n")
    r.expect_lines("a " + imap.NO_AUTH)


def test_authenticate_refuses_other_authzid_cancels_and_unknown_mechanisms(proxy, mail_stack):
    pw = users(mail_stack)["alice"]["password"].encode()
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a AUTHENTICATE PLAIN " + base64.b64encode(b"bob\0alice\0" + pw) + b"\r\n")
    r.expect_lines("a " + imap.NO_AUTHZ)
    r.send(b"b AUTHENTICATE PLAIN\r\n")
    r.expect_lines("+ ")
    r.send(b"*\r\n")
    r.expect_lines("b BAD Authentication cancelled")
    r.send(b"c AUTHENTICATE GSSAPI\r\nd AUTHENTICATE PLAIN !!notbase64!!\r\ne NOOP\r\n")
    r.expect_lines("c " + imap.NO_MECHANISM, "d BAD Malformed SASL response (not base64)", "e OK NOOP completed")


# ---------------------------------------------------------------------- hostile input
def test_oversize_line_is_refused_and_closed(proxy):
    """One tagged BAD [TOOBIG] and a clean close (RFC 4469/7888), not a string of syntax errors."""
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a NOOP " + b"x" * (imap.MAX_LINE + 10) + b"\r\n")
    r.expect_lines("a BAD [TOOBIG] line of more than %d octets" % imap.MAX_LINE, imap.BYE_TOO_BIG)
    r.expect_close()


def test_oversize_sync_literal_gets_no_continuation(proxy):
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a LOGIN {100000}\r\n")
    r.expect_lines("a BAD [TOOBIG] Literal too big")
    r.send(b"b NOOP\r\n")                          # the session survives
    r.expect_lines("b OK NOOP completed")


def test_oversize_nonsync_literal_is_never_parsed(proxy):
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a LOGIN {100000+}\r\n" + b"z LOGOUT\r\n" * 10)
    r.expect_lines("a BAD [TOOBIG] Literal too big (LITERAL- allows 4096 octets)", imap.BYE_TOO_BIG)
    r.expect_close()


def test_half_close_after_partial_command_is_closed_at_once(proxy):
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a LOGIN alice")
    r.sock.shutdown(socket.SHUT_WR)
    t0 = time.monotonic()
    r.expect_close()
    assert time.monotonic() - t0 < 2


def test_thousands_of_pipelined_commands_all_answered_in_order(proxy):
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    n = 5000
    gevent.spawn(r.sock.sendall, b"".join(b"t%d NOOP\r\n" % i for i in range(n)))
    got = []
    while len(got) < n:
        line = r.readline()
        assert line, "connection closed after %d answers" % len(got)
        got.append(line)
    assert got == [b"t%d OK NOOP completed\r\n" % i for i in range(n)]


def test_bad_command_budget_then_bye(proxy):
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"".join(b"x%d FROB\r\n" % i for i in range(20)))
    r.expect_lines(*["x%d BAD %s" % (i, imap.BAD_UNKNOWN) for i in range(10)], imap.BYE_TOO_MANY)
    r.expect_close()


def test_commands_needing_login_are_refused_without_closing(proxy):
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a SELECT INBOX\r\nb ID NIL\r\nc CAPABILITY\r\n")
    r.expect_lines("a BAD " + imap.BAD_NOT_NOW, '* ID ("name" "mmproxy" "version" "%s")' % __version__,
                   "b OK ID completed")
    assert r.expect(b"* CAPABILITY ")
    r.expect_lines("c OK Capability completed")


# ---------------------------------------------------------------------- TLS
def test_starttls_then_login(proxy, mail_stack):
    c = ImapFrom(proxy.host, proxy.imap_port)
    c.starttls(ssl_context=_client_ctx())
    assert "STARTTLS" not in c.capabilities
    c.login("alice", users(mail_stack)["alice"]["password"])
    assert "on 127.0.0.2" in inbox_subjects(c)
    c.logout()


def test_starttls_discards_pipelined_plaintext(proxy):
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    r.send(b"a STARTTLS\r\nb CAPABILITY\r\n")
    assert r.expect(b"a ").startswith(b"a OK")
    tls = _client_ctx().wrap_socket(r.sock, server_hostname="localhost")
    tls.settimeout(5)
    tls.sendall(b"c NOOP\r\n")
    data = b""
    while b"c OK" not in data:
        chunk = tls.recv(4096)
        assert chunk
        data += chunk
    assert b"b OK" not in data and b"* CAPABILITY" not in data


def test_implicit_tls_port(proxy, mail_stack):
    c = imaplib.IMAP4_SSL(proxy.host, proxy.imaps_port, ssl_context=_client_ctx())
    c.login("bob", users(mail_stack)["bob"]["password"])
    assert "on 127.0.0.3" in inbox_subjects(c)
    c.logout()


def _client_ctx():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_flat_user_tree_and_mailhost_attributes_in_order(mail_stack):
    """HostedDomains no: one user tree at the LdapURL base; MailHostAttrs tried in order."""
    info = mail_stack.info()
    base = info["domains"]["example.com"]["people_dn"]
    info = dict(info, ldap=dict(info["ldap"]))
    with Proxy(info, imap={"HostedDomains": False, "LdapURL": "%s/%s" % (info["ldap"]["url"], base),
                           "DefaultDomain": None, "MailHostAttrs": "mailRoutingHost mailHost"}) as p:
        c = login(p, "bob", users(mail_stack)["bob"]["password"])
        assert "on 127.0.0.3" in inbox_subjects(c)
        c.logout()


# ---------------------------------------------------------------------- curl
def test_curl_fetches_a_message(proxy, mail_stack):
    pw = users(mail_stack)["alice"]["password"]
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-u", "alice:%s" % pw,
                          "imap://%s:%d/INBOX;UID=1" % (proxy.host, proxy.imap_port)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "Welcome alice on 127.0.0.2" in out.stdout


# ---------------------------------------------------------------------- things that are down
def test_store_down_shows_the_alert(mail_stack, tmp_path):
    info = mail_stack.info()
    with Proxy(info, imap={"BacksidePort": unused_port("127.0.0.2", "127.0.0.3"),
                           "ServerDownAlert": "Store on holiday, back soon"}) as p:
        r = RawClient(p.host, p.imap_port)
        r.expect(b"* OK")
        pw = users(mail_stack)["alice"]["password"].encode()
        r.send(b'a LOGIN alice "%s"\r\n' % pw)
        alert = r.readline()
        assert alert == b"* OK [ALERT] Store on holiday, back soon\r\n"
        assert r.expect(b"a ").startswith(b"a NO [UNAVAILABLE]")


def test_directory_down_is_unavailable_not_a_bad_password(mail_stack):
    info = dict(mail_stack.info())
    info["ldap"] = dict(info["ldap"], url="ldap://127.0.0.1:%d" % unused_port("127.0.0.1"))
    with Proxy(info) as p:
        c = ImapFrom(p.host, p.imap_port)
        with pytest.raises(imaplib.IMAP4.error) as e:
            c.login("alice", "alice-pw")
        assert "UNAVAILABLE" in str(e.value) and "ldap" not in str(e.value).lower()


def test_slow_directory_does_not_stall_logged_in_sessions(mail_stack):
    """With every LDAP answer 2 s late, a session already relaying keeps answering at once."""
    info = mail_stack.info()
    ldap = info["ldap"]
    with DelayProxy(ldap["host"], ldap["port"]) as slow:
        info = dict(info, ldap=dict(ldap, url=slow.url))
        with Proxy(info, imap={"LdapCacheTTL": 1, "AuthCacheTTL": 1}) as p:
            u = users(mail_stack)
            a = login(p, "alice", u["alice"]["password"])
            a.select("INBOX")
            slow.delay = 2.0
            logins = [gevent.spawn(_try_login, p, "user%d" % k, u["user%d" % k]["password"]) for k in range(1, 5)]
            gevent.sleep(0.3)                       # the logins are now waiting on the directory
            worst = 0.0
            for _ in range(10):
                t0 = time.monotonic()
                assert a.noop()[0] == "OK"
                assert a.fetch("1", "(FLAGS)")[0] == "OK"
                worst = max(worst, time.monotonic() - t0)
                gevent.sleep(0.1)
            assert worst < 0.5, "a relayed session waited %.2fs while the directory was slow" % worst
            results = [g.get(timeout=30) for g in logins]
            assert results == ["OK"] * 4
            a.logout()


def _try_login(p, user, pw):
    c = ImapFrom(p.host, p.imap_port, timeout=30)
    typ, _ = c.login(user, pw)
    c.logout()
    return typ


def test_log_has_no_passwords(proxy, mail_stack):
    text = "".join(open(os.path.join(proxy.log_dir, f), errors="replace").read() for f in os.listdir(proxy.log_dir))
    text += proxy.output()
    assert "login user=alice@example.com" in text
    for u in users(mail_stack).values():
        assert u["password"] not in text


# ---------------------------------------------------------------------- per-domain settings and replay quoting
def test_domain_search_filter_and_preauth_overrides(mail_stack):
    """inetDomainSearchFilter replaces SearchFormat; mailAccessProxyPreAuth yes beats PreAuth no."""
    info = mail_stack.info()
    org = info["domains"]["example.org"]["dn"]
    dave = info["users"]["dave"]
    with Proxy(info, imap={"PreAuth": False, "LdapCacheTTL": 1, "AuthCacheTTL": 1}) as p:
        store = mail_stack.stores["127.0.0.2"]
        before = store.read_log().count("dave@example.org")
        c = ImapFrom(p.host, p.imap_port)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.login("dave@example.org", "wrong")
        time.sleep(0.3)
        assert store.read_log().count("dave@example.org") == before      # the domain said PreAuth yes
        mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nadd: inetDomainSearchFilter\n"
                                    "inetDomainSearchFilter: (&(uid=%%U)(mailUserStatus=active))\n" % org)
        mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: mailUserStatus\n"
                                    "mailUserStatus: inactive\n" % dave["dn"])
        try:
            time.sleep(1.5)                       # LdapCacheTTL 1: the domain node is read again
            c = ImapFrom(p.host, p.imap_port)
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                c.login("dave@example.org", dave["password"])
            c = login(p, "carol@example.org", info["users"]["carol"]["password"])
            c.logout()
        finally:
            mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\ndelete: inetDomainSearchFilter\n" % org)
            mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: mailUserStatus\n"
                                        "mailUserStatus: active\n" % dave["dn"])


def test_eight_bit_password_is_replayed_as_a_literal(proxy, mail_stack):
    people = mail_stack.info()["domains"]["example.com"]["people_dn"]
    password = "pässwörd ✓"
    mail_stack.slapd.add("dn: uid=zoe,%s\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n"
                         "objectClass: inetOrgPerson\nobjectClass: inetUser\nobjectClass: mailUser\nuid: zoe\ncn: Zoe\n"
                         "sn: Zoe\nmailHost: 127.0.0.2\nuserPassword: %s\n" % (people, password))
    mail_stack.stores["127.0.0.2"].add_user("zoe", password)
    r = RawClient(proxy.host, proxy.imap_port)
    r.expect(b"* OK")
    raw = password.encode()
    r.send(b"a LOGIN zoe {%d+}\r\n%s\r\n" % (len(raw), raw))
    r.expect(b"a OK [CAPABILITY ")
    r.send(b"b SELECT INBOX\r\n")
    assert r.skip_to(b"b ").startswith(b"b OK")


def _clear_text_password(mail_stack, uid):
    """Store the user's password in clear text in LDAP, as challenge-response logins need."""
    u = mail_stack.info()["users"][uid]
    mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: userPassword\nuserPassword: %s\n"
                                % (u["dn"], u["password"]))
    return u


def test_authenticate_cram_md5(mail_stack):
    """CRAMs yes: AUTH=CRAM-MD5 is offered, also where plaintext is refused, and checked against LDAP."""
    u = _clear_text_password(mail_stack, "user5")
    with Proxy(mail_stack.info(), imap={"CRAMs": True, "RestrictPlainPasswords": True}) as p:
        c = ImapFrom(p.host, p.imap_port)
        assert "AUTH=CRAM-MD5" in c.capabilities and "LOGINDISABLED" in c.capabilities
        typ, _ = c.login_cram_md5("user5", u["password"])
        assert typ == "OK" and "Welcome user5 on 127.0.0.2" in inbox_subjects(c)
        c.logout()
        c = ImapFrom(p.host, p.imap_port)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.login_cram_md5("user5", "wrong")
        c = ImapFrom(p.host, p.imap_port)            # a hashed directory password cannot do CRAM-MD5
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.login_cram_md5("alice", mail_stack.info()["users"]["alice"]["password"])


def test_conn_limits_per_client_address(mail_stack):
    """ConnLimits: the most specific rule decides; relayed sessions count until they end."""
    with Proxy(mail_stack.info(), imap={"ConnLimits": "0.0.0.0|0.0.0.0:20,127.0.0.11|255.255.255.255:2"},
               pop={"ConnLimits": "127.0.0.0|255.0.0.0:1"}) as p:
        pw = users(mail_stack)["alice"]["password"]
        a = login(p, "alice", pw, source="127.0.0.11")            # relayed
        b = RawClient(p.host, p.imap_port, source="127.0.0.11")   # still before login
        b.expect(b"* OK")
        refused = RawClient(p.host, p.imap_port, source="127.0.0.11")
        assert refused.read_all() == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
        other = RawClient(p.host, p.imap_port, source="127.0.0.12")   # the 0.0.0.0 rule: 20
        assert other.readline().startswith(b"* OK")
        a.logout()
        deadline = time.time() + 5
        while True:                                                # the relay's end gives the slot back
            c = RawClient(p.host, p.imap_port, source="127.0.0.11")
            if c.readline().startswith(b"* OK"):
                break
            assert time.time() < deadline
            time.sleep(0.1)
        first = RawClient(p.host, p.pop_port, source="127.0.0.13")
        assert first.readline().startswith(b"+OK")
        assert RawClient(p.host, p.pop_port, source="127.0.0.13").read_all().startswith(b"-ERR [SYS/TEMP] Too many")
        assert "ConnLimits" in open(os.path.join(p.log_dir, sorted(f for f in os.listdir(p.log_dir)
                                                                 if f.startswith("ImapProxy"))[0])).read()
