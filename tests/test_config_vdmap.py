"""vdmap.cfg: per-server-address virtual domain settings."""
import os
import subprocess
import sys

from mmproxy.config.params import PARAMS
from mmproxy.config.vdmap import read_vdmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(tmp_path, text, service="imap"):
    f = tmp_path / "vdmap.cfg"
    f.write_text(text)
    vd, problems = read_vdmap(str(f), config_dir=str(tmp_path), service=service)
    return vd, [str(p).replace(str(f), "vdmap.cfg") for p in problems]


def test_domains_by_address(tmp_path):
    vd, problems = read(tmp_path, "# virtual domains\n"
                                  "vdmap siroe 192.0.2.10\n"
                                  "vdmap siroe 2001:db8::10\n"
                                  "VDMAP varrius 192.0.2.11\n"
                                  "siroe:DefaultDomain siroe.com\n"
                                  'siroe:ReplayFormat "%A[uid]@%V"   # store wants uid@domain\n'
                                  "siroe:preauth on\n"
                                  'SIROE:LdapURL "ldap://l1 l2/o=siroe"\n'
                                  "varrius:SearchFormat (mail=%s)\n"
                                  'varrius:DefaultDomain ""\n')
    assert problems == []
    over = vd.for_address("192.0.2.10")
    assert over["DefaultDomain"] == "siroe.com" and over["ReplayFormat"] == "%A[uid]@%V" and over["PreAuth"] is True
    assert over["LdapURL"].urls() == ["ldap://l1:389", "ldap://l2:389"]
    assert vd.for_address("2001:DB8::10") == over and vd.for_address("::ffff:192.0.2.10") == over
    assert vd.for_address("192.0.2.11") == {"SearchFormat": "(mail=%s)"}
    assert vd.for_address("192.0.2.99") == {} and vd.for_address("not-an-ip") == {}
    over["PreAuth"] = False
    assert vd.for_address("192.0.2.10")["PreAuth"] is True     # callers get a copy


def test_problems_carry_file_and_line(tmp_path):
    _, problems = read(tmp_path, "vdmap siroe 192.0.2.10\n"
                                 "vdmap other 192.0.2.10\n"
                                 "vdmap bad 192.0.2.300\n"
                                 "vdmap siroe\n"
                                 "siroe:DefautDomain siroe.com\n"
                                 "siroe:BacksidePort 1143\n"
                                 "siroe:SSLEnable yes\n"
                                 "siroe:PreAuth perhaps\n"
                                 "siroe:TCPAccess \"-imap:ALL EXCEPT\"\n"
                                 "siroe:ClientLookup yes\n"
                                 "siroe:PreAuth yes\n"
                                 "siroe:PreAuth no\n"
                                 "ghost:DefaultDomain ghost.com\n")
    assert problems == [
        "vdmap.cfg:2: 192.0.2.10 is already mapped to siroe (line 1)",
        "vdmap.cfg:3: vdmap bad: '192.0.2.300' is not an IP address",
        "vdmap.cfg:4: expected `vdmap NAME IP` or `NAME:Param value`",
        'vdmap.cfg:5: unknown parameter "DefautDomain" (did you mean "DefaultDomain"?)',
        "vdmap.cfg:6: warning: BacksidePort cannot be set per virtual domain: ignored",
        "vdmap.cfg:7: SSLEnable cannot be set per virtual domain; mmproxy refuses to start rather than drop "
        "this access control",
        "vdmap.cfg:8: PreAuth: not a boolean (use yes/no, on/off, true/false or 1/0)",
        "vdmap.cfg:9: TCPAccess: column 34: no client after EXCEPT",
        "vdmap.cfg:12: warning: siroe:PreAuth is set again (first at line 11): the last value wins",
        "vdmap.cfg:13: warning: virtual domain ghost has no `vdmap ghost IP` line: its settings are never used"]


def test_unreadable_file(tmp_path):
    vd, problems = read_vdmap(str(tmp_path / "missing.cfg"))
    assert vd.for_address("192.0.2.10") == {}
    assert [p.severity for p in problems] == ["error"] and "cannot read" in problems[0].message


def test_every_per_domain_parameter_is_accepted(tmp_path):
    """The manual's list (see tests/test_vdmap.py, which checks each one end to end) parses as vdmap lines."""
    values = {"AuthCacheSize": "5", "AuthCacheTTL": "3", "AuthService": "yes", "BindDN": "cn=x,o=internet",
              "BindPass": "secret", "CertMapDN": "o=internet", "UserGroupDN": "o=internet", "ClientLookup": "yes",
              "CRAMs": "yes", "DefaultDomain": "siroe.com", "VirtualDomainDelim": "+", "HostedDomains": "no",
              "LdapCacheSize": "7", "LdapCacheTTL": "11", "LdapURL": "ldap://l1/o=internet",
              "MailHostAttrs": "mailHost",
              "PreAuth": "yes", "ReplayFormat": "%U@%V", "RestrictPlainPasswords": "yes", "StoreAdmin": "admin",
              "StoreAdminPass": "admin-pw", "SearchFormat": "(uid=%U)", "TCPAccess": "+imap:ALL"}
    assert set(values) == {p.name for p in PARAMS.values() if p.per_domain}
    vd, problems = read(tmp_path, "vdmap siroe 192.0.2.10\n" + "".join("siroe:%s %s\n" % kv for kv in values.items()))
    line = 2 + list(values).index("CertMapDN")
    assert problems == ["vdmap.cfg:%d: warning: CertMapDN is obsolete, superseded by UserGroupDN; its value is still "
                        "used" % line]
    assert set(vd.for_address("192.0.2.10")) == set(values)


def test_check_config_reports_the_vdmap_file(tmp_path):
    """`mmproxy check-config` names the vdmap.cfg line of each problem and exits non-zero on errors."""
    vdmap = tmp_path / "vdmap.cfg"
    vdmap.write_text("vdmap siroe 127.0.0.9\n"
                     "siroe:NoSuchParam 1\n"
                     "siroe:MaxConcurrentConnectionAttempts 4\n"
                     "siroe:LdapCacheTTL soon\n"
                     "varrius:DefaultDomain varrius.com\n")
    (tmp_path / "AService.cfg").write_text('default:ServiceList "/x/ImapProxyAService@1143"\n')
    (tmp_path / "ImapProxyAService.cfg").write_text("default:LogDir %s\ndefault:VirtualDomainFile %s\n"
                                                    % (tmp_path, vdmap))
    r = subprocess.run([sys.executable, "-m", "mmproxy", "check-config", "--config-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    for line in ['%s:2: unknown parameter "NoSuchParam"' % vdmap,
                 "%s:3: warning: MaxConcurrentConnectionAttempts cannot be set per virtual domain: ignored" % vdmap,
                 "%s:4: LdapCacheTTL: " % vdmap,
                 "%s:5: warning: virtual domain varrius has no `vdmap varrius IP` line: its settings are never used"
                 % vdmap]:
        assert line in out, out
