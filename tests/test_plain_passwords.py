"""RestrictPlainPasswords on every mechanism of IMAP and POP (SMTP's are in test_smtp): before TLS
each way of sending a password in clear is refused unseen (a literal is never invited, a SASL
exchange never started) and none is advertised; after STARTTLS/STLS or on the implicit-TLS port
each one logs in.  RFC 9051 6.2.3 (LOGINDISABLED), RFC 2595, RFC 4959 (SASL-IR), RFC 5034."""
import base64
import ssl

import pytest

from mmproxy import __version__, imap, pop
from mmproxy.testing.proxy import Proxy, make_cert

from helpers import RawClient

PLAIN_IR = base64.b64encode(b"\0alice\0alice-pw").decode()
USER_B64, PASS_B64 = base64.b64encode(b"alice").decode(), base64.b64encode(b"alice-pw").decode()
IMAP_BANNER = "mmproxy %s IMAP4rev1 proxy ready" % __version__
IMAP_CAPS_CLEAR = "IMAP4rev1 LITERAL- SASL-IR ID STARTTLS LOGINDISABLED"
IMAP_CAPS_TLS = "IMAP4rev1 LITERAL- SASL-IR ID AUTH=PLAIN AUTH=LOGIN"
POP_CAPA = ["+OK Capability list follows", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]


@pytest.fixture(scope="module")
def proxy(mail_stack, tmp_path_factory):
    certs = make_cert(str(tmp_path_factory.mktemp("tls")))
    with Proxy(mail_stack.info(), tls=certs, imap={"RestrictPlainPasswords": True},
               pop={"RestrictPlainPasswords": True}) as p:
        yield p


def tls(r):
    """The raw client's connection, now over TLS (nothing may be buffered)."""
    assert r.buf == b""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    r.sock = ctx.wrap_socket(r.sock)
    return r


def imap_client(p, implicit=False):
    r = RawClient(p.host, p.imaps_port if implicit else p.imap_port)
    if implicit:
        tls(r)
    r.expect_lines("* OK [CAPABILITY %s] %s" % (IMAP_CAPS_TLS if implicit else IMAP_CAPS_CLEAR, IMAP_BANNER))
    return r


def test_imap_before_tls_every_plaintext_mechanism_is_refused_unseen(proxy):
    r = imap_client(proxy)
    r.send(b"a CAPABILITY\r\n")
    r.expect_lines("* CAPABILITY " + IMAP_CAPS_CLEAR, "a OK Capability completed")
    refused = [b"b LOGIN alice alice-pw",
               b"c LOGIN alice {8}",                        # no "+": the password is never sent
               b"d AUTHENTICATE PLAIN",                     # no "+ " challenge
               b"e AUTHENTICATE PLAIN " + PLAIN_IR.encode(),   # SASL-IR
               b"f AUTHENTICATE LOGIN",
               b"g AUTHENTICATE LOGIN " + USER_B64.encode(),
               b"h authenticate plain " + PLAIN_IR.encode(),
               b"i AUTHENTICATE PLAIN {24}"]                # an initial response offered as a literal
    for line in refused:
        r.send(line + b"\r\n")
        r.expect_lines(line.split(b" ")[0] + b" " + imap.NO_PRIVACY.encode())
    r.send(b"j NOOP\r\n")                                  # nothing of those was taken for a command
    r.expect_lines("j OK NOOP completed")
    r.send(b"k STARTTLS\r\n")
    r.expect_lines("k OK Begin TLS negotiation now")
    tls(r)
    r.send(b"l CAPABILITY\r\n")
    r.expect_lines("* CAPABILITY " + IMAP_CAPS_TLS, "l OK Capability completed")
    r.send(b"m LOGIN alice alice-pw\r\n")
    assert r.expect(b"m OK [CAPABILITY ")


@pytest.mark.parametrize("dialogue", [
    [(b"a LOGIN alice {8}", "+ Ready for literal data"), (b"alice-pw", None)],
    [(b"a AUTHENTICATE PLAIN " + PLAIN_IR.encode(), None)],
    [(b"a AUTHENTICATE PLAIN", "+ "), (PLAIN_IR.encode(), None)],
    [(b"a AUTHENTICATE LOGIN " + USER_B64.encode(), "+ UGFzc3dvcmQ6"), (PASS_B64.encode(), None)],
    [(b"a AUTHENTICATE LOGIN", "+ VXNlcm5hbWU6"), (USER_B64.encode(), "+ UGFzc3dvcmQ6"), (PASS_B64.encode(), None)],
], ids=["LOGIN", "PLAIN-IR", "PLAIN", "LOGIN-mech-IR", "LOGIN-mech"])
def test_imap_over_implicit_tls_every_mechanism_logs_in(proxy, dialogue):
    r = imap_client(proxy, implicit=True)
    for line, answer in dialogue:
        r.send(line + b"\r\n")
        if answer is not None:
            r.expect_lines(answer)
    assert r.expect(b"a OK [CAPABILITY ")
    r.send(b"b LOGOUT\r\n")
    r.expect(b"* BYE")


def pop_client(p, implicit=False):
    r = RawClient(p.host, p.pops_port if implicit else p.pop_port)
    if implicit:
        tls(r)
    r.expect_lines("+OK mmproxy %s POP3 proxy ready" % __version__)
    return r


def test_pop_before_tls_every_plaintext_mechanism_is_refused_unseen(proxy):
    r = pop_client(proxy)
    r.send(b"CAPA\r\n")
    r.expect_lines(*POP_CAPA, "STLS", "IMPLEMENTATION mmproxy", ".")      # no USER, no SASL
    r.send(b"AUTH\r\n")
    r.expect_lines("+OK", ".")                                           # no mechanism to offer
    for line in (b"USER alice", b"AUTH PLAIN", b"AUTH PLAIN " + PLAIN_IR.encode(), b"AUTH LOGIN",
                 b"AUTH LOGIN " + USER_B64.encode(), b"auth plain " + PLAIN_IR.encode()):
        r.send(line + b"\r\n")
        r.expect_lines(pop.ERR_PRIVACY)
    r.send(b"PASS alice-pw\r\n")                          # never after a USER that was refused
    r.expect_lines("-ERR USER first")
    r.send(b"STLS\r\n")
    r.expect_lines("+OK Begin TLS negotiation")
    tls(r)
    r.send(b"CAPA\r\n")
    r.expect_lines(*POP_CAPA, "SASL PLAIN LOGIN", "USER", "IMPLEMENTATION mmproxy", ".")
    r.send(b"AUTH\r\n")
    r.expect_lines("+OK", "PLAIN", "LOGIN", ".")
    r.send(b"USER alice\r\n")
    r.expect_lines("+OK")
    r.send(b"PASS alice-pw\r\n")
    assert r.expect(b"+OK")


@pytest.mark.parametrize("dialogue", [
    [(b"USER alice", "+OK"), (b"PASS alice-pw", None)],
    [(b"AUTH PLAIN " + PLAIN_IR.encode(), None)],
    [(b"AUTH PLAIN", "+ "), (PLAIN_IR.encode(), None)],
    [(b"AUTH LOGIN " + USER_B64.encode(), "+ UGFzc3dvcmQ6"), (PASS_B64.encode(), None)],
    [(b"AUTH LOGIN", "+ VXNlcm5hbWU6"), (USER_B64.encode(), "+ UGFzc3dvcmQ6"), (PASS_B64.encode(), None)],
], ids=["USER-PASS", "PLAIN-IR", "PLAIN", "LOGIN-IR", "LOGIN"])
def test_pop_over_implicit_tls_every_mechanism_logs_in(proxy, dialogue):
    r = pop_client(proxy, implicit=True)
    for line, answer in dialogue:
        r.send(line + b"\r\n")
        if answer is not None:
            r.expect_lines(answer)
    assert r.expect(b"+OK")
    r.send(b"QUIT\r\n")
    r.expect(b"+OK")
