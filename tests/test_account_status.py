"""Account and domain status (inetUserStatus, mailUserStatus, inetDomainStatus, mailDomainStatus),
read in the user's own search: inactive/disabled/deleted/removed refuse as a wrong password would,
hold is a temporary failure, active and overquota log in.  End to end against slapd and Dovecot."""
import time

import pytest

from mmproxy import imap, pop
from mmproxy.directory import account_status
from mmproxy.testing.proxy import Proxy

from helpers import RawClient, proxy_log, wait_for_log


@pytest.mark.parametrize("values,status", [
    ((), "active"), ((None, None, None, None), "active"), (("active", None, "Active", "overquota"), "overquota"),
    (("inactive", "hold", None, None), "inactive"),          # the domain's status comes first
    ((None, "hold", "deleted", None), "hold"), ((None, None, "deleted", "hold"), "deleted"),
    ((None, None, None, "removed"), "removed"), ((None, None, "frozen", None), "inactive"),   # unknown: inactive
    ((" HOLD ",), "hold"), (("disabled",), "disabled"),
    (("active", "active", "inactive"), "inactive"),          # every value of a multi-valued attribute counts
])
def test_account_status_order(values, status):
    assert account_status(*values) == status


def imap_login(p, user, password, source):
    r = RawClient(p.host, p.imap_port, source=source)
    r.expect(b"* OK")
    r.send(b"a LOGIN %s %s\r\n" % (user.encode(), password.encode()))
    return r.skip_to(b"a ")


@pytest.mark.parametrize("preauth", [True, False], ids=["preauth", "no-preauth"])
def test_status_decides_the_login(mail_stack, preauth):
    store = mail_stack.stores["127.0.0.2"]
    before = store.read_log().count("user=<ivan>")
    with Proxy(mail_stack.info(), imap={"PreAuth": preauth}, pop={"PreAuth": preauth}) as p:
        assert imap_login(p, "ivan", "ivan-pw", "127.0.0.31") == b"a " + imap.NO_AUTH.encode() + b"\r\n"
        assert imap_login(p, "kurt", "kurt-pw", "127.0.0.31").startswith(b"a OK ")        # overquota logs in
        if preauth:
            # hold: a temporary failure, once the password is right
            assert imap_login(p, "judy", "wrong", "127.0.0.31") == b"a " + imap.NO_AUTH.encode() + b"\r\n"
        assert imap_login(p, "judy", "judy-pw", "127.0.0.31") == b"a " + imap.NO_TEMP.encode() + b"\r\n"
        r = RawClient(p.host, p.pop_port, source="127.0.0.31")
        r.expect(b"+OK")
        r.send(b"USER judy\r\nPASS judy-pw\r\nUSER ivan\r\nPASS ivan-pw\r\n")
        r.expect(b"+OK")
        r.expect_lines(pop.ERR_TEMP)
        r.expect(b"+OK")
        r.expect_lines(pop.ERR_AUTH)
        log = wait_for_log(p, "is on hold")
        assert "login failed user='ivan': account disabled: uid=ivan," in log and " is inactive" in log
        assert "account on hold" in log and "Traceback" not in proxy_log(p)
    time.sleep(0.3)
    assert store.read_log().count("user=<ivan>") == before                 # never sent to the store
