"""Value types and the registry: every legacy syntax a .cfg value may take."""
import ipaddress

import pytest

from mmproxy.config import types as t
from mmproxy.config.params import PARAMS, Param, lookup, suggest, support_problem


def conv(name, raw, **ctx):
    return lookup(name).type.convert(raw, t.Ctx(**ctx))


# --- registry -----------------------------------------------------------------------------------------

LEGACY_NAMES = """SSLEnable SSLPorts SSLBacksidePort SSLCacheDir SSLCertPrefix SSLCertFile SSLCipherSpecs
SSLCertNicknames SSLKeyFile SSLKeyPasswdFile SSLSecmodFile AuthCacheSize AuthCacheTTL AuthenticationLdapAttributes
AuthenticationServer AuthService AuthServiceTTL BacksidePort Banner BeTheUser BeTheGroup BGMax BGPenalty BGMaxBadness
BGDecay BGLinear BGExcluded BindDN BindPass CanonicalVirtualDomainDelim Capability CertMapDN CertmapFile ClientLookup
ConnLimits CRAMs DefaultDomain EhloKeywords FailoverTimeout HostedDomains LdapCacheSize LdapCacheTTL
LdapRefreshInterval LdapURL LogDir LogLevel MailHostAttrs NumThreads PopBeforeSmtpKludgeChannel PreAuth ReplayFormat
RestrictPlainPasswords SearchFormat ServerDownAlert ServiceList SmtpProxyPassword SmtpRelays SpoofEmptyMailbox
SpoofMessageFile StoreAdmin StoreAdminPass TCPAccess TCPAccessAttr Timeout UserGroupDN VirtualDomainDelim
VirtualDomainFile""".split()

SUPPORTED = """ServiceList LogDir LogLevel NumThreads Banner Capability LdapURL BindDN BindPass HostedDomains
DefaultDomain VirtualDomainDelim CanonicalVirtualDomainDelim SearchFormat MailHostAttrs PreAuth ReplayFormat
LdapCacheSize LdapCacheTTL AuthCacheSize AuthCacheTTL LdapRefreshInterval BacksidePort ServerDownAlert Timeout
SSLEnable SSLPorts SSLCacheDir SSLCertPrefix SSLCertFile SSLCertNicknames SSLKeyFile SSLKeyPasswdFile SSLCipherSpecs
SSLSecmodFile RestrictPlainPasswords VirtualDomainFile CRAMs SpoofEmptyMailbox SpoofMessageFile AuthService
AuthServiceTTL SmtpRelays SmtpProxyPassword EhloKeywords FailoverTimeout PopBeforeSmtpKludgeChannel ClientLookup
SmtpRelayProxyProtocol BeTheUser BeTheGroup ConnLimits TCPAccess TCPAccessAttr""".split()
SUPPORTED += """SSLBacksidePort SSLBacksideCAFile SSLMinVersion SSLClientCAFile CertmapFile StoreAdmin StoreAdminPass
UserGroupDN CertMapDN""".split()           # TLS (issue 8)
SUPPORTED += "BGMax BGPenalty BGMaxBadness BGDecay BGLinear BGExcluded SmtpBadGuys".split()   # BadGuys (issue 8)
SUPPORTED += "LoginTimeout LoginIdleTimeout HandshakeTimeout StoreTimeout SmtpMessageTimeout".split()  # issue 8
SUPPORTED += "AuthenticationServer AuthenticationLdapAttributes AuthenticationServerTimeout".split()  # issue 9
SUPPORTED += "LdapCAFile LdapNegativeCacheTTL LdapStaleGrace".split()   # directory failover and caches (issue 9)
SUPPORTED += ["MaxConcurrentConnectionAttempts"]                                       # issue 9
SUPPORTED += ["ShutdownGrace"]                                                         # issue 10
SUPPORTED += ["MetricsAddress"]                                                         # issue 10
SUPPORTED += """ProxyProtocolPorts ProxyProtocolFrom InstanceName StateRedisURL StateRedisPrefix
StateRedisCAFile""".split()                 # a fleet (issue 12)


def test_registry_knows_every_legacy_name_with_its_spelling():
    for name in LEGACY_NAMES:
        assert lookup(name) is not None and lookup(name).name == name, name
    assert set(LEGACY_NAMES) <= {p.name for p in PARAMS.values()}


def test_lookup_is_case_insensitive_and_suggests():
    assert lookup("ldapurl") is lookup("LDAPURL") is PARAMS["ldapurl"]
    assert lookup("NoSuchThing") is None
    assert suggest("PreAuht") == "PreAuth"
    assert suggest("zzzz") is None


def test_supported_and_security_flags():
    assert {p.name for p in PARAMS.values() if p.supported} == set(SUPPORTED)
    security = {p.name for p in PARAMS.values() if p.security}
    assert {"TCPAccess", "RestrictPlainPasswords", "CertmapFile", "SSLBacksidePort", "SSLEnable"} <= security
    assert all(p.security for p in PARAMS.values() if p.name.startswith("SSL"))
    assert "TCPAccessAttr" not in security and "ConnLimits" not in security
    assert lookup("SSLCertFile").obsolete == "SSLCertPrefix" and lookup("CertMapDN").obsolete == "UserGroupDN"


def test_defaults_as_the_table_gives_them():
    d = {p.name: p.default for p in PARAMS.values()}
    assert ((d["AuthCacheSize"], d["AuthCacheTTL"], d["AuthServiceTTL"], d["LogLevel"], d["NumThreads"])
            == (10000, 900, -1, 1, 1))
    assert (d["BGMax"], d["BGPenalty"], d["BGMaxBadness"], d["BGDecay"], d["BGLinear"]) == (10000, 2, 60, 900, False)
    assert d["LdapRefreshInterval"] == 2100 and d["Timeout"] == 1800 and d["FailoverTimeout"] == 10
    assert d["MailHostAttrs"] == ("mailHost",) and d["SSLCipherSpecs"] == "all" and d["SSLCertPrefix"] == ""
    assert str(d["LdapURL"]) == "ldap://localhost/o=internet"
    assert d["TCPAccessAttr"] == "mailAllowedServiceAccess" and d["HostedDomains"] is True
    assert [(s.kind, [e.port for e in s.listeners]) for s in d["ServiceList"]] == [("imap", [143, 993]), ("pop", [110])]


def test_files_follow_the_seed():
    assert lookup("BeTheUser").files == ("A",) and lookup("ServiceList").files == ("A",)
    assert lookup("LogDir").files == ("A", "I", "P", "S")
    assert lookup("EhloKeywords").files == ("S",) and lookup("SpoofEmptyMailbox").files == ("P",)
    assert "S" not in lookup("LdapURL").files and lookup("LdapURL").honoured("S")
    assert not lookup("BacksidePort").honoured("S")


@pytest.mark.parametrize("p", [p for p in PARAMS.values() if p.default is not None
                               and not isinstance(p.default, t.Deferred)], ids=lambda p: p.name)
def test_every_default_renders_and_parses_back(p):
    text = p.type.render(p.default)
    if text:
        assert p.type.convert(text, t.Ctx()) == p.default


def test_support_problem():
    assert support_problem(lookup("PreAuth"), True) is None
    assert support_problem(lookup("AuthenticationLdapAttributes"), ("cn",)) is None
    control = Param("SomeControl", t.Str(), None, ("I",), "an access control not implemented", security=True)
    assert support_problem(control, "/x")[0] == "error"          # (every legacy one is implemented now)
    assert "refuses to start" in support_problem(control, "/x")[1]
    assert support_problem(lookup("CertmapFile"), "/x") is None


# --- scalars ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["yes", "YES", "Yes", "on", "ON", "true", "True", "TRUE", "1", " yes "])
def test_bool_true(raw):
    assert t.Bool().convert(raw) is True


@pytest.mark.parametrize("raw", ["no", "NO", "No", "off", "Off", "false", "FALSE", "0"])
def test_bool_false(raw):
    assert t.Bool().convert(raw) is False


@pytest.mark.parametrize("raw", ["y", "maybe", "2", "enabled"])
def test_bool_bad(raw):
    with pytest.raises(ValueError, match="yes/no, on/off, true/false or 1/0"):
        t.Bool().convert(raw)


def test_int_ranges():
    assert conv("LogLevel", "10") == 10
    with pytest.raises(ValueError, match="between 0 and 10"):
        conv("LogLevel", "11")
    with pytest.raises(ValueError, match="not a whole number"):
        conv("LogLevel", "ten")
    with pytest.raises(ValueError, match="between 1 and 65535"):
        conv("BacksidePort", "70000")
    with pytest.raises(ValueError, match="at least 0"):
        conv("LdapCacheSize", "-5")
    assert conv("AuthServiceTTL", "-1") == -1
    with pytest.raises(ValueError, match="at least -1"):
        conv("AuthServiceTTL", "-2")


def test_timeout_warns_below_the_rfc_minimum_per_service():
    ctx = t.Ctx(service="imap")
    assert lookup("Timeout").type.convert("600", ctx) == 600
    assert "RFC 3501/9051" in ctx.warnings[0]
    for service, value, warned in (("pop", "600", False), ("pop", "599", True), ("smtp", "300", True),
                                   ("imap", "1800", False), (None, "5", False)):
        ctx = t.Ctx(service=service)
        lookup("Timeout").type.convert(value, ctx)
        assert bool(ctx.warnings) == warned, (service, value)


def test_canonical_delimiter_is_one_character():
    assert conv("CanonicalVirtualDomainDelim", "+") == "+"
    with pytest.raises(ValueError):
        conv("CanonicalVirtualDomainDelim", "@+")


def test_dn():
    assert conv("BindDN", "cn=Directory Manager") == "cn=Directory Manager"
    assert conv("BindDN", r"uid=a\,b,ou=People, o=x+cn=y") == r"uid=a\,b,ou=People, o=x+cn=y"
    with pytest.raises(ValueError, match="DN component"):
        conv("BindDN", "Directory Manager")


def test_words():
    assert conv("MailHostAttrs", "mailHost  mailRoutingHost") == ("mailHost", "mailRoutingHost")


# --- paths --------------------------------------------------------------------------------------------

def test_path_relative_to_config_dir_and_existence(tmp_path):
    cfgdir = tmp_path / "config"
    cfgdir.mkdir()
    (cfgdir / "vdmap.cfg").write_text("")
    assert conv("VirtualDomainFile", "vdmap.cfg", config_dir=str(cfgdir)) == str(cfgdir / "vdmap.cfg")
    assert conv("LogDir", "/opt/SUNWmsgsr/data/log") == "/opt/SUNWmsgsr/data/log"   # not checked
    with pytest.raises(ValueError, match="does not exist"):
        conv("SSLKeyFile", str(tmp_path / "nope.pem"))
    with pytest.raises(ValueError, match="directory .* does not exist"):
        conv("SSLCacheDir", str(tmp_path / "nodir"))
    assert conv("SSLCacheDir", str(cfgdir)) == str(cfgdir)


@pytest.mark.parametrize("name", ["SSLCertFile", "SSLKeyFile"])
@pytest.mark.parametrize("db", ["cert8.db", "key3.db", "cert9.db", "key4.db"])
def test_nss_databases_are_refused_with_the_export_recipe(tmp_path, name, db):
    (tmp_path / db).write_bytes(b"\0")
    with pytest.raises(ValueError) as e:
        conv(name, str(tmp_path / db))
    assert "NSS database" in str(e.value) and "pk12util -o server.p12 -n Server-Cert -d %s" % tmp_path in str(e.value)
    assert "SSLCacheDir/SSLCertPrefix" in str(e.value)


def test_secmod_is_accepted_but_not_used():
    ctx = t.Ctx()
    assert lookup("SSLSecmodFile").type.convert("secmod.db", ctx) == "secmod.db"
    assert ctx.warnings and ctx.warnings[0].startswith("not used")


# --- endpoints and ServiceList ------------------------------------------------------------------------

def test_endpoints():
    E = t.Endpoint
    ep = t.Endpoints()
    assert ep.convert("993") == (E("", 993),)
    assert ep.convert("993|") == (E("", 993),)
    assert ep.convert("993|127.0.0.1:1993") == (E("", 993), E("127.0.0.1", 1993))
    assert ep.convert("[::1]:993 | [2001:DB8::1]:995") == (E("::1", 993), E("2001:db8::1", 995))
    assert [str(e) for e in ep.convert("10.0.0.1:143|[::1]:993|110")] == ["10.0.0.1:143", "[::1]:993", "110"]


@pytest.mark.parametrize("raw,why", [("::1:993", "brackets"), ("70000", "between 1 and 65535"),
                                     ("mail.example.com:993", "not an IP"), ("|", "no \\[IP:\\]PORT"),
                                     ("10.0.0.1:", "not a whole number"), ("999.1.1.1:25", "not an IP")])
def test_endpoints_bad(raw, why):
    with pytest.raises(ValueError, match=why):
        t.Endpoints().convert(raw)


def test_servicelist_paths_instances_sections_and_addresses():
    specs = conv("ServiceList", "/opt/SUNWmsgsr/lib/ImapProxyAService@143|993 "
                                "/opt/SUNWmsgsr/lib/popproxyaservice.so|pop2@10.0.0.1:110|[::1]:110 "
                                r"C:\mmp\SmtpProxyAService.dll|Smtp:east@25")
    assert [(s.kind, s.instance, s.section, s.filename) for s in specs] == [
        ("imap", "ImapProxyAService", "default", "ImapProxyAService.cfg"),
        ("pop", "pop2", "default", "pop2.cfg"),
        ("smtp", "Smtp", "east", "Smtp.cfg")]
    assert specs[1].listeners == (t.Endpoint("10.0.0.1", 110), t.Endpoint("::1", 110))
    assert specs[0].library == "/opt/SUNWmsgsr/lib/ImapProxyAService"
    assert t.ServiceList().render(specs) == ("/opt/SUNWmsgsr/lib/ImapProxyAService@143|993 "
                                             "/opt/SUNWmsgsr/lib/popproxyaservice.so|pop2@10.0.0.1:110|[::1]:110 "
                                             r"C:\mmp\SmtpProxyAService.dll|Smtp:east@25")


def test_servicelist_unknown_service_names_the_known_ones():
    with pytest.raises(ValueError) as e:
        conv("ServiceList", "/opt/SUNWmsgsr/lib/ImapProxyAService@143 /opt/SUNWmsgsr/lib/HttpProxyAService@80")
    assert "'HttpProxyAService' names no known service" in str(e.value)
    assert "ImapProxyAService, PopProxyAService, SmtpProxyAService" in str(e.value)


def test_servicelist_needs_ports():
    with pytest.raises(ValueError, match="no @"):
        conv("ServiceList", "/opt/lib/ImapProxyAService")
    with pytest.raises(ValueError, match="not an IP"):
        conv("ServiceList", "/opt/lib/ImapProxyAService@imap.example.com:143")


# --- LDAP and hosts -----------------------------------------------------------------------------------

def test_ldapurl_failover_hosts():
    url = conv("LdapURL", "ldap://ldap1 ldap2:1389/o=internet")
    assert url.scheme == "ldap" and url.base == "o=internet"
    assert url.hosts == (("ldap1", 389), ("ldap2", 1389))
    assert url.urls() == ["ldap://ldap1:389", "ldap://ldap2:1389"]
    assert str(url) == "ldap://ldap1 ldap2:1389/o=internet"


def test_ldapurl_variants():
    url = conv("LdapURL", "LDAPS://[::1]/dc=example%2Cdc=com")
    assert url.scheme == "ldaps" and url.hosts == (("::1", 636),) and url.base == "dc=example,dc=com"
    assert url.urls() == ["ldaps://[::1]:636"]
    assert conv("LdapURL", "ldap://h").base == ""
    for bad, why in (("http://h/o=x", "ldap://"), ("ldap:///o=x", "no host"), ("ldap://h/not a dn", "DN"),
                     ("ldap://h:99999/o=x", "port"), ("ldap://h/o=x??sub", "base DN only"),
                     ("ldap://h/o=x????!bindname=cn=x", "unknown LDAP URL extension"),
                     ("ldaps://h/o=x????StartTLS", "one or the other")):
        with pytest.raises(ValueError, match=why):
            conv("LdapURL", bad)


def test_ldapurl_starttls_extension():
    """RFC 4516 extensions: StartTLS by name or OID, critical or not; kept through str()."""
    for ext in ("!StartTLS", "StartTLS", "x-starttls", "!1.3.6.1.4.1.1466.20037"):
        url = conv("LdapURL", "ldap://a b:1389/o=internet????" + ext)
        assert url.starttls and url.base == "o=internet" and url.urls() == ["ldap://a:389", "ldap://b:1389"]
        assert str(url) == "ldap://a b:1389/o=internet????!StartTLS"
    assert not conv("LdapURL", "ldap://a/o=internet").starttls


def test_hostports_and_hostport():
    assert conv("SmtpRelays", "sesta:485 gonzo mothra") == (("sesta", 485), ("gonzo", 25), ("mothra", 25))
    assert conv("AuthenticationServer", "127.0.0.1:56") == ("127.0.0.1", 56)
    with pytest.raises(ValueError, match="port is required"):
        conv("AuthenticationServer", "127.0.0.1")


# --- networks -----------------------------------------------------------------------------------------

def test_connlimits_inline_most_specific_first():
    limits = conv("ConnLimits", "0.0.0.0|0.0.0.0:20, 10.1.0.0|255.255.0.0:100,10.1.2.3|255.255.255.255:5")
    assert limits == ((ipaddress.ip_network("10.1.2.3/32"), 5), (ipaddress.ip_network("10.1.0.0/16"), 100),
                      (ipaddress.ip_network("0.0.0.0/0"), 20))


def test_connlimits_file(tmp_path):
    f = tmp_path / "connlimits"
    f.write_text("# most specific first\n192.0.2.0|255.255.255.0:50\n\n0.0.0.0|0.0.0.0:20\n")
    assert conv("ConnLimits", str(f)) == ((ipaddress.ip_network("192.0.2.0/24"), 50),
                                         (ipaddress.ip_network("0.0.0.0/0"), 20))
    f.write_text("192.0.2.0|255.255.255.0:50\n192.0.2.0:5\n")
    with pytest.raises(ValueError, match="connlimits:2: '192.0.2.0' is not IP\\|MASK"):
        conv("ConnLimits", str(f))
    with pytest.raises(ValueError, match="cannot read"):
        conv("ConnLimits", str(tmp_path / "missing"))


@pytest.mark.parametrize("raw", ["10.0.0.1:5", "10.0.0.1|255.0.0.0:many", "10.0.0.1|300.0.0.0:5"])
def test_connlimits_bad(raw):
    with pytest.raises(ValueError):
        conv("ConnLimits", raw)


def test_bgexcluded_inline_and_file(tmp_path):
    assert conv("BGExcluded", "127.0.0.1|255.255.255.255, 10.0.0.0|8") == (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    f = tmp_path / "excluded"
    f.write_text("192.0.2.0|255.255.255.0\n")
    assert conv("BGExcluded", str(f)) == (ipaddress.ip_network("192.0.2.0/24"),)


# --- formats, capability, ciphers ---------------------------------------------------------------------

def test_search_format_escapes():
    assert conv("SearchFormat", "(|(uid=%U)(mail=%s)(x=%o%V%C%S%D%%))") == "(|(uid=%U)(mail=%s)(x=%o%V%C%S%D%%))"
    with pytest.raises(ValueError, match="unknown escape %A"):
        conv("SearchFormat", "uid=%A[uid]")
    with pytest.raises(ValueError, match="unknown escape %u"):
        conv("SearchFormat", "uid=%u")
    with pytest.raises(ValueError, match="lone %"):
        conv("SearchFormat", "uid=%")
    with pytest.raises(ValueError, match="parentheses"):
        conv("SearchFormat", "(uid=%U")


def test_replay_format_escapes():
    assert conv("ReplayFormat", "%A[uid]@%V") == "%A[uid]@%V"
    assert conv("ReplayFormat", "%U %s %o 100%%") == "%U %s %o 100%%"
    with pytest.raises(ValueError, match="unknown escape %C"):
        conv("ReplayFormat", "%C")
    with pytest.raises(ValueError, match="attribute name in brackets"):
        conv("ReplayFormat", "%A")


def test_capability_warns_about_store_features():
    ctx = t.Ctx(service="imap")
    value = "IMAP4 IMAP4rev1 ACL QUOTA LITERAL+ NAMESPACE X-NETSCAPE AUTH=PLAIN"
    assert lookup("Capability").type.convert(value, ctx) == value
    assert len(ctx.warnings) == 1 and "ACL QUOTA NAMESPACE X-NETSCAPE" in ctx.warnings[0]
    ctx = t.Ctx(service="imap")
    lookup("Capability").type.convert("IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN SASL-IR ID LITERAL-", ctx)
    assert ctx.warnings == []


def test_ciphers():
    assert conv("SSLCipherSpecs", "ALL") == "all"
    assert conv("SSLCipherSpecs", "HIGH:!aNULL") == "HIGH:!aNULL"
    with pytest.raises(ValueError, match="no cipher"):
        conv("SSLCipherSpecs", "SSL_RSA_WITH_RC4_128_MD5")
    ctx = t.Ctx()
    assert lookup("SSLCipherSpecs").type.convert("HIGH:NOSUCHCIPHER", ctx) == "HIGH:NOSUCHCIPHER"
    assert "NOSUCHCIPHER" in ctx.warnings[0]


def test_deferred_defaults(tmp_path):
    ctx = t.Ctx(str(tmp_path / "config"), "pop")
    assert lookup("LogDir").default.resolve(None, ctx) == str(tmp_path / "data" / "log")
    assert lookup("SSLKeyPasswdFile").default.resolve(None, ctx) == str(tmp_path / "config" / "sslpassword.conf")
    assert lookup("BacksidePort").default.resolve(None, ctx) == 110
    assert lookup("SearchFormat").default.resolve(lambda n: False, ctx) == "uid=%s"
