"""TLS end to end: to the store (SSLBacksidePort against Dovecot's imaps/pop3s listeners), the TLS
policy towards clients (SSLMinVersion, SSLCipherSpecs), certificates checked and reloaded, and
client-certificate logins (CertmapFile, AUTHENTICATE EXTERNAL / AUTH EXTERNAL, a Dovecot master user)."""
import base64
import imaplib
import poplib
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from unittest.mock import ANY as mock_any_value

import gevent
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mmproxy import imap, pop, tls
from mmproxy.backend import Store
from mmproxy.config import ServiceConfig
from mmproxy.errors import BackendUnavailable
from mmproxy.testing.base import free_port
from mmproxy.testing.certs import TestCA, to_pkcs12
from mmproxy.testing.proxy import Proxy, make_cert, write_cfg

from helpers import ImapFrom, PopFrom, RawClient, proxy_log, wait_for_log


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A CA that signed none of the stores' certificates."""
    return TestCA(str(tmp_path_factory.mktemp("other-ca")), "some other CA")


def store_tls(info, ca=None):
    """Proxy settings for TLS to the stores: imaps/pop3s ports, verifying with ``ca`` when given."""
    imap_cfg = {"SSLBacksidePort": info["imaps_port"]}
    pop_cfg = {"SSLBacksidePort": info["pop3s_port"]}
    if ca:
        imap_cfg["SSLBacksideCAFile"] = pop_cfg["SSLBacksideCAFile"] = ca
    return imap_cfg, pop_cfg


def new_lines(store, marker, before, timeout=5.0):
    """The store-log lines with ``marker`` after the first ``before`` of them (other tests log in too)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in store.read_log().splitlines() if marker in ln]
        if len(lines) > before or time.monotonic() > deadline:
            return lines[before:]
        time.sleep(0.05)


def count(store, marker):
    return store.read_log().count(marker)


# ---------------------------------------------------------------------- TLS to the store
@pytest.mark.parametrize("verify", [False, True], ids=["unverified", "verified"])
def test_imap_to_the_store_over_tls(mail_stack, verify):
    info = mail_stack.info()
    imap_cfg, _ = store_tls(info, info["tls"]["ca"] if verify else None)
    store = mail_stack.stores["127.0.0.2"]
    marker = "imap-login: Info: Login: user=<alice>"
    before = count(store, marker)
    with Proxy(info, imap=imap_cfg) as p:
        c = ImapFrom(p.host, p.imap_port)
        typ, data = c.login("alice", "alice-pw")
        assert typ == "OK" and data[0].startswith(b"[CAPABILITY IMAP4rev1 ") and data[0].endswith(b"] Logged in")
        assert c.select("INBOX", readonly=True)[0] == "OK"
        typ, data = c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"Welcome alice on 127.0.0.2" in data[0][1]
        c.logout()
        lines = new_lines(store, marker, before)
        assert len(lines) == 1 and ", TLS," in lines[0], lines
        assert "rip=127.0.0.1" in lines[0]          # the ID with the real client still went first
        assert "login user=alice@example.com store=127.0.0.2:%d" % info["imaps_port"] in proxy_log(p)


def test_pop_to_the_store_over_tls(mail_stack):
    info = mail_stack.info()
    _, pop_cfg = store_tls(info, info["tls"]["ca"])
    store = mail_stack.stores["127.0.0.3"]
    marker = "pop3-login: Info: Login: user=<bob>"
    before = count(store, marker)
    with Proxy(info, imap=False, pop=pop_cfg) as p:
        c = PopFrom(p.host, p.pop_port)
        c.user("bob@example.com")
        assert c.pass_(info["users"]["bob"]["password"]).startswith(b"+OK")
        assert c.stat()[0] == 1
        assert c.quit().startswith(b"+OK")
        lines = new_lines(store, marker, before)
        assert len(lines) == 1 and ", TLS," in lines[0] and "rip=127.0.0.1" in lines[0], lines


def test_store_certificate_from_another_ca_is_refused(mail_stack, other_ca):
    """Verification on, the store's certificate chains to another CA: the store is unavailable
    for this login (the protocol's temporary failure), and nothing was sent to it."""
    info = mail_stack.info()
    imap_cfg, pop_cfg = store_tls(info, other_ca.path)
    with Proxy(info, imap=imap_cfg, pop=pop_cfg) as p:
        r = RawClient(p.host, p.imap_port)
        r.skip_to(b"* OK")
        r.send(b"a1 LOGIN alice alice-pw\r\n")
        r.expect_lines("* OK [ALERT] Your IMAP server appears to be temporarily out of service.",
                       "a1 " + imap.NO_STORE)
        r.send(b"a2 LOGOUT\r\n")
        r.expect_lines(imap.BYE_LOGOUT, "a2 OK Logout completed")
        r = RawClient(p.host, p.pop_port)
        r.skip_to(b"+OK")
        r.send(b"USER alice\r\nPASS alice-pw\r\n")
        r.expect_lines("+OK", pop.ERR_STORE)
        log = wait_for_log(p, "TLS certificate refused")
        assert ("127.0.0.2:%d: TLS certificate refused: unable to get local issuer certificate"
                % info["imaps_port"]) in log


def _tls_server(ctx):
    """A loopback listener whose every connection gets a server-side handshake with ``ctx`` (None:
    accepted and left silent).  (port, stop)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    held = []

    def serve():
        while True:
            conn, _ = lst.accept()
            held.append(conn)
            if ctx is not None:
                try:
                    held.append(ctx.wrap_socket(conn, server_side=True))
                except (OSError, ssl.SSLError):
                    pass

    g = gevent.spawn(serve)

    def stop():
        g.kill()
        for s in held + [lst]:
            s.close()
    return lst.getsockname()[1], stop


def test_store_name_is_checked_when_verifying(tmp_path):
    """A certificate from the trusted CA that names another address than the store's mailHost is refused."""
    ca = TestCA(str(tmp_path), "name check CA")
    cert, key = ca.issue("elsewhere", ips=("127.0.0.9",))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    port, stop = _tls_server(sctx)
    try:
        ctx = tls.client_context(ServiceConfig("imap"), ca.path)
        with pytest.raises(BackendUnavailable, match="TLS certificate refused: IP address mismatch"):
            Store("127.0.0.1", port, tls=ctx)
        Store("127.0.0.1", port, tls=tls.client_context(ServiceConfig("imap"))).close()   # unverified: accepted
    finally:
        stop()


def test_store_handshake_has_a_deadline():
    """A store that accepts and never answers the ClientHello fails the login at the deadline."""
    port, stop = _tls_server(None)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"127.0.0.1:\d+: the store's part of the login \(connect, "
                                                     r"TLS handshake\) took more than 1 s"):
            Store("127.0.0.1", port, 1.0, tls=tls.client_context(ServiceConfig("imap")))
        assert 0.9 < time.monotonic() - started < 3
    finally:
        stop()


# ---------------------------------------------------------------------- the policy towards clients
def client_ctx(maximum=None, minimum=None, ciphers=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():           # TLS 1.0/1.1 are deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum:
            ctx.minimum_version = minimum
        if maximum:
            ctx.maximum_version = maximum
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def tls_greeting(p, ctx):
    """Connect to the implicit-TLS IMAP port with ``ctx``: (TLS version, cipher, greeting line)."""
    s = ctx.wrap_socket(socket.create_connection((p.host, p.imaps_port), 5), server_hostname="localhost")
    try:
        s.settimeout(5)
        return s.version(), s.cipher()[0], s.recv(4096)
    finally:
        s.close()


def test_tls_1_2_minimum_by_default_and_lowered_knowingly(mail_stack, certs):
    old = dict(maximum=ssl.TLSVersion.TLSv1_1, minimum=ssl.TLSVersion.TLSv1, ciphers="DEFAULT:@SECLEVEL=0")
    with Proxy(mail_stack.info(), tls=certs) as p:
        with pytest.raises(ssl.SSLError):
            tls_greeting(p, client_ctx(**old))
        version, _, greeting = tls_greeting(p, client_ctx())
        assert version == "TLSv1.3" and greeting.startswith(b"* OK [CAPABILITY ")
    with Proxy(mail_stack.info(), tls=certs, imap={"SSLMinVersion": "TLSv1.1"}) as p:
        version, _, greeting = tls_greeting(p, client_ctx(**old))
        assert version == "TLSv1.1" and greeting.startswith(b"* OK [CAPABILITY ")
        assert "TLSv1.1 is below TLSv1.2: RFC 8996 deprecates" in p.output(), p.output()   # start warns


def test_cipher_specs_are_honoured(mail_stack, certs):
    with Proxy(mail_stack.info(), tls=certs, imap={"SSLCipherSpecs": "ECDHE-RSA-AES128-GCM-SHA256"}) as p:
        version, cipher, _ = tls_greeting(p, client_ctx(maximum=ssl.TLSVersion.TLSv1_2))
        assert (version, cipher) == ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")
        with pytest.raises(ssl.SSLError):
            tls_greeting(p, client_ctx(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES256-GCM-SHA384"))


# ---------------------------------------------------------------------- certificates: check-config, refresh
def check_config(tmp_path, settings):
    """check-config over an IMAP service with these settings: (exit code, output)."""
    write_cfg(str(tmp_path / "AService.cfg"), {"ServiceList": "/opt/lib/ImapProxyAService@%d" % free_port()})
    write_cfg(str(tmp_path / "ImapProxyAService.cfg"), {"LdapURL": "ldap://127.0.0.1:1/o=internet", **settings})
    r = subprocess.run([sys.executable, "-m", "mmproxy", "check-config", "--config-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stdout + r.stderr
    return r.returncode, r.stdout + r.stderr


def tls_settings(cert, key=None, **more):
    out = {"SSLEnable": True, "SSLCertFile": cert}
    if key:
        out["SSLKeyFile"] = key
    out.update(more)
    return out


def test_check_config_certificates(tmp_path):
    ca = TestCA(str(tmp_path / "ca"), "check CA")
    f = str(tmp_path / "ImapProxyAService.cfg")
    good, good_key = ca.issue("good", dns=("mail.example.com",))
    assert check_config(tmp_path, tls_settings(good, good_key)) == (0, mock_any_value)
    soon, soon_key = ca.issue("soon", days=10)
    rc, out = check_config(tmp_path, tls_settings(soon, soon_key))
    assert rc == 0 and "%s:4: warning: %s: the certificate (" % (f, soon) in out and "in 9 day(s)" in out, out
    old, old_key = ca.issue("old", days=-2, not_before_days=30)
    rc, out = check_config(tmp_path, tls_settings(old, old_key))
    assert rc == 1 and "%s:4: %s: the certificate (" % (f, old) in out and "expired on" in out, out
    rc, out = check_config(tmp_path, tls_settings(good, soon_key))
    assert rc == 1 and "%s: the private key in %s does not match the certificate" % (good, soon_key) in out, out


def test_check_config_pkcs12_and_encrypted_keys_with_the_legacy_password_file(tmp_path):
    ca = TestCA(str(tmp_path / "ca"), "check CA")
    pwfile = tmp_path / "sslpassword.conf"
    pwfile.write_text("Internal (Software) Token:s3cret\n")
    cert, key = ca.issue("enc", password=b"s3cret")
    assert check_config(tmp_path, tls_settings(cert, key, SSLKeyPasswdFile=str(pwfile)))[0] == 0
    rc, out = check_config(tmp_path, tls_settings(cert, key))
    assert rc == 1 and "is the key encrypted and SSLKeyPasswdFile missing?" in out, out
    cache = tmp_path / "alias"
    cache.mkdir()
    plain_cert, plain_key = ca.issue("plain", days=5)
    to_pkcs12(plain_cert, plain_key, str(cache / "Server-Cert.p12"), b"s3cret")
    rc, out = check_config(tmp_path, {"SSLEnable": True, "SSLCacheDir": str(cache), "SSLCertNicknames": "Server-Cert",
                                      "SSLKeyPasswdFile": str(pwfile)})
    assert rc == 0 and "Server-Cert.p12: the certificate (" in out and "in 4 day(s)" in out, out


def test_refresh_reloads_the_certificate_and_keeps_sessions(mail_stack, tmp_path):
    """SIGHUP: a session established before keeps working; a new connection sees the new certificate."""
    ca = TestCA(str(tmp_path), "refresh CA")
    first = ca.issue("first", dns=("localhost",))
    with Proxy(mail_stack.info(), tls=first) as p:
        c = imaplib.IMAP4_SSL(p.host, p.imaps_port, ssl_context=client_ctx())
        c.login("alice", "alice-pw")
        serial = cert_serial(p)
        second = ca.issue("second", dns=("localhost",))
        p.tls = second
        p.write_config()
        p.proc.send_signal(signal.SIGHUP)
        wait_for_log(p, "configuration refreshed")
        assert cert_serial(p) != serial and cert_serial(p) == pem_serial(second[0])
        assert c.select("INBOX", readonly=True)[0] == "OK"          # the session from before goes on
        assert c.noop()[0] == "OK"
        c.logout()


def cert_serial(p):
    s = client_ctx().wrap_socket(socket.create_connection((p.host, p.imaps_port), 5), server_hostname="localhost")
    try:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number
    finally:
        s.close()


def pem_serial(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number


# ---------------------------------------------------------------------- client certificates (CertmapFile)
CERTMAP = """# certmap.conf as the MMP documented it: search the whole UserGroupDN by the e-mail address
certmap default default
default:DNComps
default:FilterComps e=mail
# certificates of the "other" CA: every inetOrgPerson (a mapping to several entries)
certmap other %s
other:DNComps
other:FilterComps ou=objectClass
"""


@pytest.fixture(scope="module")
def certmap_proxy(mail_stack, certs, other_ca, tmp_path_factory):
    """IMAP and POP with client certificates from the stack's CA (and the other CA) mapped by e-mail address."""
    d = tmp_path_factory.mktemp("certmap")
    cas = d / "client-cas.pem"
    cas.write_bytes(open(mail_stack.info()["tls"]["ca"], "rb").read() + open(other_ca.path, "rb").read())
    issuer = other_ca.cert.subject.rfc4514_string()
    (d / "certmap.conf").write_text(CERTMAP % issuer)
    tls_info = mail_stack.info()["tls"]
    settings = {"CertmapFile": str(d / "certmap.conf"), "SSLClientCAFile": str(cas), "UserGroupDN": "o=internet",
                "StoreAdmin": tls_info["store_admin"], "StoreAdminPass": tls_info["store_admin_pw"]}
    with Proxy(mail_stack.info(), tls=certs, imap=dict(settings), pop=dict(settings)) as p:
        yield p


def client_cert_ctx(cert=None):
    ctx = client_ctx()
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def tls_raw(p, port, cert=None):
    """A RawClient over implicit TLS, presenting ``cert`` (cert, key) when given."""
    r = RawClient(p.host, port)
    r.sock = client_cert_ctx(cert).wrap_socket(r.sock, server_hostname="localhost")
    return r


@pytest.fixture(scope="module")
def alice_cert(mail_stack):
    return mail_stack.ca.issue("alice-client", client=True, email="alice@example.com")


def test_imap_certificate_login_as_the_store_admin(mail_stack, certmap_proxy, alice_cert):
    p = certmap_proxy
    store = mail_stack.stores["127.0.0.2"]
    before = count(store, "Master user logging in as alice")
    c = imaplib.IMAP4_SSL(p.host, p.imaps_port, ssl_context=client_cert_ctx(alice_cert))
    assert "AUTH=EXTERNAL" in c.capabilities and "AUTH=PLAIN" in c.capabilities
    typ, data = c.authenticate("EXTERNAL", lambda challenge: b"")
    assert typ == "OK" and data[0].endswith(b"] Logged in"), data
    assert c.select("INBOX", readonly=True)[0] == "OK"
    assert b"Welcome alice on 127.0.0.2" in c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1][0][1]
    c.logout()
    assert len(new_lines(store, "Master user logging in as alice", before)) == 1
    log = proxy_log(p)
    assert "login user=alice@example.com store=127.0.0.2" in log and "mmpstore-pw" not in log


def test_imap_external_exact_lines(certmap_proxy, alice_cert):
    """SASL-IR with an empty authorization identity ('='), with the same user's, with another user's."""
    r = tls_raw(certmap_proxy, certmap_proxy.imaps_port, alice_cert)
    assert b" AUTH=EXTERNAL" in r.expect(b"* OK [CAPABILITY ")
    r.send(b"a1 AUTHENTICATE EXTERNAL " + base64.b64encode(b"bob@example.com") + b"\r\n")
    r.expect_lines("a1 " + imap.NO_AUTHZ)
    r.send(b"a2 AUTHENTICATE EXTERNAL " + base64.b64encode(b"alice@example.com") + b"\r\n")
    assert r.expect(b"a2 OK [CAPABILITY ").endswith(b"] Logged in\r\n")
    r.send(b"a3 LOGOUT\r\n")
    assert r.expect(b"* BYE ")
    r = tls_raw(certmap_proxy, certmap_proxy.imaps_port, alice_cert)
    r.expect(b"* OK [CAPABILITY ")
    r.send(b"a1 AUTHENTICATE EXTERNAL =\r\n")
    assert r.expect(b"a1 OK [CAPABILITY ").endswith(b"] Logged in\r\n")


@pytest.mark.parametrize("setting", ["UserGroupDN dc=example,dc=org,o=internet", "StoreAdminPass not-the-pw"],
                         ids=["UserGroupDN", "StoreAdminPass"])
def test_certificate_logins_per_virtual_domain(mail_stack, certs, other_ca, alice_cert, tmp_path, setting):
    """vdmap.cfg: a virtual domain's UserGroupDN (where the certificate's entry is searched: alice is
    not under example.org) and StoreAdminPass (the store's master login) apply to its sessions."""
    cas = tmp_path / "client-cas.pem"
    cas.write_bytes(open(mail_stack.info()["tls"]["ca"], "rb").read() + open(other_ca.path, "rb").read())
    (tmp_path / "certmap.conf").write_text(CERTMAP % other_ca.cert.subject.rfc4514_string())
    (tmp_path / "vdmap.cfg").write_text("vdmap local 127.0.0.1\nlocal:%s\n" % setting)
    tls_info = mail_stack.info()["tls"]
    settings = {"CertmapFile": str(tmp_path / "certmap.conf"), "SSLClientCAFile": str(cas), "UserGroupDN": "o=internet",
                "StoreAdmin": tls_info["store_admin"], "StoreAdminPass": tls_info["store_admin_pw"],
                "VirtualDomainFile": str(tmp_path / "vdmap.cfg")}
    with Proxy(mail_stack.info(), tls=certs, imap=settings) as p:
        r = tls_raw(p, p.imaps_port, alice_cert)
        assert b" AUTH=EXTERNAL" in r.expect(b"* OK [CAPABILITY ")
        r.send(b"a1 AUTHENTICATE EXTERNAL =\r\n")
        r.expect_lines("a1 " + imap.NO_AUTH)
        wait_for_log(p, "maps to no entry" if setting.startswith("UserGroupDN") else "refused by store: a1 NO ")


def test_external_needs_a_mapped_certificate(certmap_proxy, mail_stack, other_ca):
    """No certificate: EXTERNAL is neither offered nor taken.  A certificate that maps to nobody,
    or to several entries, is a failed login."""
    r = tls_raw(certmap_proxy, certmap_proxy.imaps_port)
    assert b"AUTH=EXTERNAL" not in r.expect(b"* OK [CAPABILITY ")
    r.send(b"a1 AUTHENTICATE EXTERNAL =\r\n")
    r.expect_lines("a1 " + imap.NO_MECHANISM)
    nobody = mail_stack.ca.issue("nobody-client", client=True, email="nobody@example.com")
    r = tls_raw(certmap_proxy, certmap_proxy.imaps_port, nobody)
    assert b" AUTH=EXTERNAL" in r.expect(b"* OK [CAPABILITY ")
    r.send(b"a1 AUTHENTICATE EXTERNAL =\r\n")
    r.expect_lines("a1 " + imap.NO_AUTH)
    many = other_ca.issue("many-client", client=True, subject=x509.Name([
        x509.NameAttribute(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME, "inetOrgPerson"),
        x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "many")]))
    r = tls_raw(certmap_proxy, certmap_proxy.pops_port, many)
    r.expect(b"+OK")
    r.send(b"AUTH EXTERNAL =\r\n")
    r.expect_lines(pop.ERR_AUTH)
    log = wait_for_log(certmap_proxy, "maps to several entries")
    assert ("certificate 1.2.840.113549.1.9.1=nobody@example.com,CN=nobody-client,O=mmproxy tests maps to no entry"
            in log), log[-3000:]


def test_pop_certificate_login(mail_stack, certmap_proxy):
    bob = mail_stack.ca.issue("bob-client", client=True, email="bob@example.com")
    store = mail_stack.stores["127.0.0.3"]
    before = count(store, "Master user logging in as bob")
    c = poplib.POP3_SSL(certmap_proxy.host, certmap_proxy.pops_port, context=client_cert_ctx(bob))
    assert "EXTERNAL" in c.capa()["SASL"]
    assert c._shortcmd("AUTH EXTERNAL =").startswith(b"+OK")
    assert c.stat()[0] == 1
    c.quit()
    assert len(new_lines(store, "Master user logging in as bob", before)) == 1


def test_check_config_certmap(tmp_path):
    cm = tmp_path / "certmap.conf"
    cm.write_text("certmap default default\ndefault:DNComps\n\ndefault:Library /opt/lib/plugin.so\n")
    rc, out = check_config(tmp_path, {"CertmapFile": str(cm)})
    assert rc == 1
    assert "%s:4: default:Library: certmap plug-ins are not supported" % cm in out, out
    assert "CertmapFile needs SSLEnable and SSLClientCAFile and StoreAdmin and StoreAdminPass" in out, out
    cm.write_text("default:DNComps\n")
    assert "%s:1: mapping 'default' is used before its" % cm in check_config(tmp_path, {"CertmapFile": str(cm)})[1]


def test_verifycert_compares_with_the_directory_entry(mail_stack, certs, tmp_path):
    """VerifyCert on: only the certificate stored in the entry's userCertificate logs in; a second
    certificate with the same subject maps to nobody.  dave is in the example.org domain (replayed
    as dave@example.org): the login id comes from the entry (uid and the domain of its mail)."""
    info = mail_stack.info()
    (tmp_path / "certmap.conf").write_text("certmap default default\ndefault:DNComps\ndefault:FilterComps e\n"
                                           "default:VerifyCert on\n")
    stored = mail_stack.ca.issue("dave-stored", client=True, email="dave@example.org")
    other = mail_stack.ca.issue("dave-other", client=True, email="dave@example.org")
    with open(stored[0], "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
    dn = info["users"]["dave"]["dn"]
    mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: userCertificate;binary\n"
                                "userCertificate;binary:: %s\n" % (dn, base64.b64encode(der).decode()))
    settings = {"CertmapFile": str(tmp_path / "certmap.conf"), "SSLClientCAFile": info["tls"]["ca"],
                "StoreAdmin": info["tls"]["store_admin"], "StoreAdminPass": info["tls"]["store_admin_pw"]}
    try:
        with Proxy(info, tls=certs, imap=settings) as p:
            r = tls_raw(p, p.imaps_port, other)
            r.expect(b"* OK [CAPABILITY ")
            r.send(b"a1 AUTHENTICATE EXTERNAL =\r\n")
            r.expect_lines("a1 " + imap.NO_AUTH)
            r = tls_raw(p, p.imaps_port, stored)
            r.expect(b"* OK [CAPABILITY ")
            r.send(b"a1 AUTHENTICATE EXTERNAL =\r\na2 SELECT INBOX\r\n")
            assert r.expect(b"a1 OK [CAPABILITY ").endswith(b"] Logged in\r\n")
            assert r.skip_to(b"a2 ").startswith(b"a2 OK [READ-WRITE]")
            assert "login user=dave@example.org store=127.0.0.2" in proxy_log(p)
    finally:
        mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\ndelete: userCertificate;binary\n" % dn)
