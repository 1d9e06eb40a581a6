"""Pure logic: login splitting, %-format expansion, filter escaping, host names, credentials."""
import pytest

from mmproxy.addresses import address_key, is_host_name, unmapped
from mmproxy.errors import AuthFailed
from mmproxy.login import credentials
from mmproxy.loginid import escape_filter_value, replay_id, search_filter, split_login


def test_split_from_the_end_and_canonical_delimiter():
    lid = split_login("joe@home@Example.COM", "@+", None, "@")
    assert (lid.user, lid.domain, lid.canonical) == ("joe@home", "example.com", "joe@home@example.com")
    lid = split_login("joe+example.com", "@+", None, "%")
    assert (lid.user, lid.domain, lid.canonical) == ("joe", "example.com", "joe%example.com")


def test_default_domain_applies_to_unqualified_ids_only():
    assert split_login("joe", "@", "example.org", "@").canonical == "joe@example.org"
    assert split_login("joe@example.com", "@", "example.org", "@").domain == "example.com"
    assert split_login("joe", "@", None, "@").canonical == "joe"


def test_search_filter_escapes_and_wraps():
    lid = split_login("a*)(uid=*@example.com", "@", None, "@")
    flt = search_filter("uid=%U", lid)
    assert flt == r"(uid=a\2a\29\28uid=\2a)"
    assert search_filter("(uid=%s)", split_login("joe@x.org", "@", None, "@")) == "(uid=joe@x.org)"


def test_expansion_is_single_pass():
    """A %U typed by the user must stay literal, never be expanded a second time."""
    lid = split_login("%U%s@example.com", "@", None, "@")
    assert search_filter("(&(uid=%U)(mail=%s))", lid) == "(&(uid=%U%s)(mail=%U%s@example.com))"
    assert replay_id("%U", lid, {}) == "%U%s"


def test_replay_formats():
    lid = split_login("Joe@example.com", "@", None, "@")
    attrs = {"uid": ["joe.smith"], "mailhost": ["h"]}
    assert replay_id("%A[uid]@%V", lid, attrs) == "joe.smith@example.com"
    assert replay_id("%U", lid, attrs) == "Joe"
    assert replay_id("%o", lid, attrs) == "Joe@example.com"
    assert replay_id("%A[missing]x", lid, attrs) == "x"
    assert replay_id("100%%", lid, attrs) == "100%"


def test_escape_filter_value():
    assert escape_filter_value("a\\b*c(d)e\x00") == r"a\5cb\2ac\28d\29e\00"


@pytest.mark.parametrize("name,ok", [("example.com", True), ("a-b.example", True), ("-bad.com", False),
                                     ("ex ample.com", False), ("x,dc=evil", False), ("", False),
                                     ("a..b", False), ("a" * 64 + ".com", False), ("dc=com", False)])
def test_host_names(name, ok):
    assert is_host_name(name) is ok
    assert is_host_name(name.upper()) is ok


def test_client_addresses_have_one_spelling():
    assert address_key("::ffff:127.0.0.9") == address_key("127.0.0.9") == "127.0.0.9"
    assert address_key("fe80::1%eth0") == "fe80::1"
    assert address_key("[2001:db8::1]") == "2001:db8::1"
    assert address_key("not an address") == "not an address"
    with pytest.raises(ValueError):
        unmapped("example.com")


@pytest.mark.parametrize("user,password,why", [
    (b"", b"pw", "empty login id"),
    (b"alice@example.com\xc3(", b"pw", "not UTF-8"),
    (b"ali\x00ce", b"pw", "control characters"),
    (b"alice\r\n", b"pw", "control characters"),
    (b"a" * 257, b"pw", "octets"),
    (b"alice", b"pw\r\nx", "NUL, CR or LF"),
    (b"alice", b"p\x00w", "NUL, CR or LF"),
])
def test_credentials_refuse_what_no_directory_or_store_could_take(user, password, why):
    with pytest.raises(AuthFailed, match=why):
        credentials(user, password)


def test_credentials_keep_passwords_as_octets():
    c = credentials("jürgen@example.com".encode(), b"p\xe4sswort \t\xff")
    assert c.user == "jürgen@example.com" and c.password == b"p\xe4sswort \t\xff"
