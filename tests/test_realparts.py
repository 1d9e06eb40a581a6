"""The real-server fixtures themselves: slapd, the Dovecot stores, DelayProxy (no mmproxy here)."""
import base64
import hashlib
import imaplib
import json
import os
import poplib
import socket
import subprocess
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
from mmproxy.testing.directory import ldif_line

from helpers import RawClient

imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))

LATIN_PW = b"p\xe4sswort"             # ISO-8859-1 "pässwort": not valid UTF-8
LATIN_AS_UTF8 = "p\u00e4sswort".encode("utf-8")     # the same text in UTF-8: a wrong password


def wait_for_new_lines(read, marker, before, timeout=5.0):
    """The log lines holding `marker` after the first `before` of them, once there is one (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in read().splitlines() if marker in ln]
        if len(lines) > before:
            return lines[before:]
        assert time.monotonic() < deadline, "no new %r line in the log" % marker
        time.sleep(0.05)


def latin_user(stack):
    """The latin user's info() entry and the exact octets of its password."""
    u = stack.user("latin")
    return u, u["password"].encode(u["password_charset"])


def lines_until(r, prefix):
    """A RawClient's lines up to and including the first that starts with `prefix`."""
    lines = [r.readline()]
    while lines[-1] and not lines[-1].startswith(prefix):
        lines.append(r.readline())
    assert lines[-1], "connection closed before %r: %r" % (prefix, lines)
    return lines


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


def test_latin1_password_binds_with_its_octets_only(mail_stack):
    """userPassword is {SSHA} over the raw ISO-8859-1 octets; the UTF-8 of the same text fails."""
    u, raw = latin_user(mail_stack)
    assert raw == LATIN_PW and u["dn"] == "uid=latin,ou=People,o=example.com,o=internet"
    conn = mail_stack.slapd.connect("proxy")
    (_, attrs), = conn.search_s(u["dn"], ldap.SCOPE_BASE, attrlist=["userPassword", "mailHost"])
    assert attrs["mailHost"] == [b"127.0.0.2"]
    stored, = attrs["userPassword"]
    assert stored.startswith(b"{SSHA}")
    digest_salt = base64.b64decode(stored[len(b"{SSHA}"):])
    assert hashlib.sha1(LATIN_PW + digest_salt[20:]).digest() == digest_salt[:20]
    conn = mail_stack.slapd.connect((u["dn"], raw))
    assert conn.whoami_s() == "dn:" + u["dn"]
    conn.unbind_s()
    with pytest.raises(ldap.INVALID_CREDENTIALS):
        mail_stack.slapd.connect((u["dn"], LATIN_AS_UTF8))


def test_latin1_password_with_ldapwhoami(mail_stack, tmp_path):
    """The command-line client reads the octets from a file (-y: the whole file, no newline;
    mode 0600, else it warns on stderr)."""
    u, raw = latin_user(mail_stack)
    pw_file = tmp_path / "pw"
    pw_file.touch(mode=0o600)
    cases = ((raw, 0, "dn:%s\n" % u["dn"], ""), (LATIN_AS_UTF8, 49, "", "ldap_bind: Invalid credentials (49)\n"))
    for octets, rc, out, err in cases:
        pw_file.write_bytes(octets)
        r = subprocess.run([find_binary("ldapwhoami"), "-x", "-H", mail_stack.ldap_url, "-D", u["dn"],
                            "-y", str(pw_file)], capture_output=True, text=True, timeout=15)
        assert (r.returncode, r.stdout, r.stderr) == (rc, out, err)


def test_ldif_line_sends_non_utf8_octets_as_base64():
    assert ldif_line("userPassword", LATIN_PW) == "userPassword:: cORzc3dvcnQ=\n"
    assert ldif_line("userPassword", b"alice-pw") == ldif_line("userPassword", "alice-pw") == "userPassword: alice-pw\n"
    assert ldif_line("cn", "J\u00fcrgen") == "cn:: %s\n" % base64.b64encode("J\u00fcrgen".encode()).decode()


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


def test_imap_latin1_password_as_literal_on_the_store(mail_stack):
    """Dovecot takes the raw ISO-8859-1 octets in a synchronising literal and checks them as
    they are; the UTF-8 of the same text is a wrong password."""
    u, raw = latin_user(mail_stack)
    assert u["mailhost"] == "127.0.0.2"
    r = RawClient("127.0.0.2", mail_stack.imap_port, timeout=10)
    try:
        greeting = r.readline()
        assert greeting.startswith(b"* OK [CAPABILITY ") and greeting.endswith(b" ready.\r\n")
        r.send(b"a LOGIN latin {%d}\r\n" % len(raw))
        assert r.readline() == b"+ OK\r\n"
        r.send(raw + b"\r\n")
        ok = r.readline()
        assert ok.startswith(b"a OK [CAPABILITY ") and ok.endswith(b"] Logged in\r\n"), ok
        r.send(b"b EXAMINE INBOX\r\n")
        lines = lines_until(r, b"b ")
        assert b"* 1 EXISTS\r\n" in lines and lines[-1].startswith(b"b OK [READ-ONLY] Examine completed")
        r.send(b"c FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
        lines = lines_until(r, b"c ")
        assert b"Subject: %s\r\n" % welcome_subject("latin", "127.0.0.2").encode() in lines
        assert lines[-1].startswith(b"c OK Fetch completed")
        r.send(b"d LOGOUT\r\n")
        lines = lines_until(r, b"d ")
        assert lines[-2] == b"* BYE Logging out\r\n" and lines[-1].startswith(b"d OK Logout completed")
    finally:
        r.sock.close()
    r = RawClient("127.0.0.2", mail_stack.imap_port, timeout=10)
    try:
        r.readline()
        r.send(b"a LOGIN latin {%d}\r\n" % len(LATIN_AS_UTF8))
        assert r.readline() == b"+ OK\r\n"
        r.send(LATIN_AS_UTF8 + b"\r\n")
        assert r.readline() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    finally:
        r.sock.close()


@pytest.mark.parametrize("command, reply", [
    pytest.param(b'a LOGIN latin "p\xe4sswort"\r\n', b"a OK ", id="quoted"),
    pytest.param(b"a LOGIN latin {8+}\r\np\xe4sswort\r\n", b"a OK ", id="literal+"),
    pytest.param(b"a AUTHENTICATE PLAIN " + base64.b64encode(b"\0latin\0p\xe4sswort") + b"\r\n", b"a OK ",
                 id="authenticate-plain"),
    pytest.param(b"a LOGIN latin p\xe4sswort\r\n", b"a BAD 8bit data in atom\r\n", id="atom"),
])
def test_imap_latin1_password_forms_the_store_takes(mail_stack, command, reply):
    """What Dovecot does with the 8-bit octets in each IMAP form: only an atom is refused."""
    r = RawClient("127.0.0.2", mail_stack.imap_port, timeout=10)
    try:
        r.readline()
        r.send(command)
        line = r.readline()
        assert line.startswith(reply), line
        if reply == b"a OK ":
            assert line.endswith(b"] Logged in\r\n")
            r.send(b"z LOGOUT\r\n")
            assert lines_until(r, b"z ")[-1].startswith(b"z OK Logout completed")
    finally:
        r.sock.close()


@pytest.mark.parametrize("form", ["user-pass", "auth-plain"])
def test_pop3_latin1_password_on_the_store(mail_stack, form):
    """POP3 PASS (and AUTH PLAIN) with the raw octets; TOP shows the Welcome message."""
    _u, raw = latin_user(mail_stack)
    r = RawClient("127.0.0.2", mail_stack.pop3_port, timeout=10)
    try:
        assert r.readline().startswith(b"+OK ")
        if form == "user-pass":
            r.send(b"USER latin\r\n")
            assert r.readline() == b"+OK\r\n"
            r.send(b"PASS " + raw + b"\r\n")
        else:
            r.send(b"AUTH PLAIN " + base64.b64encode(b"\0latin\0" + raw) + b"\r\n")
        assert r.readline() == b"+OK Logged in.\r\n"
        r.send(b"TOP 1 0\r\n")
        lines = lines_until(r, b".\r\n")
        assert lines[0].startswith(b"+OK")
        assert b"Subject: %s\r\n" % welcome_subject("latin", "127.0.0.2").encode() in lines
        r.send(b"QUIT\r\n")
        assert r.readline() == b"+OK Logging out.\r\n"
    finally:
        r.sock.close()


def test_pop3_latin1_password_in_utf8_is_wrong(mail_stack):
    r = RawClient("127.0.0.2", mail_stack.pop3_port, timeout=10)
    try:
        assert r.readline().startswith(b"+OK ")
        r.send(b"USER latin\r\n")
        assert r.readline() == b"+OK\r\n"
        r.send(b"PASS " + LATIN_AS_UTF8 + b"\r\n")
        assert r.readline() == b"-ERR [AUTH] Authentication failed.\r\n"
    finally:
        r.sock.close()


def test_imap_id_x_originating_ip_sets_rip(mail_stack):
    erin = mail_stack.user("erin")
    store = mail_stack.stores["127.0.0.2"]
    before = store.read_log().count("imap-login: Info: Login: user=<erin>")   # other tests log erin in too
    m = imaplib.IMAP4("127.0.0.2", mail_stack.imap_port)
    try:
        typ, _ = m._simple_command("ID", '("x-originating-ip" "127.0.0.77" "x-originating-port" "4242")')
        assert typ == "OK"
        m.login("erin", erin["password"])
    finally:
        m.logout()
    lines = wait_for_new_lines(store.read_log, "imap-login: Info: Login: user=<erin>", before)
    assert "rip=127.0.0.77" in lines[0], lines


def test_pop3_xclient_sets_rip(mail_stack):
    u = mail_stack.user("user3")
    store = mail_stack.stores["127.0.0.2"]
    before = store.read_log().count("pop3-login: Info: Login: user=<user3>")   # other tests log user3 in too
    p = poplib.POP3("127.0.0.2", mail_stack.pop3_port, timeout=10)
    try:
        assert b"[XCLIENT]" in p.getwelcome()        # Dovecot announces it in the greeting, not in CAPA
        assert p._shortcmd("XCLIENT ADDR=127.0.0.88 PORT=4343").startswith(b"+OK")
        p.user("user3")
        p.pass_(u["password"])
    finally:
        p.quit()
    lines = wait_for_new_lines(store.read_log, "pop3-login: Info: Login: user=<user3>", before)
    assert "rip=127.0.0.88" in lines[0], lines


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
    latin = info["users"]["latin"]
    assert (latin["password"], latin["password_charset"]) == ("p\u00e4sswort", "iso-8859-1")
    assert latin["password"].encode(latin["password_charset"]) == LATIN_PW
    assert {u["password_charset"] for uid, u in info["users"].items() if uid != "latin"} == {"utf-8"}


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
