"""Pure logic: login splitting, %-format expansion, filter escaping, IMAP tokenizing and quoting."""
import pytest

from mmproxy.errors import ClientSyntaxError
from mmproxy.formats import escape_filter_value, has_control_chars, is_dns_name, replay_id, search_filter, split_login
from mmproxy.imap import quote, tokenize


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
def test_dns_names(name, ok):
    assert is_dns_name(name) is ok


def test_control_characters():
    assert has_control_chars("a\x00b") and has_control_chars("a\rb") and has_control_chars("\x7f")
    assert not has_control_chars("pässword with spaces")


def test_tokenize():
    assert tokenize(b'a1 LOGIN "jo\\"e" pass') == [b"a1", b"LOGIN", b'jo"e', b"pass"]
    assert tokenize(b'a ID ("name" "x") NIL') == [b"a", b"ID", "(", b"name", b"x", ")", b"NIL"]
    with pytest.raises(ClientSyntaxError):
        tokenize(b'a LOGIN "unterminated')
    with pytest.raises(ClientSyntaxError):
        tokenize(b'a LOGIN "bad \\x escape"')


def test_quote():
    assert quote('b"o b\\pw') == b'"b\\"o b\\\\pw"'
    assert quote("pässword") is None          # 8-bit: a literal
    assert quote("x" * 2000) is None
    assert quote("a\rb") is None
