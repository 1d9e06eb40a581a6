"""option.dat (the MTA option file beside the .cfg files): its format, the options the MMP honours,
and how check-config reports it."""
import pytest

from mmproxy.config import load_config
from mmproxy.config.optiondat import MtaOptions, parse
from mmproxy.loginid import replay_id, search_filter, split_login


def test_defaults_without_a_file(tmp_path):
    config = load_config(str(tmp_path))
    assert config.mta == MtaOptions() and config.mta.schema_level == "1" and not config.mta.native


def test_format_comments_case_blanks_continuations():
    text = ("! comment\n# comment\n; comment\n\n"
            "ldap_schemalevel = 2\n"
            "LDAP_DOMAIN_ATTR_ALIAS=\\\n"
            "! a comment inside a continued setting is dropped\n"
            "myAlias\n"
            "DELIVERY_OPTIONS=*mailbox=$M%$\\$2I$_+$2S@ims-ms-daemon,\\\n"
            "#program=$M%$P@pipe-daemon\n"
            "LDAP_ATTR_DOMAIN2_SCHEMA2=associatedDomain\n")
    mta, problems = parse(text, "option.dat")
    assert problems == []
    assert (mta.schema_level, mta.native, mta.domain_attr_alias) == ("2", True, "myAlias")
    assert mta.where["LDAP_SCHEMALEVEL"] == ("option.dat", 5)
    assert mta.where["LDAP_DOMAIN_ATTR_ALIAS"] == ("option.dat", 6)


@pytest.mark.parametrize("value,level", [("1", "1"), ("1.5", "1.5"), ("2", "2"), ("10%2", "2"), ("2%10", "2")])
def test_schema_levels(value, level):
    mta, problems = parse("LDAP_SCHEMALEVEL=%s\n" % value, "o")
    assert problems == [] and mta.schema_level == level


def test_errors_name_file_and_line():
    text = ("LDAP_SCHEMALEVEL=3\n"
            "LDAP_DOMAIN_ATTR_BASEDN=not an attribute\n"
            "LDAP_SCHEMALEVEL 2\n"
            "something odd\n"
            "LDAP_ATTR_DOMAIN1_SCHEMA2=sunPreferredDomain\n"
            "LDAP_ATTR_DOMAIN1_SCHEMA2=2.16.840.1.113730.3.1.1\n"
            "LDAP_SCHEMALEVEL=99%1\n")
    mta, problems = parse(text, "/cfg/option.dat")
    assert [str(p) for p in problems] == [
        "/cfg/option.dat:1: LDAP_SCHEMALEVEL: '3' is no schema level Messaging Server knows (1, 1.5 or 2)",
        "/cfg/option.dat:2: LDAP_DOMAIN_ATTR_BASEDN: 'not an attribute' is no LDAP attribute name",
        "/cfg/option.dat:3: LDAP_SCHEMALEVEL: expected LDAP_SCHEMALEVEL=value",
        "/cfg/option.dat:4: warning: cannot read this line: expected NAME=value (left to the MTA)",
        "/cfg/option.dat:6: warning: LDAP_ATTR_DOMAIN1_SCHEMA2 is set again (first at line 5): the last value counts",
        "/cfg/option.dat:7: LDAP_SCHEMALEVEL: base 99 of '99%1' is not 2 to 36",
    ]
    assert mta.schema_level == "1" and mta.domain_attr_basedn == "inetDomainBaseDN"      # bad values: defaults
    assert mta.attr_domain1_schema2 == "2.16.840.1.113730.3.1.1"


def write_tree(tmp_path, imap_extra="", option_dat=None):
    (tmp_path / "AService.cfg").write_text('default:ServiceList "/opt/SUNWmsgsr/lib/ImapProxyAService@1143"\n'
                                           "default:LogDir %s\n" % tmp_path)
    (tmp_path / "ImapProxyAService.cfg").write_text('default:LdapURL "ldap://127.0.0.1/o=internet"\n'
                                                    "default:LogDir %s\n%s" % (tmp_path, imap_extra))
    if option_dat is not None:
        (tmp_path / "option.dat").write_text(option_dat)


def test_check_config_reads_option_dat(tmp_path):
    write_tree(tmp_path, option_dat="LDAP_SCHEMALEVEL=4\n")
    config = load_config(str(tmp_path))
    assert [str(p) for p in config.errors] == [
        "%s/option.dat:1: LDAP_SCHEMALEVEL: '4' is no schema level Messaging Server knows (1, 1.5 or 2)" % tmp_path]


def test_schema2_without_user_group_dn_is_warned(tmp_path):
    write_tree(tmp_path, option_dat="! schema 2\nLDAP_SCHEMALEVEL=2\n")
    config = load_config(str(tmp_path))
    assert config.errors == [] and config.services[0].mta.native
    assert ["%s" % p for p in config.warnings] == [
        "%s/option.dat:2: warning: LDAP_SCHEMALEVEL 2 and ImapProxyAService.cfg has no UserGroupDN: Schema 2 "
        "domains are searched under the LdapURL base (o=internet)" % tmp_path]
    write_tree(tmp_path, 'default:UserGroupDN "o=v2,o=internet"\n', option_dat="LDAP_SCHEMALEVEL=2\n")
    assert load_config(str(tmp_path)).warnings == []
    write_tree(tmp_path, 'default:CertMapDN "o=v2,o=internet"\n', option_dat="LDAP_SCHEMALEVEL=2\n")
    assert [p for p in load_config(str(tmp_path)).warnings if "UserGroupDN" in p.message
            and "LDAP_SCHEMALEVEL" in p.message] == []


def test_alias_domain_keeps_what_was_typed_in_percent_o():
    """A login through an alias domain: %V and %s name the canonical domain, %o what the user typed."""
    lid = split_login("carol+example.info", "+", None, "#").in_domain("example.org")
    assert (lid.original, lid.user, lid.domain, lid.canonical) == ("carol+example.info", "carol", "example.org",
                                                                  "carol#example.org")
    assert replay_id("%o|%s|%U@%V", lid, {}) == "carol+example.info|carol#example.org|carol@example.org"
    assert search_filter("(|(mail=%o)(uid=%U))", lid) == "(|(mail=carol+example.info)(uid=carol))"
    assert lid.in_domain("") is lid and lid.in_domain("EXAMPLE.ORG") is lid
