"""certmap.conf parsing and the searches a mapping asks for (pure logic; the LDAP side is in test_tls)."""
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from mmproxy.certmap import Certmap, CertmapError, Search, normalise_dn, within
from mmproxy.testing.certs import TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(str(tmp_path_factory.mktemp("ca")), "Corp CA")


def der(ca, name, **kw):
    cert, _ = ca.issue(name, client=True, **kw)
    with open(cert, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)


def subject(*pairs):
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def test_the_mmp_example_from_to(ca):
    """The MMP's extension: subject cn=Pilar Lorca, ou=pilar, o=siroe.com maps to (uid=pilar)."""
    cm = Certmap.parse("certmap default default\ndefault:DNComps\ndefault:FilterComps ou=uid\n", "c")
    cert = der(ca, "pilar", subject=subject((NameOID.ORGANIZATION_NAME, "siroe.com"),
                                            (NameOID.ORGANIZATIONAL_UNIT_NAME, "pilar"),
                                            (NameOID.COMMON_NAME, "Pilar Lorca")))
    m, searches = cm.searches(cert, "o=internet")
    assert m.name == "default" and searches == [Search("o=internet", False, (("uid", "pilar"),))]


def test_dncomps_forms_the_base_and_never_leaves_usergroupdn(ca):
    text = ("certmap default default\ndefault:FilterComps e\n"
            "certmap corp  CN=Corp CA ,  O=mmproxy tests\ncorp:DNComps ou, o\ncorp:FilterComps cn\ncorp:VerifyCert on\n"
            "corp:CmapLdapAttr certSubjectDN\n")
    cm = Certmap.parse(text, "c")
    cert = der(ca, "x", subject=subject((NameOID.ORGANIZATION_NAME, "internet"),
                                        (NameOID.ORGANIZATIONAL_UNIT_NAME, "People, Inc"),
                                        (NameOID.COMMON_NAME, "bob")))
    m, searches = cm.searches(cert, "o=internet")
    assert m.name == "corp" and m.verifycert                          # the issuer line matched, blanks aside
    assert searches == [Search("o=internet", False, (("certSubjectDN", "CN=bob,OU=People\\, Inc,O=internet"),)),
                        Search("ou=People\\, Inc,o=internet", False, (("cn", "bob"),))]
    assert cm.searches(cert, "o=elsewhere")[1] == [Search("o=elsewhere", False, (("certSubjectDN",
                                                           "CN=bob,OU=People\\, Inc,O=internet"),))]
    # no DNComps: the subject DN is the entry itself, only within the base
    cm = Certmap.parse("certmap default default\n", "c")
    other = TestCA(ca.dir + "-2", "Other CA")
    cert = der(other, "y", subject=subject((NameOID.ORGANIZATION_NAME, "internet"), (NameOID.USER_ID, "carol")))
    assert cm.searches(cert, "o=internet")[1] == [Search("UID=carol,O=internet", True, ())]
    assert cm.searches(cert, "o=example")[1] == []


def test_e_and_mail_take_the_email_address(ca):
    cm = Certmap.parse("certmap default default\ndefault:DNComps\ndefault:FilterComps mail\n", "c")
    cert = der(ca, "z", email="z@example.com")
    assert cm.searches(cert, "o=internet")[1] == [Search("o=internet", False, (("mail", "z@example.com"),))]
    cert = der(ca, "w")                                   # no e-mail address: no search at all
    assert cm.searches(cert, "o=internet")[1] == []


@pytest.mark.parametrize("text, line, message", [
    ("", 1, "no `certmap NAME ISSUERDN` line"),
    ("certmap default\n", 1, "expected `certmap NAME ISSUERDN`"),
    ("certmap a default\ncertmap b default\n", 2, "issuer 'default' already has mapping 'a'"),
    ("certmap a default\ncertmap a o=x\n", 2, "mapping 'a' is defined twice"),
    ("# c\nb:DNComps\n", 2, "mapping 'b' is used before its `certmap b ISSUERDN` line"),
    ("certmap a default\na:VerifyCert maybe\n", 2, "a:VerifyCert: VerifyCert is on or off"),
    ("certmap a default\na:FilterComps (uid=*)\n", 2, "a:FilterComps: '(uid' is not an attribute name"),
    ("certmap a default\na:InitFn init\n", 2, "a:InitFn: certmap plug-ins are not supported"),
    ("certmap a default\na:Colour blue\n", 2, "unknown property 'colour'"),
    ("certmap a default\njust words\n", 2, "expected `certmap NAME ISSUERDN` or `NAME:Property value`"),
])
def test_errors_name_the_line(text, line, message):
    with pytest.raises(CertmapError) as e:
        Certmap.parse(text, "/etc/certmap.conf")
    assert (e.value.file, e.value.line) == ("/etc/certmap.conf", line) and e.value.message.startswith(message)
    assert str(e.value).startswith("/etc/certmap.conf:%d: " % line)


def test_dn_helpers():
    assert normalise_dn("CN=Corp CA ,  O=Corp") == normalise_dn("cn=corp ca,o=corp")
    assert within("uid=a,ou=People,o=internet", "O=Internet") and not within("o=internet2", "o=internet")
    assert not within("o=x,o=internetx", "o=internet")
