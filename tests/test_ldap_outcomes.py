"""One mapping of LDAP outcomes: each result is classified once (directory.OUTCOMES) and each class
has one client reply (reply_for) and one set of log words (failure_kind).  Pure checks of the table,
then the outcomes a real slapd produces, end to end: ambiguous user, referral, BindDN refused."""
import ldap
import pytest

from mmproxy import imap, pop
from mmproxy.directory import OUTCOMES, outcome
from mmproxy.errors import (
    AccountDisabled,
    AmbiguousUser,
    AuthFailed,
    AuthTempFail,
    DirectoryError,
    DirectoryUnavailable,
    UnknownUser,
)
from mmproxy.session import failure_kind
from mmproxy.testing.proxy import Proxy
from mmproxy.testing.slapd import Slapd

from helpers import RawClient, wait_for_log


@pytest.mark.parametrize("error,cls,failover", [
    (ldap.SERVER_DOWN, DirectoryUnavailable, True), (ldap.TIMEOUT, DirectoryUnavailable, True),
    (ldap.BUSY, DirectoryUnavailable, True), (ldap.UNAVAILABLE, DirectoryUnavailable, True),
    (ldap.CONNECT_ERROR, DirectoryUnavailable, True),
    (ldap.REFERRAL, DirectoryError, False), (ldap.INVALID_CREDENTIALS, DirectoryError, False),
    (ldap.CONFIDENTIALITY_REQUIRED, DirectoryError, False), (ldap.ADMINLIMIT_EXCEEDED, DirectoryError, False),
    (ldap.PROTOCOL_ERROR, DirectoryError, False),                       # anything unforeseen
])
def test_every_ldap_error_has_one_outcome(error, cls, failover):
    kind = outcome(error({"desc": "x"}))
    assert kind.error is cls and kind.failover is failover
    assert issubclass(kind.error, AuthTempFail)       # never a bad password
    assert len({c for c, _ in OUTCOMES}) == len(OUTCOMES)


@pytest.mark.parametrize("cls,words,temporary", [
    (UnknownUser, "unknown user", False), (AmbiguousUser, "ambiguous user", False),
    (AccountDisabled, "account disabled", False), (AuthFailed, "auth failed", False),
    (DirectoryUnavailable, "directory unavailable", True), (DirectoryError, "directory error", True),
])
def test_each_class_has_its_words_and_reply_kind(cls, words, temporary):
    assert failure_kind(cls("x")) == words
    assert issubclass(cls, AuthTempFail) is temporary and issubclass(cls, AuthFailed) is not temporary


@pytest.fixture(scope="module")
def own_slapd(mail_stack, tmp_path_factory):
    s = Slapd(mail_stack.directory, workdir=str(tmp_path_factory.mktemp("ldap-outcomes")))
    s.start()
    try:
        add_odd_entries(s)
        yield s
    finally:
        s.close()


def add_odd_entries(s):
    """A second entry with alice's uid, and a DC-tree node that is a referral to another server."""
    s.add("dn: cn=alice2,ou=People,o=example.com,o=internet\nobjectClass: inetOrgPerson\nobjectClass: mailUser\n"
          "cn: alice2\nsn: alice2\nuid: alice\nmailHost: 127.0.0.2\n\n"
          "dn: dc=elsewhere,dc=com,o=internet\nobjectClass: referral\nobjectClass: extensibleObject\n"
          "dc: elsewhere\nref: ldap://127.0.0.1:9/dc=elsewhere,dc=com,o=internet\n")


def login(p, user, password):
    """(the IMAP tagged answer, the POP answer to PASS) for one login each."""
    r = RawClient(p.host, p.imap_port)
    r.expect(b"* OK")
    r.send(b'a LOGIN %s "%s"\r\n' % (user.encode(), password.encode()))
    first = r.skip_to(b"a ")
    r = RawClient(p.host, p.pop_port)
    r.expect(b"+OK")
    r.send(b'USER %s\r\nPASS %s\r\n' % (user.encode(), password.encode()))
    r.expect(b"+OK")
    return first, r.readline()


NO_AUTH = (b"a " + imap.NO_AUTH.encode() + b"\r\n", pop.ERR_AUTH.encode() + b"\r\n")
NO_TEMP = (b"a " + imap.NO_TEMP.encode() + b"\r\n", pop.ERR_TEMP.encode() + b"\r\n")


def test_outcomes_end_to_end(mail_stack, own_slapd):
    server = "ldap://%s:%d" % (own_slapd.host, own_slapd.port)
    url = server + "/o=internet"
    cfg = {"LdapURL": url, "LdapNegativeCacheTTL": 0}
    with Proxy(mail_stack.info(), imap=cfg, pop=cfg) as p:
        assert login(p, "alice", "alice-pw") == NO_AUTH                        # two entries: no guess
        wait_for_log(p, "login failed user='alice': ambiguous user: search (uid=alice) under "
                        "o=example.com,o=internet matched more than one entry")
        assert login(p, "bob@elsewhere.com", "x") == NO_TEMP                    # a referral is not followed
        wait_for_log(p, "login failed user='bob@elsewhere.com': directory error: directory %s: referral "
                        "(mmproxy does not follow referrals" % server)
        assert login(p, "nobody", "x") == NO_AUTH
        wait_for_log(p, "login failed user='nobody': unknown user: unknown user 'nobody@example.com'")
    with Proxy(mail_stack.info(), imap={**cfg, "BindPass": "wrong"}, pop={**cfg, "BindPass": "wrong"}) as p:
        assert login(p, "erin", "erin-pw") == NO_TEMP                          # the proxy's own bind refused
        log = wait_for_log(p, "directory error: directory %s: BindDN refused" % server)
        assert "Traceback" not in log
