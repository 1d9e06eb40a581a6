"""A legacy configuration tree that turns on every defence the Messaging Multiplexor had (BadGuys,
TCPAccess and the per-user filter, ConnLimits, ClientLookup, RestrictPlainPasswords, TLS with an
NSS-style certificate nickname, SSLBacksidePort, CertmapFile with a store administrator) passes
check-config, starts, and behaves, end to end with real clients against slapd, Dovecot and Postfix."""
import base64
import smtplib
import ssl
import subprocess
import sys
import time

import pytest

from mmproxy import imap, pop
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import RawClient, proxy_log, wait_for_log

CERTMAP = """certmap default default
default:DNComps
default:FilterComps e=mail
"""


@pytest.fixture(scope="module")
def legacy(mail_stack, tmp_path_factory):
    info = mail_stack.info()
    d = tmp_path_factory.mktemp("legacy")
    cert, key = make_cert(str(d / "made"))
    with open(d / "Server-Cert.pem", "wb") as f:          # SSLCacheDir/<nickname>.pem: chain and key
        f.write(open(cert, "rb").read() + open(key, "rb").read())
    (d / "certmap.conf").write_text(CERTMAP)
    (d / "bgexcluded").write_text("127.0.0.250/255.255.255.255\n")
    common = {
        "SSLKeyFile": None, "SSLCacheDir": str(d), "SSLCertNicknames": "Server-Cert",
        "SSLCipherSpecs": "all", "RestrictPlainPasswords": True, "ClientLookup": True,
        "ConnLimits": "0.0.0.0|0.0.0.0:20,127.0.0.64|255.255.255.255:2",
        "TCPAccess": "+imap,imaps,pop,pops:127.0.0.0/255.0.0.0 EXCEPT 127.0.0.66",
        "TCPAccessAttr": "mailAllowedServiceAccess",
        "BGMax": 5000, "BGPenalty": 1, "BGMaxBadness": 30, "BGDecay": 600, "BGLinear": False,
        "BGExcluded": str(d / "bgexcluded"),
        "CertmapFile": str(d / "certmap.conf"), "CertMapDN": "o=internet", "SSLClientCAFile": info["tls"]["ca"],
        "StoreAdmin": info["tls"]["store_admin"], "StoreAdminPass": info["tls"]["store_admin_pw"],
    }
    p = Proxy(info, tls=(cert, key), keep=False,
              imap={**common, "SSLBacksidePort": info["imaps_port"]},
              pop={**common, "SSLBacksidePort": info["pop3s_port"]},
              smtp={"SmtpRelays": "%s:%d" % (info["smtp"]["host"], info["smtp"]["port"]), "SmtpProxyPassword": "x",
                    "SSLKeyFile": None, "SSLCacheDir": str(d), "SSLCertNicknames": "Server-Cert",
                    "RestrictPlainPasswords": True, "ConnLimits": "0.0.0.0|0.0.0.0:20",
                    "TCPAccess": "-smtp,smtps:127.0.0.67"})
    p.write_config()
    check = subprocess.run([sys.executable, "-m", "mmproxy", "check-config", "--config-dir", p.config_dir],
                           capture_output=True, text=True, timeout=60)
    with p:
        yield p, check


def tls_ctx(cert=None):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def test_check_config_finds_no_error(legacy):
    p, check = legacy
    assert check.returncode == 0, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert lines[-1].endswith(", 0 errors, 2 warnings"), check.stdout
    assert [ln.split(": ", 1)[1] for ln in lines[:-1]] == [
        "warning: CertMapDN is obsolete, superseded by UserGroupDN; its value is still used"] * 2, check.stdout


def test_plaintext_refused_until_starttls_then_the_store_over_tls(legacy, mail_stack):
    p, _ = legacy
    store = mail_stack.stores["127.0.0.2"]

    def tls_logins():
        return [ln for ln in store.read_log().splitlines() if "Login: user=<alice>" in ln and ", TLS" in ln]
    before = len(tls_logins())
    r = RawClient(p.host, p.imap_port, source="127.0.0.61")
    assert b"LOGINDISABLED" in r.expect(b"* OK [CAPABILITY ")
    r.send(b"a LOGIN alice alice-pw\r\n")
    r.expect_lines("a " + imap.NO_PRIVACY)
    r.send(b"b STARTTLS\r\n")
    r.expect(b"b OK")
    r.sock = tls_ctx().wrap_socket(r.sock)
    r.send(b"c LOGIN alice alice-pw\r\n")
    assert r.skip_to(b"c ").startswith(b"c OK [CAPABILITY ")
    r.send(b"d LOGOUT\r\n")
    r.skip_to(b"d OK")
    deadline = time.monotonic() + 5                         # the store saw a TLS login (SSLBacksidePort)
    while len(tls_logins()) <= before:
        assert time.monotonic() < deadline, store.read_log()[-2000:]
        time.sleep(0.05)


def test_tcpaccess_connlimits_and_badguys(legacy):
    p, _ = legacy
    denied = RawClient(p.host, p.imap_port, source="127.0.0.66")
    assert denied.read_all() == (imap.ACCESS_DENIED + "\r\n").encode()
    denied = RawClient(p.host, p.pop_port, source="127.0.0.66")
    assert denied.read_all() == (pop.ACCESS_DENIED + "\r\n").encode()
    held = [RawClient(p.host, p.imap_port, source="127.0.0.64") for _ in range(2)]
    for c in held:
        c.expect(b"* OK")
    assert RawClient(p.host, p.imap_port, source="127.0.0.64").read_all() == \
        (imap.TOO_MANY_CONNECTIONS + "\r\n").encode()
    c = RawClient(p.host, p.imaps_port, source="127.0.0.65")
    c.sock = tls_ctx().wrap_socket(c.sock)
    c.expect(b"* OK")
    took = []
    for tag in (b"a", b"b"):
        t = time.monotonic()
        c.send(tag + b" LOGIN alice wrong\r\n")
        c.expect_lines(tag.decode() + " " + imap.NO_AUTH)
        took.append(time.monotonic() - t)
    assert took[0] < 0.8 and took[1] >= 1.0                  # BGPenalty 1
    e = RawClient(p.host, p.imaps_port, source="127.0.0.250")  # BGExcluded
    e.sock = tls_ctx().wrap_socket(e.sock)
    e.expect(b"* OK")
    for tag in (b"a", b"b"):
        t = time.monotonic()
        e.send(tag + b" LOGIN alice wrong\r\n")
        e.expect_lines(tag.decode() + " " + imap.NO_AUTH)
        assert time.monotonic() - t < 0.8


def test_certificate_login_and_pop_over_tls(legacy, mail_stack):
    p, _ = legacy
    alice = mail_stack.ca.issue("legacy-alice", client=True, email="alice@example.com")
    r = RawClient(p.host, p.imaps_port, source="127.0.0.62")
    r.sock = tls_ctx(alice).wrap_socket(r.sock)
    assert b" AUTH=EXTERNAL" in r.expect(b"* OK [CAPABILITY ")
    r.send(b"a AUTHENTICATE EXTERNAL =\r\n")
    assert r.expect(b"a OK [CAPABILITY ").endswith(b"] Logged in\r\n")
    wait_for_log(p, "login user=alice@example.com store=127.0.0.2")
    r = RawClient(p.host, p.pops_port, source="127.0.0.62")
    r.sock = tls_ctx().wrap_socket(r.sock)
    r.expect(b"+OK")
    r.send(b"USER bob\r\nPASS %s\r\n" % mail_stack.info()["users"]["bob"]["password"].encode())
    r.expect(b"+OK")
    assert r.expect(b"+OK")
    r.send(b"STAT\r\n")
    r.expect(b"+OK 1 ")


def test_smtp_tcpaccess_and_plaintext(legacy):
    p, _ = legacy
    denied = RawClient(p.host, p.smtp_port, source="127.0.0.67")
    assert denied.read_all() == b"421 4.7.0 Access denied\r\n"
    c = smtplib.SMTP(p.host, p.smtp_port, source_address=("127.0.0.68", 0), timeout=15)
    c.ehlo("client.example.net")
    assert "auth" not in c.esmtp_features                   # RestrictPlainPasswords: no AUTH before TLS
    code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0u\0p").decode())
    assert code == 538
    c.quit()
    assert "Traceback" not in proxy_log(p)
