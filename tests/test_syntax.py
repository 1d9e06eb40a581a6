"""Pure logic of what clients send: IMAP arguments and quoting, the SASL decoders, SMTP line endings.

Examples for the cases that matter, and hypothesis properties: a round trip through quoting, and
that nothing a client can send makes the parsers hang or raise anything but the client-error classes.
"""
import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmproxy import sasl
from mmproxy.errors import ClientError, ClientSyntaxError, ClientTooLong
from mmproxy.imap import MAX_ARGS, MAX_STRING, ArgParser, parse_args, quote
from mmproxy.smtp import LineEndings

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------- IMAP arguments
def test_atoms_quoted_strings_and_lists():
    assert parse_args(b'alice "jo\\"e \\\\ x"') == [b"alice", b'jo"e \\ x']
    assert parse_args(b'("name" "x" "version" NIL) NIL') == [[b"name", b"x", b"version", b"NIL"], b"NIL"]
    assert parse_args(b"") == []
    assert parse_args(b'"p\xc3\xa4ss"') == [b"p\xc3\xa4ss"]          # UTF-8 in a quoted string (IMAP4rev2)


@pytest.mark.parametrize("text,message", [
    (b'alice "unterminated', "Missing '\"'"),
    (b'alice "pa\\ss"', "escaped"),                                 # only \\ and \" may be escaped
    (b'alice "trailing\\', "Missing '\"'"),
    (b'("name" "Client\\Build")', "escaped"),
    (b'("name" "x"', "Missing ')'"),
    (b'x)', "Unexpected ')'"),
    (b"ali\x00ce", "Invalid characters"),
])
def test_what_does_not_parse(text, message):
    with pytest.raises(ClientSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(text)


def test_limits_sit_on_what_can_grow():
    value = b'"' + b"v" * 1024 + b'"'
    rfc2971_maximum = b"(" + b" ".join(b'"field-%02d" %s' % (i, value) for i in range(30)) + b")"
    assert len(parse_args(rfc2971_maximum)[0]) == 60
    with pytest.raises(ClientTooLong):
        parse_args(b'"' + b"x" * (MAX_STRING + 1) + b'"')
    with pytest.raises(ClientTooLong):
        parse_args(b"a " * (MAX_ARGS + 1))
    with pytest.raises(ClientTooLong):
        parse_args(b"(((((((x)))))))")


def test_a_list_may_span_a_literal():
    p = ArgParser()
    p.feed(b'("name" ')
    p.literal(b"value with ) and \" in it")
    p.feed(b")")
    assert p.finish() == [[b"name", b"value with ) and \" in it"]]


def test_quote():
    assert quote(b'b"o b\\pw') == b'"b\\"o b\\\\pw"'
    assert quote("pässword".encode()) is None       # 8-bit: a literal
    assert quote(b"p\xe4sswort") is None
    assert quote(b"x" * 2000) is None
    assert quote(b"a\rb") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).filter(lambda b: all(0x20 <= c <= 0x7E for c in b)))
def test_quoting_round_trips(value):
    quoted = quote(value)
    assert quoted is not None
    assert parse_args(quoted) == [value]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_line_parses_or_raises_a_client_error(line):
    try:
        parse_args(line)
    except ClientError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b"(", b")", b'"', b"\\", b" ", b"NIL"])),
                max_size=40))
def test_token_soup_parses_or_raises_a_client_error(pieces):
    try:
        parse_args(b"".join(pieces))
    except ClientError:
        pass


# ---------------------------------------------------------------------- SASL
def test_sasl_plain_and_responses():
    assert sasl.plain(b"\0alice\0p\xe4ss") == (b"", b"alice", b"p\xe4ss")
    assert sasl.decode(b"=") == b""
    assert sasl.decode(base64.b64encode(b"\0a\0b") + b"  ") == b"\0a\0b"
    assert sasl.is_cancel(b"*") and sasl.is_cancel(b" * ") and not sasl.is_cancel(b"**")
    for bad in (b"not base64!", b"YWJj=ZA", b"Y"):
        with pytest.raises(ClientSyntaxError):
            sasl.decode(bad)
    for bad in (b"alice\0pw", b"\0\0pw", b"a\0b\0c\0d"):
        with pytest.raises(ClientSyntaxError):
            sasl.plain(bad)


def test_challenge_response_digests():
    """RFC 2195 section 2 and RFC 1939 section 7, the examples of the RFCs themselves."""
    assert sasl.cram_md5_digest(b"tanstaaftanstaaf", b"<1896.697170952@postoffice.reston.mci.net>") \
        == "b913a602c7eda7a495b4e6e7334d3890"
    assert sasl.apop_digest(b"<1896.697170952@dbc.mtview.ca.us>", b"tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"
    assert sasl.cram_md5_response(b"tim B913A602C7EDA7A495B4E6E7334D3890") == \
        (b"tim", "b913a602c7eda7a495b4e6e7334d3890")
    assert sasl.digest_matches("ABC", "abc") and not sasl.digest_matches("abc", "abd")
    with pytest.raises(ClientSyntaxError):
        sasl.cram_md5_response(b"tim short")
    assert sasl.challenge() != sasl.challenge()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_sasl_decoders_never_raise_anything_else(data):
    for fn in (sasl.decode, sasl.plain, sasl.cram_md5_response):
        try:
            fn(data)
        except ClientSyntaxError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.binary(max_size=100), st.binary(max_size=100))
def test_plain_round_trips(authzid, authcid, password):
    message = b"\0".join((authzid, authcid, password))
    if b"\0" in authzid + authcid + password or not authcid:
        return
    assert sasl.plain(sasl.decode(base64.b64encode(message))) == (authzid, authcid, password)


# ---------------------------------------------------------------------- SMTP message text
@pytest.mark.parametrize("pieces,ok", [
    ([b"a\r\nb\r\n"], True),
    ([b"a\r", b"\nb\r\n"], True),                  # CR LF split across two BDAT chunks
    ([b"a\nb\r\n"], False),                         # bare LF
    ([b"a\rb\r\n"], False),                         # bare CR
    ([b"a\r", b"b\r\n"], False),                    # CR at a chunk end, no LF after it
    ([b"a\r\n\n"], False),
])
def test_line_endings_across_pieces(pieces, ok):
    e = LineEndings()
    assert all([e.feed(p) for p in pieces]) is ok


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=10), st.data())
def test_line_endings_do_not_depend_on_where_chunks_are_cut(lines, data):
    text = b"".join(lines)
    whole = LineEndings()
    verdict = whole.feed(text) and whole.complete()
    cut = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=5)))
    pieces = [text[a:b] for a, b in zip([0] + cut, cut + [len(text)])]
    split = LineEndings()
    assert (all([split.feed(p) for p in pieces]) and split.complete()) == verdict
