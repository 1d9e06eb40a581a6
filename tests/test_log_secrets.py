"""No secret in any file mmproxy writes, at LogLevel 10 (the most verbose), for every way a secret
reaches it: IMAP LOGIN and AUTHENTICATE PLAIN/LOGIN (with and without initial response) and
CRAM-MD5, POP USER/PASS, APOP, AUTH PLAIN/LOGIN/CRAM-MD5, SMTP AUTH PLAIN/LOGIN passed to a real
Postfix, STARTTLS/STLS, a certificate login replayed with StoreAdmin/StoreAdminPass, the store's
replayed LOGIN, BindPass (right, and wrong: a refused bind), an encrypted TLS key's password from
SSLKeyPasswdFile, the legacy SmtpProxyPassword, wrong passwords, an 8-bit password, a password that
looks like a command, and a password sent raw where base64 was due.

Then every file the daemon wrote (the log directory, mmproxy.out, what it made in the
configuration directory, its state database on tmpfs) is searched for each secret: as octets, as
UTF-8, as Python would escape it, and every base64 SASL blob the clients sent.
"""
import base64
import hashlib
import hmac
import os
import shutil
import smtplib
import ssl
import time

import pytest

from mmproxy.testing import DovecotStore, Postfix, free_port
from mmproxy.testing.base import make_tempdir, ssha
from mmproxy.testing.certs import TestCA
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import RawClient, wait_for_log

KEY_PW = "Key-pw-5ecr3t"                        # the proxy's TLS key, encrypted (SSLKeyPasswdFile)
SMTP_USER, SMTP_PW = "smtpuser", "Smtp-5ecr3t"  # a SASL account at the relay
LEGACY_SMTP_PW = "Legacy-smtp-5ecr3t"           # SmtpProxyPassword (never sent, never logged)
BAD_BINDPASS = "Bad-bind-5ecr3t"                # a BindPass the directory refuses
CMD_USER, CMD_PW = "secretcmd", "a LOGOUT Cmd-5ecr3t"     # a password that looks like a command
CRAM_USER, CRAM_PW = "secretcram", "Cram-5ecr3t"          # clear text in LDAP: CRAM-MD5 and APOP
RAW_PW = "Raw-5ecr3t"                           # sent raw where a base64 SASL response was due
WRONG_PW = "Wrong-5ecr3t"                       # a wrong password (the user's LDAP bind fails)
CERTMAP = "certmap default default\ndefault:DNComps\ndefault:FilterComps e=mail\n"


def _add_user(mail_stack, uid, password, clear_text):
    people = mail_stack.info()["domains"]["example.com"]["people_dn"]
    stored = password if clear_text else ssha(password.encode())
    mail_stack.slapd.add("dn: uid=%s,%s\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n"
                         "objectClass: inetOrgPerson\nobjectClass: inetUser\nobjectClass: mailUser\nuid: %s\ncn: %s\n"
                         "sn: %s\nmailHost: 127.0.0.2\nuserPassword: %s\n" % (uid, people, uid, uid, uid, stored))
    mail_stack.stores["127.0.0.2"].add_user(uid, password)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """A Postfix that checks SASL through a Dovecot auth socket, AUTH only over TLS (the proxy uses
    STARTTLS towards it)."""
    d = make_tempdir("mmproxy-secrets-")
    sock = os.path.join(d, "auth-postfix")
    ip = "127.0.0.6"
    sasl = DovecotStore(ip, free_port(ip), free_port(ip), {SMTP_USER: SMTP_PW},
                        extra_conf="service auth {\n  unix_listener %s {\n    mode = 0666\n  }\n}\n" % sock)
    pf = None
    try:
        sasl.start()
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline, "Dovecot made no auth socket"
            time.sleep(0.05)
        cert, key = make_cert(str(tmp_path_factory.mktemp("relay-tls")))
        pf = Postfix(mynetworks="127.0.0.1/32", xclient_hosts="127.0.0.1/32", relay_domains=("example.com",),
                     main_cf={"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
                              "smtpd_sasl_path": sock, "smtpd_tls_security_level": "may",
                              "smtpd_tls_cert_file": cert, "smtpd_tls_key_file": key, "smtpd_tls_auth_only": "yes",
                              "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, "
                                                          "reject_unauth_destination"})
        pf.start()
        yield pf
    finally:
        if pf is not None:
            pf.close()
        sasl.close()
        shutil.rmtree(d, ignore_errors=True)


def snapshot(directory):
    """{path: content} of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            if not os.path.isfile(path):             # the control sockets
                continue
            with open(path, "rb") as fh:
                out[path] = fh.read()
    return out


def written_by(p, before, state):
    """{path: content} of the files the daemon wrote: new or changed under its directory (config,
    log, mmproxy.out), and its state directory's files."""
    now = snapshot(p.dir)
    out = {path: data for path, data in now.items() if before.get(path) != data}
    out.update(state)
    return out


def state_files(pid):
    """The files of the daemon's state directory on tmpfs (read while it runs: it goes at the stop);
    none for a daemon of one process, which keeps its state in memory (state.LocalState.private)."""
    dirs = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if "/mmproxy-state-" in target:
            dirs.add(os.path.dirname(target))
    out = {}
    for d in dirs:
        out.update(snapshot(d))
    return out


def forms(secret):
    """The ways a secret could show up in a file: its octets, UTF-8, Python's escapes, base64."""
    raw = secret if isinstance(secret, bytes) else secret.encode()
    out = {raw, repr(raw)[2:-1].encode(), base64.b64encode(raw)}
    try:
        out.add(raw.decode("latin-1").encode("utf-8"))
    except UnicodeError:
        pass
    return out


def b64(data):
    return base64.b64encode(data)


class Blobs:
    """The SASL blobs the clients send, kept to search for them afterwards."""

    def __init__(self):
        self.sent = []

    def __call__(self, data):
        blob = b64(data)
        self.sent.append(blob)
        return blob


def tls_client(sock):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx.wrap_socket(sock, server_hostname="localhost")


# ---------------------------------------------------------------------- the clients
def imap_logins(p, users, blob, client_cert):
    alice, bob, latin = users["alice"], users["bob"], users["latin"]

    def session():
        r = RawClient(p.host, p.imap_port)
        r.expect(b"* OK [CAPABILITY ")
        return r

    def done(r, tag):
        assert r.skip_to(tag + b" ").startswith(tag + b" OK"), tag
        r.send(b"z LOGOUT\r\n")
        r.skip_to(b"z ")

    r = session()
    r.send(b'a LOGIN alice "%s"\r\n' % alice["password"].encode())
    done(r, b"a")
    r = session()
    pw = latin["password"].encode(latin["password_charset"])            # 8-bit: ISO-8859-1
    r.send(b"a LOGIN latin {%d+}\r\n%s\r\n" % (len(pw), pw))
    done(r, b"a")
    r = session()
    r.send(b'a LOGIN %s "%s"\r\n' % (CMD_USER.encode(), CMD_PW.encode()))
    done(r, b"a")
    r = session()                                                       # SASL-IR
    r.send(b"a AUTHENTICATE PLAIN %s\r\n" % blob(b"\0bob\0" + bob["password"].encode()))
    done(r, b"a")
    r = session()                                                       # no initial response
    r.send(b"a AUTHENTICATE PLAIN\r\n")
    r.expect(b"+")
    r.send(blob(b"bob\0bob\0" + bob["password"].encode()) + b"\r\n")
    done(r, b"a")
    r = session()
    r.send(b"a AUTHENTICATE LOGIN\r\n")
    r.expect(b"+ ")
    r.send(blob(b"alice") + b"\r\n")
    r.expect(b"+ ")
    r.send(blob(alice["password"].encode()) + b"\r\n")
    done(r, b"a")
    r = session()
    r.send(b"a AUTHENTICATE LOGIN %s\r\n" % blob(CMD_USER.encode()))
    r.expect(b"+ ")
    r.send(blob(CMD_PW.encode()) + b"\r\n")
    done(r, b"a")
    r = session()
    r.send(b"a AUTHENTICATE CRAM-MD5\r\n")
    challenge = base64.b64decode(r.expect(b"+ ")[2:].strip())
    digest = hmac.new(CRAM_PW.encode(), challenge, hashlib.md5).hexdigest().encode()
    r.send(blob(CRAM_USER.encode() + b" " + digest) + b"\r\n")
    done(r, b"a")
    r = session()                                                       # STARTTLS, then LOGIN
    r.send(b"s STARTTLS\r\n")
    r.expect(b"s OK")
    r.sock, r.buf = tls_client(r.sock), b""
    r.send(b'a LOGIN alice "%s"\r\n' % alice["password"].encode())
    done(r, b"a")
    r = session()                                                       # wrong: the user's bind fails
    r.send(b'a LOGIN alice "%s"\r\nb AUTHENTICATE PLAIN %s\r\n'
           % (WRONG_PW.encode(), blob(b"\0bob\0" + WRONG_PW.encode() + b"2")))
    r.expect(b"a NO [AUTHENTICATIONFAILED]")
    r.expect(b"b NO [AUTHENTICATIONFAILED]")
    r.send(b"c AUTHENTICATE PLAIN\r\n")                                 # a raw password, no base64
    r.expect(b"+")
    r.send(RAW_PW.encode() + b"\r\n")
    r.expect(b"c BAD")
    r.send(b"d X%s\r\n" % RAW_PW.encode())                             # unknown command
    r.expect(b"d BAD")
    r.send(b"z LOGOUT\r\n")
    r.skip_to(b"z ")
    r = RawClient(p.host, p.imaps_port)                                 # certificate: StoreAdmin replays
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(*client_cert)
    r.sock = ctx.wrap_socket(r.sock, server_hostname="localhost")
    r.expect(b"* OK [CAPABILITY ")
    r.send(b"a AUTHENTICATE EXTERNAL =\r\n")
    done(r, b"a")


def pop_logins(p, users, blob):
    alice, bob, latin = users["alice"], users["bob"], users["latin"]

    def session():
        r = RawClient(p.host, p.pop_port)
        r.expect(b"+OK")
        return r

    def done(r):
        r.send(b"STAT\r\nQUIT\r\n")
        r.expect(b"+OK ")
        r.expect(b"+OK")

    for user, pw in ((b"alice", alice["password"].encode()), (b"latin", latin["password"].encode("iso-8859-1")),
                     (CMD_USER.encode(), CMD_PW.encode())):
        r = session()
        r.send(b"USER %s\r\nPASS %s\r\n" % (user, pw))
        r.expect(b"+OK")
        r.expect(b"+OK")
        done(r)
    r = RawClient(p.host, p.pop_port)
    greeting = r.expect(b"+OK")
    greeting_stamp = greeting[greeting.index(b"<"):greeting.rindex(b">") + 1]
    digest = hashlib.md5(greeting_stamp + CRAM_PW.encode()).hexdigest().encode()
    r.send(b"APOP %s %s\r\n" % (CRAM_USER.encode(), digest))
    r.expect(b"+OK")
    done(r)
    r = session()
    r.send(b"AUTH PLAIN %s\r\n" % blob(b"\0bob\0" + bob["password"].encode()))
    r.expect(b"+OK")
    done(r)
    r = session()
    r.send(b"AUTH PLAIN\r\n")
    r.expect(b"+ ")
    r.send(blob(b"\0alice\0" + alice["password"].encode()) + b"\r\n")
    r.expect(b"+OK")
    done(r)
    r = session()
    r.send(b"AUTH LOGIN\r\n")
    r.expect(b"+ ")
    r.send(blob(CMD_USER.encode()) + b"\r\n")
    r.expect(b"+ ")
    r.send(blob(CMD_PW.encode()) + b"\r\n")
    r.expect(b"+OK")
    done(r)
    r = session()
    r.send(b"AUTH LOGIN %s\r\n" % blob(b"bob"))
    r.expect(b"+ ")
    r.send(blob(bob["password"].encode()) + b"\r\n")
    r.expect(b"+OK")
    done(r)
    r = session()
    r.send(b"AUTH CRAM-MD5\r\n")
    challenge = base64.b64decode(r.expect(b"+ ")[2:].strip())
    digest = hmac.new(CRAM_PW.encode(), challenge, hashlib.md5).hexdigest().encode()
    r.send(blob(CRAM_USER.encode() + b" " + digest) + b"\r\n")
    r.expect(b"+OK")
    done(r)
    r = session()
    r.send(b"STLS\r\n")
    r.expect(b"+OK")
    r.sock, r.buf = tls_client(r.sock), b""
    r.send(b"USER alice\r\nPASS %s\r\n" % alice["password"].encode())
    r.expect(b"+OK")
    r.expect(b"+OK")
    done(r)
    r = session()
    r.send(b"USER alice\r\nPASS %s\r\n" % WRONG_PW.encode())
    r.expect(b"+OK")
    r.expect(b"-ERR [AUTH]")
    r.send(b"AUTH PLAIN\r\n")
    r.expect(b"+ ")
    r.send(RAW_PW.encode() + b"\r\n")
    r.expect(b"-ERR")
    r.send(b"QUIT\r\n")


def smtp_logins(p, blob):
    for starttls in (False, True):
        c = smtplib.SMTP(p.host, p.smtp_port, timeout=15)
        c.ehlo("client.example.net")
        if starttls:
            c.starttls(context=ssl._create_unverified_context())
            c.ehlo("client.example.net")
        code, _ = c.docmd("AUTH", "PLAIN " + blob(b"\0%s\0%s" % (SMTP_USER.encode(), SMTP_PW.encode())).decode())
        assert code == 235
        c.quit()
    c = smtplib.SMTP(p.host, p.smtp_port, timeout=15)
    c.ehlo("client.example.net")
    assert c.docmd("AUTH", "LOGIN")[0] == 334
    assert c.docmd(blob(SMTP_USER.encode()).decode())[0] == 334
    assert c.docmd(blob(SMTP_PW.encode()).decode())[0] == 235
    c.quit()
    c = smtplib.SMTP(p.host, p.smtp_port, timeout=15)
    c.ehlo("client.example.net")
    assert c.docmd("AUTH", "LOGIN " + blob(SMTP_USER.encode()).decode())[0] == 334
    assert c.docmd(blob(WRONG_PW.encode()).decode())[0] == 535
    assert c.docmd("AUTH", "PLAIN")[0] == 334
    assert c.docmd(RAW_PW)[0] in (501, 535)
    c.quit()


# ---------------------------------------------------------------------- the test
def test_no_secret_in_any_file_at_log_level_10(mail_stack, relay, tmp_path):
    info = mail_stack.info()
    _add_user(mail_stack, CMD_USER, CMD_PW, clear_text=False)
    _add_user(mail_stack, CRAM_USER, CRAM_PW, clear_text=True)
    ca = TestCA(str(tmp_path / "ca"), "secrets CA")
    cert, key = ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",), password=KEY_PW.encode())
    pwfile = tmp_path / "sslpassword.conf"
    pwfile.write_text("Internal (Software) Token:%s\n" % KEY_PW)
    (tmp_path / "certmap.conf").write_text(CERTMAP)
    tls_info = info["tls"]
    common = {"LogLevel": 10, "SSLKeyPasswdFile": str(pwfile)}
    store_side = {**common, "CRAMs": True, "CertmapFile": str(tmp_path / "certmap.conf"),
                  "SSLClientCAFile": tls_info["ca"], "UserGroupDN": "o=internet",
                  "StoreAdmin": tls_info["store_admin"], "StoreAdminPass": tls_info["store_admin_pw"]}
    p = Proxy(info, tls=(cert, key), aservice={"LogLevel": 10}, imap=dict(store_side), pop=dict(store_side),
              smtp={**common, "SmtpRelays": "%s:%d" % (relay.host, relay.port), "SmtpProxyPassword": LEGACY_SMTP_PW})
    users = info["users"]
    blob = Blobs()
    client_cert = mail_stack.ca.issue("secrets-alice", client=True, email="alice@example.com")
    p.write_config()
    before = snapshot(p.dir)
    with p:
        imap_logins(p, users, blob, client_cert)
        pop_logins(p, users, blob)
        smtp_logins(p, blob)
        wait_for_log(p, "login user=alice@example.com store=127.0.0.2")
        time.sleep(0.5)                          # the last session-end lines
        files = written_by(p, before, state_files(p.proc.pid))
        # a directory that refuses BindPass: the service's own bind fails
        bad = Proxy(info, imap={"LogLevel": 10, "BindPass": BAD_BINDPASS}, aservice={"LogLevel": 10})
        bad.write_config()
        bad_before = snapshot(bad.dir)
        with bad:
            r = RawClient(bad.host, bad.imap_port)
            r.expect(b"* OK")
            r.send(b'a LOGIN alice "%s"\r\n' % users["alice"]["password"].encode())
            r.expect(b"a NO [UNAVAILABLE]")
            wait_for_log(bad, "login failed user='alice'")
            files.update(written_by(bad, bad_before, state_files(bad.proc.pid)))
    log = b"".join(files.values())
    for needle in (b"login user=latin@example.com", b"login user=%s@example.com" % CMD_USER.encode(),
                   b"login user=%s@example.com" % CRAM_USER.encode(), b"login user=bob@example.com",
                   b"authenticated at relay", b"AUTH PLAIN ********", b"directory error"):
        assert needle in log, needle                     # level 10 was on, and every path was taken
    secrets = {"BindPass": info["ldap"]["bind_pw"], "bad BindPass": BAD_BINDPASS, "SSLKeyPasswdFile": KEY_PW,
               "StoreAdminPass": tls_info["store_admin_pw"], "SmtpProxyPassword": LEGACY_SMTP_PW,
               "SMTP SASL": SMTP_PW, "command-like": CMD_PW, "CRAM-MD5": CRAM_PW, "raw": RAW_PW,
               "wrong": WRONG_PW, "8-bit": users["latin"]["password"].encode("iso-8859-1")}
    secrets.update({"password of %s" % uid: users[uid]["password"] for uid in ("alice", "bob")})
    leaks = []
    for path, data in sorted(files.items()):
        for name, secret in secrets.items():
            for form in forms(secret):
                if form in data:
                    i = data.index(form)
                    leaks.append("%s: %s (%r) in %r" % (path, name, form, data[max(0, i - 80):i + 40]))
        for sent in blob.sent:
            if sent in data:
                leaks.append("%s: SASL blob %r" % (path, sent))
    assert not leaks, "\n".join(leaks)
    assert any(path.endswith(".log") for path in files) and len(blob.sent) >= 12
