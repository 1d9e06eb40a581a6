"""load_config: files of a config directory become typed settings plus every problem, with file:line."""
import os

import pytest

from mmproxy.config import ServiceConfig, load_config, summary
from mmproxy.config.types import Endpoint

IMAP_POP = "default:ServiceList \"/opt/SUNWmsgsr/lib/ImapProxyAService@143 /opt/SUNWmsgsr/lib/PopProxyAService@110\"\n"


def tree(tmp_path, aservice=IMAP_POP, **files):
    """A config dir with AService.cfg and the given files (name without .cfg -> text)."""
    d = tmp_path / "config"
    d.mkdir(exist_ok=True)
    if aservice is not None:
        (d / "AService.cfg").write_text(aservice)
    files.setdefault("ImapProxyAService", "")
    files.setdefault("PopProxyAService", "")
    for name, text in files.items():
        if text is not None:
            (d / (name + ".cfg")).write_text(text)
    return str(d)


def msgs(config, severity=None):
    return [str(p) for p in config.problems if severity in (None, p.severity)]


def imap(config):
    return next(s.cfg for s in config.services if s.spec.kind == "imap")


def test_clean_tree_has_no_problems_and_typed_values(tmp_path):
    d = tree(tmp_path, ImapProxyAService='default:LdapURL "ldap://l1 l2:1389/o=internet"\ndefault:preauth YES\n'
                                        "default:MailHostAttrs \"mailHost mailRoutingHost\"\n")
    config = load_config(d)
    assert config.problems == [] and config.errors == []
    cfg = imap(config)
    assert cfg.PreAuth is True and cfg.preauth is True and cfg.PREAUTH is True
    assert cfg.LdapURL.urls() == ["ldap://l1:389", "ldap://l2:1389"]
    assert cfg.MailHostAttrs == ("mailHost", "mailRoutingHost")
    assert cfg.BacksidePort == 143 and config.services[1].cfg.BacksidePort == 110
    assert cfg.LogDir == str(tmp_path / "data" / "log")
    assert config.services[0].file == os.path.join(d, "ImapProxyAService.cfg")
    assert summary(config) == "%s: 2 services (imap on 143, pop on 110), 0 errors, 0 warnings" % d


def test_unknown_key_with_did_you_mean(tmp_path):
    d = tree(tmp_path, ImapProxyAService="default:LogLevel 1\ndefault:PreAuht yes\ndefault:Frobnicate 1\n")
    assert msgs(load_config(d)) == [
        '%s/ImapProxyAService.cfg:2: unknown parameter "PreAuht" (did you mean "PreAuth"?)' % d,
        '%s/ImapProxyAService.cfg:3: unknown parameter "Frobnicate"' % d]


def test_bad_values_are_errors_with_lines_and_all_are_reported(tmp_path):
    d = tree(tmp_path, ImapProxyAService="default:LogLevel eleven\ndefault:PreAuth maybe\n"
                                        'default:Banner "open\ndefault:BacksidePort 0\n')
    config = load_config(d)
    assert msgs(config) == [
        "%s/ImapProxyAService.cfg:3: Banner: closing quote missing: a quoted value must end on its own line" % d,
        "%s/ImapProxyAService.cfg:1: LogLevel: not a whole number" % d,
        "%s/ImapProxyAService.cfg:2: PreAuth: not a boolean (use yes/no, on/off, true/false or 1/0)" % d,
        "%s/ImapProxyAService.cfg:4: BacksidePort: must be between 1 and 65535" % d]
    assert imap(config).LogLevel == 1          # the default stands in for a bad value


def test_empty_quoted_value_means_unset(tmp_path):
    d = tree(tmp_path, ImapProxyAService='default:DefaultDomain ""\ndefault:TCPAccess ""\n')
    config = load_config(d)
    assert config.problems == []
    assert imap(config).DefaultDomain is None and not imap(config).is_set("DefaultDomain")


def test_search_format_default_follows_hosted_domains(tmp_path):
    d = tree(tmp_path, ImapProxyAService="default:HostedDomains no\n",
             PopProxyAService="default:HostedDomains no\ndefault:SearchFormat (mail=%s)\n")
    config = load_config(d)
    assert imap(config).SearchFormat == "uid=%s"
    assert config.services[1].cfg.SearchFormat == "(mail=%s)"
    d = tree(tmp_path, ImapProxyAService="")
    assert imap(load_config(d)).SearchFormat == "uid=%U"


def test_timeout_below_minimum_is_a_warning(tmp_path):
    d = tree(tmp_path, ImapProxyAService="default:Timeout 600\n", PopProxyAService="default:Timeout 600\n")
    config = load_config(d)
    assert config.errors == []
    assert [p.line for p in config.warnings] == [1] and "RFC 3501/9051" in config.warnings[0].message
    assert imap(config).Timeout == 600


def test_sslports_without_sslenable_is_an_error(tmp_path):
    d = tree(tmp_path, aservice='default:ServiceList "/lib/ImapProxyAService@143|993"\n',
             ImapProxyAService="default:LogLevel 1\ndefault:SSLPorts 993\n")
    assert msgs(load_config(d), "error") == [
        "%s/ImapProxyAService.cfg:2: SSLPorts needs SSLEnable yes in the same file" % d]


def test_implicit_tls_port_not_in_sslports_is_a_warning(tmp_path):
    d = tree(tmp_path, aservice='default:ServiceList "/lib/ImapProxyAService@143|993 /lib/PopProxyAService@995"\n')
    assert msgs(load_config(d)) == [
        "%s/AService.cfg:1: warning: imap listens on 993, the IMAPS port, but ImapProxyAService.cfg's SSLPorts "
        "does not list it: clients expect TLS on accept there" % d,
        "%s/AService.cfg:1: warning: pop listens on 995, the POP3S port, but PopProxyAService.cfg's SSLPorts "
        "does not list it: clients expect TLS on accept there" % d]


def test_sslports_not_listened_on_is_a_warning(tmp_path):
    (tmp_path / "server.pem").write_text("x")
    d = tree(tmp_path, ImapProxyAService="default:SSLEnable yes\ndefault:SSLPorts 993\ndefault:SSLCertFile %s\n"
                                        % (tmp_path / "server.pem"))
    config = load_config(d)
    assert config.errors == []
    assert any("ImapProxyAService.cfg:2: warning: SSLPorts 993 is not among this service's ServiceList ports (143): "
               "nothing listens there" in m for m in msgs(config))


def test_nss_database_is_an_error(tmp_path):
    (tmp_path / "cert8.db").write_bytes(b"\0")
    d = tree(tmp_path, ImapProxyAService="default:SSLEnable yes\ndefault:SSLCertFile %s\n" % (tmp_path / "cert8.db"))
    errors = msgs(load_config(d), "error")
    assert len(errors) == 1 and errors[0].startswith("%s/ImapProxyAService.cfg:2: SSLCertFile: " % d)
    assert "pk12util -o server.p12 -n Server-Cert" in errors[0]


SMTP_LIST = 'default:ServiceList "/lib/ImapProxyAService@143 /lib/SmtpProxyAService@25"\n'


def test_smtp_mandatory_values_only_when_smtp_is_listed(tmp_path):
    d = tree(tmp_path, aservice=SMTP_LIST, SmtpProxyAService="default:LogLevel 1\n")
    assert msgs(load_config(d), "error") == [
        "%s/SmtpProxyAService.cfg: SmtpRelays is mandatory when ServiceList names the SMTP service" % d,
        "%s/SmtpProxyAService.cfg: SmtpProxyPassword is mandatory when ServiceList names the SMTP service" % d]
    d = tree(tmp_path, aservice=SMTP_LIST,
             SmtpProxyAService="default:SmtpRelays \"mta1:485 mta2\"\ndefault:SmtpProxyPassword pw\n")
    config = load_config(d)
    assert config.errors == []
    assert config.services[1].cfg.SmtpRelays == (("mta1", 485), ("mta2", 25))
    d = tree(tmp_path, aservice=IMAP_POP, SmtpProxyAService="default:LogLevel 1\n")
    assert load_config(d).errors == []       # not listed: not read, not required


def test_servicelist_errors(tmp_path):
    d = tree(tmp_path, aservice='default:ServiceList "/lib/ImapProxyAService@143 /lib/WebAService@80"\n')
    config = load_config(d)
    assert [e.spec.kind for e in config.services] == ["imap"]     # the good entries are still checked
    assert msgs(config, "error") == ["%s/AService.cfg:1: ServiceList: 'WebAService' names no known service (known: "
                            "ImapProxyAService, PopProxyAService, SmtpProxyAService)" % d]
    d = tree(tmp_path, aservice='default:ServiceList "/lib/ImapProxyAService@143|10.0.0.1:110 '
                                '/lib/PopProxyAService@110 /lib/PopProxyAService|pop2@143"\n', pop2="")
    assert msgs(load_config(d), "error") == [
        "%s/AService.cfg:1: ServiceList lists port 110 twice (imap 10.0.0.1:110 and pop 110)" % d,
        "%s/AService.cfg:1: ServiceList lists 143 twice (imap 143 and pop 143)" % d]


def test_instance_and_section_select_the_file_and_lines(tmp_path):
    d = tree(tmp_path, aservice='default:ServiceList "/lib/ImapProxyAService|mmp:east@143"\n',
             mmp="default:LogLevel 1\neast:LogLevel 7\nwest:LogLevel 9\n")
    config = load_config(d)
    assert imap(config).LogLevel == 7 and config.services[0].file == os.path.join(d, "mmp.cfg")
    assert msgs(config) == [
        '%s/mmp.cfg:1: warning: section "default" is not used by any ServiceList entry: its settings are ignored' % d,
        '%s/mmp.cfg:3: warning: section "west" is not used by any ServiceList entry: its settings are ignored' % d]


def test_missing_files_without_create_missing_are_errors(tmp_path):
    d = tree(tmp_path, aservice=None)
    config = load_config(d)
    assert msgs(config) == ["%s/AService.cfg: cannot read: No such file or directory" % d]
    assert config.services == []
    d = tree(tmp_path, aservice=IMAP_POP, PopProxyAService=None)
    os.remove(os.path.join(d, "PopProxyAService.cfg"))
    config = load_config(d)
    assert msgs(config) == ["%s/PopProxyAService.cfg: cannot read: No such file or directory" % d]
    assert [s.spec.kind for s in config.services] == ["imap", "pop"]


def test_create_missing_copies_templates_and_leaves_existing_files(tmp_path):
    d = tmp_path / "config"
    d.mkdir()
    (d / "ImapProxyAService-def.cfg").write_text("# site template\ndefault:LogLevel 4\n")
    config = load_config(str(d), create_missing=True)
    assert config.errors == []
    assert sorted(os.listdir(d)) == ["AService-def.cfg", "AService.cfg", "ImapProxyAService-def.cfg",
                                     "ImapProxyAService.cfg", "PopProxyAService-def.cfg", "PopProxyAService.cfg"]
    assert (d / "ImapProxyAService.cfg").read_text() == "# site template\ndefault:LogLevel 4\n"
    assert imap(config).LogLevel == 4
    assert (d / "AService.cfg").read_text() == (d / "AService-def.cfg").read_text()
    assert "created from PopProxyAService-def.cfg (the file was missing)" in msgs(config)[-1]
    (d / "PopProxyAService.cfg").write_text("default:LogLevel 2\n")
    config = load_config(str(d), create_missing=True)
    assert (d / "PopProxyAService.cfg").read_text() == "default:LogLevel 2\n"
    assert not any("created" in m for m in msgs(config))
    assert not (d / "SmtpProxyAService.cfg").exists()       # only services ServiceList names


def test_service_config_attribute_access():
    cfg = ServiceConfig("imap")
    assert cfg.ldapurl is cfg.LdapURL and cfg.BacksidePort == 143
    with pytest.raises(AttributeError, match="'PreAuht' is not a configuration parameter"):
        cfg.PreAuht
    with pytest.raises(AttributeError):
        cfg.is_set("PreAuht")
    with pytest.raises(AttributeError, match="read-only"):
        cfg.PreAuth = True
    assert not hasattr(cfg, "_nothing")


def test_is_set_and_where(tmp_path):
    d = tree(tmp_path, ImapProxyAService="# header\ndefault:PreAuth no\n")
    cfg = imap(load_config(d))
    assert cfg.is_set("preauth") and not cfg.is_set("LdapURL")
    assert cfg.where("PreAuth") == "%s/ImapProxyAService.cfg:2" % d and cfg.where("LdapURL") is None


def test_override_returns_a_new_config():
    cfg = ServiceConfig("imap")
    new = cfg.override({"PreAuth": "yes", "replayformat": "%A[uid]@%V", "DefaultDomain": "",
                        "SSLPorts": (Endpoint("", 993),), "HostedDomains": False})
    assert new.PreAuth is True and new.ReplayFormat == "%A[uid]@%V" and new.SSLPorts == (("", 993),)
    assert new.SearchFormat == "uid=%s"               # the computed default follows the override
    assert new.is_set("PreAuth") and new.where("PreAuth") is None and not new.is_set("DefaultDomain")
    assert cfg.PreAuth is False and cfg.SearchFormat == "uid=%U"
    with pytest.raises(ValueError, match="PreAuth: not a boolean"):
        cfg.override({"PreAuth": "maybe"})
    with pytest.raises(ValueError, match="unknown parameter"):
        cfg.override({"PreAuht": "yes"})


def test_key_in_an_unexpected_file(tmp_path):
    d = tree(tmp_path, aservice=SMTP_LIST,
             ImapProxyAService="default:BeTheUser mailsrv\ndefault:SpoofEmptyMailbox on\n",
             SmtpProxyAService="default:SmtpRelays mta\ndefault:SmtpProxyPassword x\n"
                               "default:LdapURL ldap://ldap1/o=internet\ndefault:BacksidePort 25\n")
    config = load_config(d)
    assert config.errors == []
    assert [m for m in msgs(config) if "legacy product" in m] == [
        "%s/ImapProxyAService.cfg:1: warning: BeTheUser is not an ImapProxyAService.cfg parameter in the legacy "
        "product; ignored" % d,
        "%s/ImapProxyAService.cfg:2: warning: SpoofEmptyMailbox is not an ImapProxyAService.cfg parameter in the "
        "legacy product; ignored" % d,
        "%s/SmtpProxyAService.cfg:3: warning: LdapURL is not a SmtpProxyAService.cfg parameter in the legacy "
        "product; it is honoured" % d,
        "%s/SmtpProxyAService.cfg:4: warning: BacksidePort is not a SmtpProxyAService.cfg parameter in the "
        "legacy product; ignored" % d]
    assert imap(config).BeTheUser is None
    assert config.services[1].cfg.LdapURL.hosts == (("ldap1", 389),)


def test_unsupported_parameters(tmp_path):
    d = tree(tmp_path, ImapProxyAService="default:BGMax 5\ndefault:TCPAccess \"+imap:ALL\"\n"
                                        "default:SSLBacksidePort 993\ndefault:CertMapDN o=x\n"
                                        "default:RestrictPlainPasswords yes\n",
             PopProxyAService="default:AuthService yes\n")
    config = load_config(d)
    assert msgs(config, "error") == []            # TCPAccess (line 2) and SSLBacksidePort (line 3) are supported
    assert msgs(config, "warning") == [
        "%s/ImapProxyAService.cfg:4: warning: CertMapDN is obsolete, superseded by UserGroupDN; its value is still "
        "used" % d,
        "%s/PopProxyAService.cfg:1: warning: AuthService yes applies to every client of this service; the legacy "
        "manual advises enabling it per virtual domain only (VirtualDomainFile)" % d]
    assert imap(config).RestrictPlainPasswords is True


def test_problems_print_as_file_line_message(tmp_path):
    d = tree(tmp_path, ImapProxyAService="\n\ndefault:LogLevel 99\n")
    (p,) = load_config(d).problems
    assert (p.file, p.line, p.severity) == (os.path.join(d, "ImapProxyAService.cfg"), 3, "error")
    assert str(p) == "%s/ImapProxyAService.cfg:3: LogLevel: must be between 0 and 10" % d


def test_vdmap_through_the_service_file(tmp_path):
    d = tree(tmp_path, ImapProxyAService="default:VirtualDomainFile vdmap.cfg\n")
    with open(os.path.join(d, "vdmap.cfg"), "w") as f:
        f.write("vdmap siroe 192.0.2.10\nsiroe:DefaultDomain siroe.com\nsiroe:PreAuth yes\n")
    config = load_config(d)
    assert config.problems == []
    entry = config.services[0]
    over = entry.vdomains.for_address("192.0.2.10")
    assert over == {"DefaultDomain": "siroe.com", "PreAuth": True}
    assert entry.cfg.override(over).DefaultDomain == "siroe.com"
    assert config.services[1].vdomains is None
    os.remove(os.path.join(d, "vdmap.cfg"))
    assert msgs(load_config(d)) == ["%s/ImapProxyAService.cfg:1: VirtualDomainFile: %s/vdmap.cfg does not exist"
                                     % (d, os.path.abspath(d))]


def test_summary_counts(tmp_path):
    d = tree(tmp_path, aservice='default:ServiceList "/lib/ImapProxyAService@143|993"\n',
             ImapProxyAService="default:LogLevel x\n")
    assert summary(load_config(d)) == "%s: 1 service (imap on 143|993), 1 error, 1 warning" % d


# --- a tree as a Sun install carried it ---------------------------------------------------------------

def legacy_tree(tmp_path):
    """/opt/SUNWmsgsr-style files, keys where Sun's samples put them, SSL with PEM files, vdmap."""
    cfg = tmp_path / "SUNWmsgsr" / "config"
    cfg.mkdir(parents=True)
    (cfg / "server.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    ssl = ("default:SSLEnable yes\n"
           "default:SSLPorts %%s\n"
           "default:SSLCacheDir %(d)s\n"
           'default:SSLCertPrefix ""\n'
           "default:SSLCertNicknames Server-Cert\n"
           "default:SSLCertFile %(d)s/server.pem\n"
           "default:SSLKeyFile %(d)s/server.pem\n"
           'default:SSLKeyPasswdFile ""\n'
           "default:SSLSecmodFile secmod.db\n"
           "default:SSLCipherSpecs all\n") % {"d": cfg}
    ldap = ('default:LdapURL "ldap://ldap1.siroe.com ldap2.siroe.com:1389/o=internet"\n'
            'default:BindDN "cn=Directory Manager"\n'
            "default:BindPass secret\n")
    files = {
        "AService.cfg": "# AService.cfg written by configure\n"
                        'default:ServiceList "/opt/SUNWmsgsr/lib/ImapProxyAService@143|993 '
                        "/opt/SUNWmsgsr/lib/PopProxyAService@110|995 "
                        '/opt/SUNWmsgsr/lib/SmtpProxyAService@25|465"\n'
                        "default:NumThreads 4\n"
                        "default:BeTheUser mailsrv\n"
                        "default:BeTheGroup mail\n"
                        "default:LogDir /opt/SUNWmsgsr/data/log\n"
                        "default:LogLevel 1\n",
        "ImapProxyAService.cfg": ldap + ssl % "993" +
                                 "default:HostedDomains yes\n"
                                 "default:PreAuth yes\n"
                                 "default:DefaultDomain siroe.com\n"
                                 "default:AuthService no\n"
                                 "default:Timeout 1800\n"
                                 "default:BacksidePort 143\n"
                                 'default:Capability "IMAP4 IMAP4rev1 ACL QUOTA LITERAL+ NAMESPACE UIDPLUS '
                                 'CHILDREN BINARY LANGUAGE XSENDER X-NETSCAPE XSERVERINFO AUTH=PLAIN"\n'
                                 "default:BGMax 10000\n"
                                 'default:ConnLimits "0.0.0.0|0.0.0.0:20"\n'
                                 "default:VirtualDomainFile /%s/vdmap.cfg\n" % str(cfg).lstrip("/") +
                                 "default:LogDir /opt/SUNWmsgsr/data/log\n",
        "PopProxyAService.cfg": ldap + ssl % "995" +
                                "default:PreAuth yes\n"
                                "default:AuthServiceTTL 900\n"
                                "default:SpoofEmptyMailbox off\n"
                                "default:Timeout 600\n",
        "SmtpProxyAService.cfg": ldap + ssl % "465" +
                                 "default:SmtpRelays \"mta1.siroe.com:485 mta2.siroe.com\"\n"
                                 "default:SmtpProxyPassword proxypw\n"
                                 "default: EhloKeywords TURN\n"
                                 "default:PopBeforeSmtpKludgeChannel tcp_intranet\n"
                                 "default:Timeout 600\n",
        "vdmap.cfg": "vdmap siroe 192.0.2.10\nsiroe:DefaultDomain siroe.com\nsiroe:AuthService yes\n"
                     "vdmap varrius 192.0.2.11\nvarrius:DefaultDomain varrius.com\n",
    }
    for name, text in files.items():
        (cfg / name).write_text(text)
    return str(cfg)


def test_legacy_tree_loads_with_warnings_and_no_errors(tmp_path):
    d = legacy_tree(tmp_path)
    config = load_config(d)
    assert config.errors == [], msgs(config, "error")
    warnings = msgs(config, "warning")
    expected = [
        "ImapProxyAService.cfg:9: warning: SSLCertFile is obsolete, superseded by SSLCertPrefix; "
        "its value is still used",
        "ImapProxyAService.cfg:12: warning: not used: hardware crypto modules are an NSS feature; "
        "mmproxy uses OpenSSL",
        "ImapProxyAService.cfg:17: warning: AuthService is not an ImapProxyAService.cfg parameter in the legacy "
        "product; ignored",
        "ImapProxyAService.cfg:20: warning: Capability names store features (ACL QUOTA",
        "SmtpProxyAService.cfg:1: warning: LdapURL is not a SmtpProxyAService.cfg parameter in the legacy product; "
        "it is honoured",
    ]
    for e in expected:
        assert any(w.startswith(os.path.join(d, e)) for w in warnings), e
    assert not any("SmtpProxyAService.cfg:16" in w for w in warnings)      # EhloKeywords TURN: supported
    assert not any("Timeout" in w for w in warnings)
    assert not any("BGMax" in w for w in warnings)                          # BadGuys: supported
    assert [(s.spec.kind, [e.port for e in s.spec.listeners]) for s in config.services] == [
        ("imap", [143, 993]), ("pop", [110, 995]), ("smtp", [25, 465])]
    imap_cfg = config.services[0].cfg
    assert imap_cfg.SSLPorts == (("", 993),) and imap_cfg.SSLKeyPasswdFile == os.path.join(d, "sslpassword.conf")
    assert imap_cfg.LogDir == "/opt/SUNWmsgsr/data/log" and config.aservice.NumThreads == 4
    assert config.services[0].vdomains.for_address("::ffff:192.0.2.11") == {"DefaultDomain": "varrius.com"}
    assert summary(config).startswith("%s: 3 services (imap on 143|993, pop on 110|995, smtp on 25|465), 0 errors, "
                                      % d)


def test_authentication_server_checks(tmp_path):
    # "ignored unless the PreAuth option is set to yes"; the protocol is not encrypted: loopback only
    d = tree(tmp_path, ImapProxyAService="default:PreAuth no\ndefault:AuthenticationServer 192.0.2.5:56\n",
             PopProxyAService='default:PreAuth yes\ndefault:AuthenticationServer localhost:56\n'
                              'default:AuthenticationLdapAttributes "mail" "cn"\n')
    config = load_config(d)
    assert msgs(config, "error") == []
    assert msgs(config, "warning") == [
        "%s/ImapProxyAService.cfg:2: warning: AuthenticationServer is ignored unless PreAuth is yes (PreAuth is no "
        "here: only domains whose mailAccessProxyPreAuth or vdmap.cfg turns it on use it)" % d,
        "%s/ImapProxyAService.cfg:2: warning: AuthenticationServer 192.0.2.5:56 is not on this machine's loopback: "
        "its protocol is not encrypted, so passwords would cross the network in clear (run the server on this "
        "machine, as the legacy manual recommends)" % d]
    pop = config.services[1].cfg
    assert pop.AuthenticationServer == ("localhost", 56) and pop.AuthenticationLdapAttributes == ("mail", "cn")
    assert pop.AuthenticationServerTimeout == 10
    d = tree(tmp_path, ImapProxyAService="default:AuthenticationLdapAttributes mail\n")
    assert msgs(load_config(d), "warning") == [
        "%s/ImapProxyAService.cfg:1: warning: AuthenticationLdapAttributes is used only with AuthenticationServer: "
        "ignored" % d]


def test_fleet_settings_are_checked_with_lines_and_no_password_repeated(tmp_path):
    """StateRedisURL, ProxyProtocolPorts/ProxyProtocolFrom (issue 12): what is wrong, where."""
    d = tree(tmp_path, aservice=IMAP_POP + "default:StateRedisURL http://:s3cret@redis.example:6379\n"
             "default:InstanceName box-1\n",
             ImapProxyAService="default:ProxyProtocolPorts 143|144\n",
             PopProxyAService="default:ProxyProtocolFrom 10.0.0.0/8 junk\n")
    config = load_config(d)
    assert msgs(config, "error") == [
        "%s/AService.cfg:2: StateRedisURL: the URL must start redis://, rediss:// (TLS) or unix://" % d,
        "%s/ImapProxyAService.cfg:1: ProxyProtocolPorts needs ProxyProtocolFrom (the load balancers' addresses) "
        "in the same file: nobody else may name the client" % d,
        "%s/PopProxyAService.cfg:1: ProxyProtocolFrom: 'junk' is not an IP address" % d]
    assert msgs(config, "warning") == [
        "%s/ImapProxyAService.cfg:1: warning: ProxyProtocolPorts 144 is not among this service's ServiceList "
        "ports (143): nothing listens there" % d]
    assert "s3cret" not in "\n".join(msgs(config))
    for bad, why in (("redis://:pw@/0", "no host in the URL"), ("redis://h:99999", "not a URL with a valid port"),
                     ("redis://h/x", "the path must be a database number (/0)"),
                     ("redis://:pw@h:6379/0?socket_timeout=30", "no ?options or #fragment: mmproxy sets the timeouts "
                      "and the TLS checks itself (StateRedisCAFile for the CA)"),
                     ("redis://S3CRETpw@h:6379/0", "a user without a password before the @ (the password is "
                      "written :PASSWORD@)")):
        d = tree(tmp_path, aservice=IMAP_POP + "default:StateRedisURL %s\n" % bad)
        assert msgs(load_config(d), "error") == ["%s/AService.cfg:2: StateRedisURL: %s" % (d, why)]
    d = tree(tmp_path, aservice=IMAP_POP + "default:StateRedisURL rediss://:pw@10.0.0.7:6380/2\n",
             ImapProxyAService="default:ProxyProtocolPorts 143\n"
                               "default:ProxyProtocolFrom 10.0.0.5 192.168.0.0|255.255.0.0\n")
    config = load_config(d)
    assert msgs(config) == []
    assert config.aservice.StateRedisURL == "rediss://:pw@10.0.0.7:6380/2"
    assert config.aservice.StateRedisPrefix == "mmproxy:"
    assert [str(n) for n in imap(config).ProxyProtocolFrom] == ["10.0.0.5/32", "192.168.0.0/16"]


def test_instance_names_and_a_catch_all_balancer(tmp_path):
    d = tree(tmp_path, aservice=IMAP_POP + "default:InstanceName \"a b/c\"\n",
             ImapProxyAService="default:ProxyProtocolPorts 143\ndefault:ProxyProtocolFrom 0.0.0.0/0\n")
    config = load_config(d)
    assert msgs(config, "error") == [
        "%s/AService.cfg:2: InstanceName: 'a b/c': 1 to 64 letters, digits, '.', '-' or '_'" % d]
    assert msgs(config, "warning") == [
        "%s/ImapProxyAService.cfg:2: warning: ProxyProtocolFrom covers every address: any client may claim to be "
        "any other (name only the load balancers)" % d]
