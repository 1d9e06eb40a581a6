"""The real-server fixtures themselves: slapd, the Dovecot stores, DelayProxy (no mmproxy here)."""
import imaplib
import json
import os
import poplib
import socket
import time

import ldap
import pytest

from mmproxy.testing import (
    DelayProxy,
    DovecotStore,
    MissingBinary,
    Slapd,
    default_directory,
    free_port,
    welcome_subject,
)
from mmproxy.testing.base import _proc_table, find_binary

imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))


def wait_for_log(read, needle, timeout=5.0):
    """Dovecot writes its log through a separate process: poll until `needle` shows up."""
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def imap_subjects(host, port, login, password):
    m = imaplib.IMAP4(host, port)
    try:
        m.login(login, password)
        typ, data = m.select("INBOX", readonly=True)
        assert typ == "OK" and int(data[0]) >= 1
        typ, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return [part[1].decode().strip().removeprefix("Subject: ") for part in data if isinstance(part, tuple)]
    finally:
        m.logout()


# -- LDAP ------------------------------------------------------------------------------------

def test_proxy_dn_finds_alice_and_her_mailhost(mail_stack):
    info = mail_stack.info()
    conn = mail_stack.slapd.connect("proxy")
    res = conn.search_s(info["ldap"]["suffix"], ldap.SCOPE_SUBTREE, "(uid=alice)",
                        ["mailHost", "userPassword", "inetUserStatus"])
    assert len(res) == 1
    dn, attrs = res[0]
    assert dn == info["users"]["alice"]["dn"] == "uid=alice,ou=People,o=example.com,o=internet"
    assert attrs["mailHost"] == [b"127.0.0.2"]
    assert attrs["inetUserStatus"] == [b"active"]
    assert attrs["userPassword"][0].startswith(b"{SSHA}")        # the proxy DN may read it


def test_userpassword_hidden_from_anonymous(mail_stack):
    conn = mail_stack.slapd.connect("anonymous")
    (_dn, attrs), = conn.search_s("o=internet", ldap.SCOPE_SUBTREE, "(uid=alice)", ["mailHost", "userPassword"])
    assert attrs["mailHost"] == [b"127.0.0.2"]
    assert "userPassword" not in attrs


def test_dc_tree_domains(mail_stack):
    conn = mail_stack.slapd.connect("proxy")
    (_, com), = conn.search_s("dc=example,dc=com,o=internet", ldap.SCOPE_BASE)
    assert com["inetDomainBaseDN"] == [b"o=example.com,o=internet"]
    assert com["inetDomainStatus"] == [b"active"]
    assert "mailAccessProxyReplay" not in com and "mailAccessProxyPreAuth" not in com
    (_, org), = conn.search_s("dc=example,dc=org,o=internet", ldap.SCOPE_BASE)
    assert "inetDomainBaseDN" not in org
    assert org["mailAccessProxyReplay"] == [b"%U@%V"]
    assert org["mailAccessProxyPreAuth"] == [b"yes"]
    users = conn.search_s("dc=example,dc=org,o=internet", ldap.SCOPE_ONELEVEL, "(objectClass=mailUser)", ["uid"])
    assert sorted(a["uid"][0] for _, a in users) == [b"carol", b"dave"]
    (_, erin), = conn.search_s("o=internet", ldap.SCOPE_SUBTREE, "(mailAlternateAddress=erin@alias.example.com)")
    assert erin["uid"] == [b"erin"]
    (_, frank), = conn.search_s("o=internet", ldap.SCOPE_SUBTREE, "(uid=frank)")
    assert "mailHost" not in frank


def test_user_bind_good_and_wrong_password(mail_stack):
    users = mail_stack.info()["users"]
    for uid in ("alice", "bob", "carol"):          # bob's and carol's passwords need quoting
        u = users[uid]
        conn = mail_stack.slapd.connect((u["dn"], u["password"]))
        assert conn.whoami_s() == "dn:" + u["dn"]
    with pytest.raises(ldap.INVALID_CREDENTIALS):
        mail_stack.slapd.connect((users["alice"]["dn"], "not-her-password"))


def test_add_modify_delete_as_root(mail_stack):
    s = mail_stack.slapd
    dn = "uid=tmpuser,ou=People,o=example.com,o=internet"
    s.add(f"""dn: {dn}
objectClass: inetOrgPerson
objectClass: inetUser
objectClass: mailUser
uid: tmpuser
cn: Tmp
sn: User
mailHost: 127.0.0.2
""")
    try:
        s.ldapmodify(f"dn: {dn}\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.3\n")
        conn = s.connect("proxy")
        (_, attrs), = conn.search_s(dn, ldap.SCOPE_BASE, attrlist=["mailHost"])
        assert attrs["mailHost"] == [b"127.0.0.3"]
    finally:
        s.delete(dn)
    with pytest.raises(ldap.NO_SUCH_OBJECT):
        s.connect("proxy").search_s(dn, ldap.SCOPE_BASE)


def test_slapd_restart_keeps_data_and_port():
    with Slapd(default_directory(n_users=2)) as s:
        url = s.url
        s.restart()
        assert s.url == url
        res = s.connect("proxy").search_s("o=internet", ldap.SCOPE_SUBTREE, "(uid=user2)", ["mailHost"])
        assert res[0][1]["mailHost"] == [b"127.0.0.3"]
        assert "SRCH" in s.read_log()            # loglevel stats: one line per operation
    assert not os.path.exists(s.dir)


# -- stores ----------------------------------------------------------------------------------

def test_imap_alice_on_her_store(mail_stack):
    alice = mail_stack.user("alice")
    subjects = imap_subjects("127.0.0.2", mail_stack.imap_port, "alice", alice["password"])
    assert subjects[0] == "Welcome alice on 127.0.0.2" == welcome_subject("alice", "127.0.0.2")


def test_imap_bob_only_on_his_store(mail_stack):
    bob = mail_stack.user("bob")
    m = imaplib.IMAP4("127.0.0.2", mail_stack.imap_port)
    with pytest.raises(imaplib.IMAP4.error):
        m.login("bob", bob["password"])
    m.logout()
    # imaplib quotes the password (a quote, a space and a backslash)
    assert imap_subjects("127.0.0.3", mail_stack.imap_port, "bob", bob["password"]) == ["Welcome bob on 127.0.0.3"]


def test_imap_carol_with_domain_on_her_store(mail_stack):
    carol = mail_stack.user("carol@example.org")
    assert carol["store_login"] == "carol@example.org" and carol["mailhost"] == "127.0.0.3"
    assert imap_subjects("127.0.0.3", mail_stack.imap_port, "carol@example.org", carol["password"]) == \
        ["Welcome carol@example.org on 127.0.0.3"]
    m = imaplib.IMAP4("127.0.0.3", mail_stack.imap_port)
    with pytest.raises(imaplib.IMAP4.error):
        m.login("carol", carol["password"])             # the store knows her only with the domain
    m.logout()


def test_pop3_on_a_store(mail_stack):
    u = mail_stack.user("user1")
    assert u["mailhost"] == "127.0.0.2"
    p = poplib.POP3("127.0.0.2", mail_stack.pop3_port, timeout=10)
    try:
        p.user("user1")
        p.pass_(u["password"])
        count, _size = p.stat()
        assert count >= 1
        _resp, lines, _octets = p.retr(1)
        assert b"Subject: Welcome user1 on 127.0.0.2" in lines
    finally:
        p.quit()


def test_imap_id_x_originating_ip_sets_rip(mail_stack):
    erin = mail_stack.user("erin")
    store = mail_stack.stores["127.0.0.2"]
    m = imaplib.IMAP4("127.0.0.2", mail_stack.imap_port)
    try:
        typ, _ = m._simple_command("ID", '("x-originating-ip" "127.0.0.77" "x-originating-port" "4242")')
        assert typ == "OK"
        m.login("erin", erin["password"])
    finally:
        m.logout()
    log = wait_for_log(store.read_log, "user=<erin>")
    lines = [ln for ln in log.splitlines() if "Login: user=<erin>" in ln]
    assert lines and "rip=127.0.0.77" in lines[-1], log[-2000:]


def test_pop3_xclient_sets_rip(mail_stack):
    u = mail_stack.user("user3")
    store = mail_stack.stores["127.0.0.2"]
    p = poplib.POP3("127.0.0.2", mail_stack.pop3_port, timeout=10)
    try:
        assert b"[XCLIENT]" in p.getwelcome()        # Dovecot announces it in the greeting, not in CAPA
        assert p._shortcmd("XCLIENT ADDR=127.0.0.88 PORT=4343").startswith(b"+OK")
        p.user("user3")
        p.pass_(u["password"])
    finally:
        p.quit()
    log = wait_for_log(store.read_log, "user=<user3>")
    lines = [ln for ln in log.splitlines() if "Login: user=<user3>" in ln]
    assert lines and "rip=127.0.0.88" in lines[-1], log[-2000:]


def test_store_add_user_while_running(mail_stack):
    store = mail_stack.stores["127.0.0.3"]
    store.add_user("zed@example.net", "zed pw")
    assert imap_subjects("127.0.0.3", mail_stack.imap_port, "zed@example.net", "zed pw") == \
        ["Welcome zed@example.net on 127.0.0.3"]


def test_store_lmtp_listens(mail_stack):
    with socket.create_connection(("127.0.0.2", mail_stack.lmtp_port), timeout=5) as s:
        assert s.recv(200).startswith(b"220 ")


def test_standalone_store_cleans_up():
    port = free_port("127.0.0.5")
    store = DovecotStore("127.0.0.5", port, free_port("127.0.0.5"), {"solo": "solo-pw"}, large_bytes=200_000)
    with store:
        pid = store.proc.pid
        m = imaplib.IMAP4("127.0.0.5", port)
        m.login("solo", "solo-pw")
        typ, data = m.select("INBOX")
        assert int(data[0]) == 2
        typ, data = m.fetch("2", "(RFC822.SIZE)")
        assert int(data[0].split()[-1].rstrip(b")")) > 190_000
        m.logout()
    assert not os.path.exists(store.dir)
    left = [p for p, (_ppid, pgrp, state, _t) in _proc_table().items() if pgrp == pid and state != "Z"]
    assert left == []                            # nothing left of the daemon's process group


# -- helpers ---------------------------------------------------------------------------------

def test_info_is_plain_data(mail_stack):
    info = json.loads(json.dumps(mail_stack.info()))
    assert set(info) >= {"workdir", "ldap", "imap_port", "pop3_port", "lmtp_port", "stores", "domains", "users"}
    assert set(info["stores"]) == {"127.0.0.2", "127.0.0.3"}
    assert {s["imap"] for s in info["stores"].values()} == {info["imap_port"]}
    assert info["users"]["bob"]["password"] == 'b"o b\\pw'
    assert info["users"]["carol"]["login"] == "carol@example.org"
    assert info["users"]["frank"]["mailhost"] is None


def test_free_port_on_several_addresses():
    port = free_port("127.0.0.2", "127.0.0.3")
    for host in ("127.0.0.2", "127.0.0.3"):
        with socket.socket() as s:
            s.bind((host, port))


def test_missing_binary_fails_with_the_install_hint(monkeypatch):
    import mmproxy.testing.base as base
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(base, "_SBIN", ())
    with pytest.raises(MissingBinary, match=r"apt-get install -y postfix"):
        find_binary("postfix")
    with pytest.raises(MissingBinary, match=r"scripts/setup-system.*apt-get install -y slapd"):
        Slapd()


def test_delay_proxy_slows_ldap_answers(mail_stack):
    with DelayProxy("127.0.0.1", mail_stack.slapd.port) as proxy:
        conn = ldap.initialize(proxy.url)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 10)
        conn.simple_bind_s(mail_stack.slapd.bind_dn, mail_stack.slapd.bind_pw)

        def timed_search():
            t0 = time.monotonic()
            res = conn.search_s("o=internet", ldap.SCOPE_SUBTREE, "(uid=bob)", ["mailHost"])
            assert res[0][1]["mailHost"] == [b"127.0.0.3"]
            return time.monotonic() - t0

        proxy.delay = 1.0
        assert timed_search() >= 1.0
        proxy.delay = 0
        assert timed_search() < 0.5
        conn.unbind_s()


# -- Postfix ---------------------------------------------------------------------------------

def test_postfix_delivers_users_to_their_store_by_lmtp(mail_stack):
    import smtplib
    smtp = mail_stack.info()["smtp"]
    carol = mail_stack.user("carol")
    with smtplib.SMTP(smtp["host"], smtp["port"], timeout=10) as s:
        assert "xclient" in s.ehlo()[1].decode().lower()
        s.sendmail("someone@example.net", ["carol@example.org"], "Subject: via postfix to carol\r\n\r\nhi\r\n")
    deadline = time.monotonic() + 10
    while True:
        subjects = imap_subjects("127.0.0.3", mail_stack.imap_port, "carol@example.org", carol["password"])
        if "via postfix to carol" in subjects or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert subjects[0] == "Welcome carol@example.org on 127.0.0.3"
    assert "via postfix to carol" in subjects, mail_stack.postfix.read_log()[-2000:]


def test_postfix_sinks_everything_else_and_honours_xclient(mail_stack):
    import smtplib
    pf = mail_stack.postfix
    before = len(pf.messages())
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as s:
        s.sendmail("a@example.net", ["nobody@example.com", "x@elsewhere.test"], "Subject: to the sink\r\n\r\nhi\r\n")
    msgs = pf.wait_for_messages(before + 2)
    assert sorted(m["X-Original-To"] for m in msgs[before:]) == ["nobody@example.com", "x@elsewhere.test"]
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as s:
        s.ehlo()
        code, _ = s.docmd("XCLIENT", "ADDR=192.0.2.9 NAME=[UNAVAILABLE]")
        assert code == 220                       # a new session as seen from 192.0.2.9
        s.ehlo()
        s.mail("a@example.net")
        code, msg = s.rcpt("x@elsewhere.test")  # not in mynetworks: no relaying
        assert code == 554 and b"Relay access denied" in msg
        assert s.rcpt("bob@example.com")[0] == 250
