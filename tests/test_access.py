"""Access filters (mmproxy/access.py): the Messaging Server syntax and evaluation order, pure logic
(host names come from a table here, not from DNS); check-config's messages for filters."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmproxy import access
from mmproxy.access import FilterSyntaxError, Host, HostName, parse
from mmproxy.config import load_config

NAMES = {
    "127.0.0.1": HostName("ok", "localhost"),
    "10.1.2.3": HostName("ok", "pc3.sales.example.com"),
    "10.1.9.9": HostName("ok", "kiosk"),
    "10.2.0.1": HostName("spoofed", "bank.example.net"),
    "10.3.0.1": HostName("timeout"),
}


def resolve(ip):
    return NAMES.get(ip, access.NO_NAME)


def allowed(text, service, ip, user=None, server="192.0.2.1"):
    return parse(text).decide(service, Host(ip, resolve), Host(server, resolve), user).allowed


# ---------------------------------------------------------------------- evaluation order
def test_no_rule_grants():
    assert allowed("", "imap", "10.9.9.9")
    assert allowed("  $ $", "pop", "10.9.9.9")


def test_only_allow_rules_deny_what_they_do_not_match():
    """+imap:ALL alone denies every other service (DESIGN.md; Schema Reference, mailAllowedServiceAccess)."""
    f = "+imap:ALL"
    assert allowed(f, "imap", "10.9.9.9")
    assert not allowed(f, "pop", "10.9.9.9")
    assert not allowed(f, "imaps", "10.9.9.9")        # imaps is a service of its own


def test_allow_rules_come_before_deny_rules_whatever_the_order_written():
    f = "-imap:10.1.$+imap:10.1.2.3"
    assert allowed(f, "imap", "10.1.2.3")             # the allow rule decides first
    assert not allowed(f, "imap", "10.1.2.4")
    assert allowed(f, "imap", "10.9.9.9")             # no match, and there is a deny rule: granted
    assert allowed(f, "pop", "10.1.2.4")


def test_deny_rules_alone():
    f = "-imap,pop:*$-smtp:ALL"
    assert not allowed(f, "imap", "10.9.9.9") and not allowed(f, "pop", "1.2.3.4")
    assert allowed(f, "imaps", "10.9.9.9")
    assert allowed(f, "http", "10.9.9.9")


def test_schema_reference_examples():
    assert allowed("+imap,pop,http:*", "pop", "10.9.9.9")
    assert not allowed("+imap,pop,http:*", "smime", "10.9.9.9")
    assert allowed("+imap:ALL$+pop:ALL$+http:ALL", "http", "10.9.9.9")
    assert not allowed("-imap:*$-pop:*$-http:*", "imap", "10.9.9.9")
    f = "-ALL:ALL EXCEPT pc3.sales.example.com"
    assert allowed(f, "imap", "10.1.2.3") and not allowed(f, "imap", "10.1.2.4")
    f = "+imaps,pops:*$+imap,pop:192.0.2.25"     # TLS only, except from the MMP itself
    assert allowed(f, "imaps", "10.9.9.9") and not allowed(f, "imap", "10.9.9.9")
    assert allowed(f, "pop", "192.0.2.25")


def test_except_nests_to_the_right():
    """list1 EXCEPT list2 EXCEPT list3 = list1 EXCEPT (list2 EXCEPT list3)."""
    f = "+imap:10. EXCEPT 10.1. EXCEPT 10.1.2.3"
    assert allowed(f, "imap", "10.5.5.5")
    assert not allowed(f, "imap", "10.1.5.5")
    assert allowed(f, "imap", "10.1.2.3")
    f = "-ALL EXCEPT pop:ALL"                     # EXCEPT in the service list
    assert not allowed(f, "imap", "10.5.5.5") and allowed(f, "pop", "10.5.5.5")


# ---------------------------------------------------------------------- client patterns
@pytest.mark.parametrize("pattern,yes,no", [
    ("10.1.", ["10.1.2.3", "10.1.9.9"], ["10.10.2.3", "110.1.2.3"]),
    ("10.1.2.3", ["10.1.2.3"], ["10.1.2.30"]),
    ("10.1.0.0/255.255.0.0", ["10.1.200.1"], ["10.2.0.1"]),
    ("10.1.0.0/16", ["10.1.200.1"], ["10.2.0.1"]),
    ("[2001:db8::]/32", ["2001:db8::5"], ["2001:db9::5", "10.1.2.3"]),
    ("[::1]", ["::1"], ["::2"]),
    ("ALL", ["10.1.2.3", "::1"], []),
    ("*", ["10.1.2.3"], []),
    ("pc3.sales.example.com", ["10.1.2.3"], ["10.1.9.9"]),
    ("PC3.Sales.Example.COM", ["10.1.2.3"], []),
    (".example.com", ["10.1.2.3"], ["10.1.9.9", "10.2.0.1"]),
    (".sales.example.com", ["10.1.2.3"], []),
    ("LOCAL", ["10.1.9.9", "127.0.0.1"], ["10.1.2.3", "10.2.0.1", "10.9.9.9"]),
    ("KNOWN", ["10.1.2.3", "127.0.0.1"], ["10.2.0.1", "10.3.0.1", "10.9.9.9"]),
    ("UNKNOWN", ["10.2.0.1", "10.3.0.1", "10.9.9.9"], ["10.1.2.3"]),
    ("DNSSPOOFER", ["10.2.0.1"], ["10.1.2.3", "10.3.0.1", "10.9.9.9"]),
    (".example.net", [], ["10.2.0.1"]),          # a spoofer's claimed name matches nothing
    ("10.1.2.0/24", ["::ffff:10.1.2.3"], []),      # an IPv4-mapped address (dual-stack listener) is IPv4
])
def test_client_patterns(pattern, yes, no):
    for ip in yes:
        assert allowed("+imap:" + pattern, "imap", ip), (pattern, ip)
    for ip in no:
        assert not allowed("+imap:" + pattern, "imap", ip), (pattern, ip)


def test_lists_take_blanks_and_commas_and_keywords_any_case():
    f = "+ IMAP , pop : 10.1.2.3,10.1.9.9  127.0.0.1 except localhost"
    assert allowed(f, "imap", "10.1.9.9") and allowed(f, "pop", "10.1.2.3")
    assert not allowed(f, "imap", "127.0.0.1")


def test_user_patterns_match_the_login_when_known():
    f = "-imap:gina@ALL$-pop:KNOWN@10.1."
    assert not allowed(f, "imap", "10.9.9.9", "gina@example.com")
    assert not allowed(f, "imap", "10.9.9.9", "GINA")
    assert allowed(f, "imap", "10.9.9.9", "hank@example.com")
    assert allowed(f, "imap", "10.9.9.9", None)            # at connect: no user yet
    assert not allowed(f, "pop", "10.1.2.3", "x@y") and allowed(f, "pop", "10.1.2.3", None)
    assert not allowed("-imap:UNKNOWN@ALL", "imap", "10.9.9.9")
    assert not allowed("-imap:*@10.1.2.3", "imap", "10.1.2.3", "x")


def test_service_at_server_address():
    f = "-imap@192.0.2.1:ALL"
    assert not allowed(f, "imap", "10.9.9.9", server="192.0.2.1")
    assert allowed(f, "imap", "10.9.9.9", server="192.0.2.2")


def test_names_are_looked_up_only_when_a_pattern_needs_them():
    asked = []

    def counting(ip):
        asked.append(ip)
        return resolve(ip)
    f = parse("+imap:10.1. .example.com$-pop:KNOWN")
    assert f.needs_names and not parse("+imap:10.1. 10.2.0.0/16").needs_names
    f.decide("imap", Host("10.1.2.3", counting), Host("192.0.2.1", counting))   # the prefix matched first
    f.decide("smtp", Host("10.9.9.9", counting), Host("192.0.2.1", counting))   # no service matches
    assert asked == []
    client = Host("10.9.9.9", counting)
    f.decide("imap", client, Host("192.0.2.1", counting))
    f.decide("imap", client, Host("192.0.2.1", counting))
    assert asked == ["10.9.9.9"] and client.looked_up


def test_decision_says_which_rule_decided():
    d = parse("+imap:10.1.$-imap:ALL").decide("imap", Host("10.9.9.9", resolve), Host("192.0.2.1", resolve))
    assert d == (False, "denied by rule '-imap:ALL'")
    d = parse("+pop:ALL").decide("imap", Host("10.9.9.9", resolve), Host("192.0.2.1", resolve))
    assert d == (False, "denied: no allow rule matches (there is no deny rule)")


# ---------------------------------------------------------------------- syntax errors point at the column
@pytest.mark.parametrize("text,column,words", [
    ("imap:ALL", 1, "starts with + (allow) or - (deny)"),
    ("+imap ALL", 10, 'no ":"'),
    ("+imapx:ALL", 2, "unknown service 'imapx'"),
    ("+imap:ALL$+pop:10.1.2.300", 16, "not an IPv4 address"),
    ("+imap:", 7, "no client given"),
    ("+:ALL", 2, "no service given"),
    ("+imap:ALL EXCEPT", 17, "no client after EXCEPT"),
    ("+imap:EXCEPT x", 7, "no client before EXCEPT"),
    ("+imap:10.0.0.0/255.0.0.x", 7, "n.n.n.n/m.m.m.m"),
    ("+imap:ho%t", 9, "not a host name"),
    ("+imap:ALL$ho", 11, "starts with + (allow) or - (deny), not 'h'"),
    ("+imap:a_b.example.com", 8, "not a host name"),
    ("+imap:@staff", 7, "NIS netgroups"),
    ("+imap:::1", 7, "in brackets"),
    ("+imap:[10.1.2.3]", 7, "IPv6"),
    ("+imap@:ALL", 7, "no host after imap@"),
    ("+imap:gina@", 12, "no host after gina@"),
])
def test_errors_name_the_column(text, column, words):
    with pytest.raises(FilterSyntaxError) as e:
        parse(text)
    assert e.value.offset + 1 == column, str(e.value)
    assert words in str(e.value) and str(e.value).startswith("column %d: " % column)


_WORDS = st.sampled_from(["+", "-", "imap", "pop", "ALL", ":", "$", " ", ",", "EXCEPT", "10.1.", "@", "[", "]",
                          "/", ".example.com", "LOCAL", "x", "*", "255.255.0.0", "::1", "\t", "é"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_WORDS, max_size=14).map("".join))
def test_any_text_parses_or_fails_with_a_column_inside_it(text):
    try:
        f = parse(text)
    except FilterSyntaxError as e:
        assert 0 <= e.offset <= len(text)
        return
    for service in ("imap", "pops"):
        assert isinstance(f.decide(service, Host("10.1.2.3", resolve), Host("::1", resolve), "u").allowed, bool)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["imap", "pop", "ALL", "imap,pop"]),
                          st.sampled_from(["10.1.", "ALL", "KNOWN", "10.0.0.0/255.0.0.0", "10.1.2.3 EXCEPT 10.1.2.3"])),
                max_size=5),
       st.sampled_from(["imap", "pop", "smtp"]), st.sampled_from(["10.1.2.3", "10.9.9.9", "192.0.2.7"]))
def test_evaluation_matches_the_documented_order(rules, service, ip):
    """A model of the order: first matching allow rule, then first matching deny rule, else the default."""
    text = "$".join(("+" if a else "-") + s + ":" + c for a, s, c in rules)

    def match(s, c):
        ok_s = s == "ALL" or service in s.split(",")
        ok_c = {"10.1.": ip.startswith("10.1."), "ALL": True, "KNOWN": ip == "10.1.2.3",
                "10.0.0.0/255.0.0.0": ip.startswith("10."), "10.1.2.3 EXCEPT 10.1.2.3": False}[c]
        return ok_s and ok_c
    if any(a and match(s, c) for a, s, c in rules):
        want = True
    elif any(not a and match(s, c) for a, s, c in rules):
        want = False
    else:
        want = not (any(a for a, _, _ in rules) and all(a for a, _, _ in rules))
    assert allowed(text, service, ip) is want


# ---------------------------------------------------------------------- check-config
def _tree(tmp_path, imap_lines, vdmap=None):
    (tmp_path / "AService.cfg").write_text('default:ServiceList "/x/ImapProxyAService@1143"\n')
    lines = ["default:LogDir %s" % tmp_path] + imap_lines
    if vdmap is not None:
        (tmp_path / "vdmap.cfg").write_text(vdmap)
        lines.append("default:VirtualDomainFile %s" % (tmp_path / "vdmap.cfg"))
    (tmp_path / "ImapProxyAService.cfg").write_text("\n".join(lines) + "\n")
    return load_config(str(tmp_path))


def test_check_config_points_at_the_column_in_the_line(tmp_path):
    line = 'default:TCPAccess  "+imap:ALL$-pop:pc_3.example.com"'
    msgs = [str(p) for p in _tree(tmp_path, [line]).errors]
    col = line.index("_") + 1
    assert msgs == ["%s:2: TCPAccess: column %d: 'pc_3.example.com' is not a host name, address, pattern or "
                    "wildcard (ALL LOCAL KNOWN UNKNOWN DNSSPOOFER)" % (tmp_path / "ImapProxyAService.cfg", col)], msgs


def test_check_config_reads_a_filter_file_and_points_into_it(tmp_path):
    rules = tmp_path / "access.txt"
    rules.write_text("# who may use the proxy\n+imap:10.1. EXCEPT 10.1.2.3\n\n-imap:ALL$-pop:KNOWN\n")
    config = _tree(tmp_path, ["default:TCPAccess %s" % rules])
    assert config.errors == []
    flt = config.services[0].cfg.TCPAccess
    assert [r.text for r in flt.rules] == ["+imap:10.1. EXCEPT 10.1.2.3", "-imap:ALL", "-pop:KNOWN"]
    assert str(flt) == str(rules)
    rules.write_text("+imap:ALL\n-imap:10.1.$-imap:ALL EXCEPT\n")
    msgs = [str(p) for p in _tree(tmp_path, ["default:TCPAccess %s" % rules]).errors]
    assert msgs == ["%s:2: TCPAccess: %s:2: column 29: no client after EXCEPT"
                    % (tmp_path / "ImapProxyAService.cfg", rules)], msgs
    os.remove(rules)
    msgs = [str(p) for p in _tree(tmp_path, ["default:TCPAccess %s" % rules]).errors]
    assert len(msgs) == 1 and "cannot read %s" % rules in msgs[0]


def test_check_config_parses_filters_per_virtual_domain(tmp_path):
    vdmap = "vdmap one 127.0.0.9\none:TCPAccess +imap:ALL\none:TCPAccess -imap,popx:ALL\n"
    config = _tree(tmp_path, [], vdmap=vdmap)
    msgs = [str(p) for p in config.errors]
    assert msgs == ["%s:3: TCPAccess: column 21: unknown service 'popx' (known: imap imaps pop pops smtp smtps "
                    "http smime, or * or ALL)" % (tmp_path / "vdmap.cfg")], msgs


def test_check_config_warns_that_users_are_unknown_at_connect(tmp_path):
    config = _tree(tmp_path, ["default:TCPAccess -imap:joe@ALL"])
    assert config.errors == []
    assert any("RFC 931" in p.message for p in config.warnings)
    assert not any("RFC 931" in p.message for p in _tree(tmp_path, ["default:TCPAccess -imap:ALL@x.org"]).warnings)
