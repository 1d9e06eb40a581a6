"""vdmap.cfg end to end: every parameter the Messaging Server manual lets a virtual domain set, set
for one server address only, changes what a client connecting to that address sees, and only there.

One proxy listens on 127.0.0.1 (the service's own settings) and on one more address per virtual
domain below; each domain sets one parameter (or a pair) to a value that differs from the service's.
Certificate logins (UserGroupDN, StoreAdminPass) are in test_tls, ClientLookup's SMTP effect in test_smtp.
"""
import imaplib
import os

import pytest

from mmproxy import imap
from mmproxy.config.params import PARAMS
from mmproxy.testing.base import free_port
from mmproxy.testing.proxy import LIBDIR, Proxy

from helpers import RawClient, unused_port

pytestmark = pytest.mark.timeout(120)

HOME = "127.0.0.1"
DOMAINS = {     # server address -> (virtual domain, its vdmap.cfg lines)
    "127.0.0.5": ("short", ["DefaultDomain example.org"]),
    "127.0.0.6": ("plus", ['VirtualDomainDelim "+"']),
    "127.0.0.7": ("search", ['SearchFormat "(uid=nobody-%U)"']),
    "127.0.0.8": ("replay", ['ReplayFormat "%U@%V"']),
    "127.0.0.9": ("nopre", ["PreAuth no"]),
    "127.0.0.10": ("strict", ["RestrictPlainPasswords yes"]),
    "127.0.0.11": ("crams", ["CRAMs yes"]),
    "127.0.0.12": ("xquery", ["AuthService yes"]),
    "127.0.0.13": ("deadldap", ["LdapURL ldap://127.0.0.1:DEAD/o=internet"]),
    "127.0.0.14": ("badbind", ["BindDN cn=nobody,o=internet", "BindPass wrong"]),
    "127.0.0.15": ("hostattr", ["MailHostAttrs description"]),
    "127.0.0.16": ("flat", ["HostedDomains no", 'SearchFormat "uid=%U"']),
    "127.0.0.17": ("access", ['TCPAccess "-imap,pop:127.0.0.1"']),
    "127.0.0.18": ("nottl", ["LdapCacheTTL 0", "AuthCacheTTL 0"]),
    "127.0.0.19": ("nosize", ["LdapCacheSize 0", "AuthCacheSize 0"]),
    "127.0.0.20": ("admin", ["ClientLookup yes", "StoreAdmin admin2", "StoreAdminPass admin2-pw",
                             "CertMapDN o=example.com,o=internet"]),
}


@pytest.fixture(scope="module")
def proxy(mail_stack, tmp_path_factory):
    d = tmp_path_factory.mktemp("vdmap")
    dead = unused_port()
    lines = []
    for ip, (name, settings) in DOMAINS.items():
        lines.append("vdmap %s %s" % (name, ip))
        lines += ["%s:%s" % (name, s.replace("DEAD", str(dead))) for s in settings]
    (d / "vdmap.cfg").write_text("\n".join(lines) + "\n")
    ips = [HOME, *DOMAINS]
    ports = {"imap": free_port(*ips), "pop": free_port(*ips)}
    services = " ".join("%s/%s@%s" % (LIBDIR, f, "|".join("%s:%d" % (ip, ports[k]) for ip in ips))
                        for k, f in (("imap", "ImapProxyAService"), ("pop", "PopProxyAService")))
    vd = {"VirtualDomainFile": str(d / "vdmap.cfg")}
    with Proxy(mail_stack.info(), imap=dict(vd), pop=dict(vd, AuthServiceTTL=900), aservice={"ServiceList": services},
               imap_port=ports["imap"], pop_port=ports["pop"]) as p:
        yield p


def greeting(p, ip, kind="imap"):
    r = RawClient(ip, p.imap_port if kind == "imap" else p.pop_port)
    return r, r.expect(b"* OK" if kind == "imap" else b"+OK").decode().rstrip("\r\n")


def imap_login(p, ip, user, password):
    """The lines answering ``a LOGIN user password`` on the proxy's address ``ip``."""
    r, _ = greeting(p, ip)
    r.send(b'a LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
    lines = [r.readline().decode().rstrip("\r\n")]
    while lines[-1].startswith("* "):
        lines.append(r.readline().decode().rstrip("\r\n"))
    r.sock.close()
    return lines


def logged_in(lines):
    return lines[-1].startswith("a OK [CAPABILITY ") and lines[-1].endswith("] Logged in")


def test_the_registry_marks_what_the_manual_lists():
    """The Messaging Server 6 Administration Guide, "MMP Virtual Domains": AuthCacheSize and
    AuthCacheTTL, AuthService, BindDN and BindPass, CertMap (CertMapDN, now UserGroupDN),
    ClientLookup, CRAMs, DefaultDomain, DomainDelim (VirtualDomainDelim), HostedDomains, LdapCacheSize
    and LdapCacheTTL, LdapURL, MailHostAttrs, PreAuth, ReplayFormat, RestrictPlainPasswords,
    StoreAdmin and StoreAdminPass, SearchFormat, TCPAccess."""
    assert sorted(p.name for p in PARAMS.values() if p.per_domain) == sorted(
        "AuthCacheSize AuthCacheTTL AuthService BindDN BindPass CertMapDN UserGroupDN ClientLookup CRAMs "
        "DefaultDomain VirtualDomainDelim HostedDomains LdapCacheSize LdapCacheTTL LdapURL MailHostAttrs PreAuth "
        "ReplayFormat RestrictPlainPasswords StoreAdmin StoreAdminPass SearchFormat TCPAccess".split())


def test_default_domain(proxy):
    assert logged_in(imap_login(proxy, "127.0.0.5", "carol", "carol pw"))          # carol@example.org
    assert imap_login(proxy, HOME, "carol", "carol pw") == ["a " + imap.NO_AUTH]   # carol@example.com: nobody


def test_virtual_domain_delim(proxy):
    assert logged_in(imap_login(proxy, "127.0.0.6", "alice+example.com", "alice-pw"))
    assert imap_login(proxy, HOME, "alice+example.com", "alice-pw") == ["a " + imap.NO_AUTH]


def test_search_format(proxy):
    assert imap_login(proxy, "127.0.0.7", "alice", "alice-pw") == ["a " + imap.NO_AUTH]
    assert logged_in(imap_login(proxy, HOME, "alice", "alice-pw"))


def test_replay_format(proxy, mail_stack):
    """The store has no login alice@example.com: its own refusal passes through (PreAuth verified the password)."""
    lines = imap_login(proxy, "127.0.0.8", "alice", "alice-pw")
    assert lines[-1].startswith("a NO ") and not logged_in(lines)
    assert "alice@example.com" in mail_stack.stores["127.0.0.2"].read_log()
    assert logged_in(imap_login(proxy, HOME, "alice", "alice-pw"))


def test_preauth(proxy, mail_stack):
    """A wrong password reaches the store only where PreAuth is off."""
    store = mail_stack.stores["127.0.0.2"]
    before = store.read_log().count("user7")
    assert imap_login(proxy, HOME, "user7", "wrong") == ["a " + imap.NO_AUTH]
    assert store.read_log().count("user7") == before
    assert imap_login(proxy, "127.0.0.9", "user7", "wrong") == ["a " + imap.NO_AUTH]
    assert store.read_log().count("user7") > before


def test_restrict_plain_passwords(proxy):
    r, greet = greeting(proxy, "127.0.0.10")
    assert " LOGINDISABLED" in greet and " AUTH=PLAIN" not in greet
    r.send(b"a LOGIN alice alice-pw\r\n")
    r.expect_lines("a " + imap.NO_PRIVACY)
    _, greet = greeting(proxy, HOME)
    assert " LOGINDISABLED" not in greet and " AUTH=PLAIN" in greet


def test_crams(proxy, mail_stack):
    u = mail_stack.user("user9")       # challenge-response needs the password in clear text in LDAP
    mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: userPassword\nuserPassword: %s\n"
                                % (u["dn"], u["password"]))
    assert " AUTH=CRAM-MD5" in greeting(proxy, "127.0.0.11")[1]
    assert " AUTH=CRAM-MD5" not in greeting(proxy, HOME)[1]
    assert "<" in greeting(proxy, "127.0.0.11", "pop")[1]           # the APOP timestamp
    assert "<" not in greeting(proxy, HOME, "pop")[1]
    with imaplib.IMAP4("127.0.0.11", proxy.imap_port) as c:
        assert c.login_cram_md5("user9", u["password"])[0] == "OK"


def test_auth_service(proxy):
    r = RawClient(HOME, proxy.pop_port, "127.0.0.51")
    r.expect(b"+OK")
    r.send(b"USER user1\r\nPASS pw-user1\r\n")
    r.expect_lines("+OK")
    r.expect(b"+OK")
    r, _ = greeting(proxy, "127.0.0.12", "pop")
    r.send(b"XQUERYAUTH 127.0.0.51\r\n")
    assert r.expect(b"+OK user1@example.com ")
    r, _ = greeting(proxy, HOME, "pop")
    r.send(b"XQUERYAUTH 127.0.0.51\r\n")
    r.expect_lines("-ERR XQUERYAUTH is not enabled")


def test_ldap_url(proxy):
    assert imap_login(proxy, "127.0.0.13", "alice", "alice-pw") == ["a " + imap.NO_TEMP]


def test_bind_dn_and_pass(proxy):
    assert imap_login(proxy, "127.0.0.14", "alice", "alice-pw") == ["a " + imap.NO_TEMP]


def test_mail_host_attrs(proxy):
    assert imap_login(proxy, "127.0.0.15", "alice", "alice-pw") == [
        "* OK [ALERT] Your IMAP server appears to be temporarily out of service.", "a " + imap.NO_STORE]


def test_hosted_domains(proxy):
    """HostedDomains no: one flat user tree under the LdapURL base, the domain part is not looked up
    (SearchFormat uid=%U, as the default uid=%s would search for "alice@nowhere.example")."""
    assert logged_in(imap_login(proxy, "127.0.0.16", "alice@nowhere.example", "alice-pw"))
    assert imap_login(proxy, HOME, "alice@nowhere.example", "alice-pw") == ["a " + imap.NO_AUTH]


def test_tcp_access(proxy):
    r = RawClient("127.0.0.17", proxy.imap_port)
    r.expect_lines(imap.ACCESS_DENIED)
    r.expect_close()
    greeting(proxy, HOME)


def test_caches(proxy, mail_stack):
    """The user "cachey" moves to the other store and gets a new password.  The service's caches
    still have the old entry and the old password's bind (LdapCacheTTL, AuthCacheTTL); where a
    virtual domain turns the caches off (TTL 0, or size 0) the directory's new word counts at once."""
    people = mail_stack.info()["domains"]["example.com"]["people_dn"]
    dn = "uid=cachey,%s" % people
    mail_stack.slapd.add("dn: %s\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n"
                         "objectClass: inetOrgPerson\nobjectClass: inetUser\nobjectClass: mailUser\nuid: cachey\n"
                         "cn: Cachey\nsn: Cachey\nmailHost: 127.0.0.2\nuserPassword: old-pw\n" % dn)
    mail_stack.stores["127.0.0.2"].add_user("cachey", "old-pw")
    mail_stack.stores["127.0.0.3"].add_user("cachey", "new-pw")
    for ip in (HOME, "127.0.0.18", "127.0.0.19"):
        assert inbox_subject(ip, proxy, "old-pw") == "Subject: Welcome cachey on 127.0.0.2"
    mail_stack.slapd.ldapmodify("dn: %s\nchangetype: modify\nreplace: mailHost\nmailHost: 127.0.0.3\n-\n"
                                "replace: userPassword\nuserPassword: new-pw\n" % dn)
    assert inbox_subject(HOME, proxy, "old-pw") == "Subject: Welcome cachey on 127.0.0.2"
    for ip in ("127.0.0.18", "127.0.0.19"):
        assert imap_login(proxy, ip, "cachey", "old-pw") == ["a " + imap.NO_AUTH]
        assert inbox_subject(ip, proxy, "new-pw") == "Subject: Welcome cachey on 127.0.0.3"


def inbox_subject(ip, p, password):
    with imaplib.IMAP4(ip, p.imap_port) as c:
        c.login("cachey", password)
        c.select("INBOX", readonly=True)
        return c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1][0][1].decode().strip()


def test_the_rest_through_the_session_objects(proxy):
    """ClientLookup, StoreAdmin/StoreAdminPass and CertMapDN show no difference over IMAP without TLS
    (end to end: test_smtp's ClientLookup, test_tls's certificate logins per virtual domain): the
    objects a session on that address uses carry the domain's values."""
    from mmproxy.config import load_config
    from mmproxy.imap import ImapService
    config = load_config(proxy.config_dir)
    entry = next(e for e in config.services if e.spec.kind == "imap")
    service = ImapService(entry)
    try:
        home = service.directory_for(HOME)
        assert service.directory_for("127.0.0.18") is not home
        assert service.directory_for("::ffff:127.0.0.18") is service.directory_for("127.0.0.18")
        assert service.directory_for("127.0.0.5") is home        # DefaultDomain alone: the service's directory
        assert service.directory_for("127.0.0.20") is not home   # CertMapDN: searches of its own
        cfg = service.cfg.override(service.overrides_for("127.0.0.20"))
        assert (cfg.ClientLookup, cfg.StoreAdmin, cfg.StoreAdminPass, cfg.CertMapDN) == (
            True, "admin2", "admin2-pw", "o=example.com,o=internet")
        assert (service.cfg.ClientLookup, service.cfg.StoreAdmin, service.cfg.CertMapDN) == (False, None, None)
    finally:
        service.close()
    assert os.path.exists(proxy.config_dir)
