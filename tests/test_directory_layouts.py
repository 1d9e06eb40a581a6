"""Directory layouts end to end against slapd and Dovecot: DC-tree domain aliases (aliasedObjectName,
one hop; index nodes with inetCanonicalDomainName), Schema 2 organisations found by
sunPreferredDomain / associatedDomain under UserGroupDN (LDAP_SCHEMALEVEL 2 in option.dat), and
domain status (inetDomainStatus, mailDomainStatus).  The data: mmproxy/testing/directory.py."""
import re
import time

import pytest

from mmproxy import imap, pop
from mmproxy.testing.directory import SCHEMA2_BASE
from mmproxy.testing.proxy import Proxy

from helpers import ImapFrom, PopFrom, RawClient, proxy_log, wait_for_log

OPTION_DAT_V2 = "! MTA options (Messaging Server option.dat)\nldap_schemalevel = 2\n"


@pytest.fixture(scope="module")
def dc_proxy(mail_stack):
    with Proxy(mail_stack.info(), pop={}) as p:
        yield p


@pytest.fixture(scope="module")
def v2_proxy(mail_stack):
    with Proxy(mail_stack.info(), imap={"UserGroupDN": SCHEMA2_BASE}, pop={"UserGroupDN": SCHEMA2_BASE},
               option_dat=OPTION_DAT_V2) as p:
        yield p


def imap_welcome(p, login, password, source="127.0.0.41"):
    """Log in with imaplib and read the subject of the INBOX's first message."""
    c = ImapFrom(p.host, p.imap_port, source=source)
    try:
        typ, _ = c.login(login, password)
        assert typ == "OK"
        c.select("INBOX")
        typ, data = c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return data[0][1].decode().strip()
    finally:
        c.logout()


def pop_welcome(p, login, password, source="127.0.0.41"):
    c = PopFrom(p.host, p.pop_port, source=source)
    try:
        c.user(login)
        assert c.pass_(password).startswith(b"+OK")
        return next(line.decode() for line in c.retr(1)[1] if line.startswith(b"Subject:"))
    finally:
        c.quit()


def imap_reply(p, login, password, source="127.0.0.42"):
    """The tagged reply to a LOGIN (quoted strings)."""
    r = RawClient(p.host, p.imap_port, source=source)
    r.expect(b"* OK")
    r.send(b'a LOGIN "%s" "%s"\r\n' % (login.encode(), password.encode()))
    return r.skip_to(b"a ")


def pop_replies(p, login, password, source="127.0.0.42"):
    r = RawClient(p.host, p.pop_port, source=source)
    r.expect(b"+OK")
    r.send(b"USER %s\r\nPASS %s\r\n" % (login.encode(), password.encode()))
    return r.readline(), r.readline()


def searches(mail_stack, base, scope):
    """How many searches slapd logged with this base and scope (0 base, 2 subtree)."""
    return len(re.findall(r'SRCH base="%s" scope=%d ' % (re.escape(base), scope), mail_stack.slapd.read_log()))


# -- DC tree: aliases ---------------------------------------------------------------------------

def test_alias_domain_logs_in_as_its_canonical_domain(mail_stack, dc_proxy):
    """carol@example.info: example.info's DC node is an alias of example.org's; the user is found in
    example.org and replayed as %U@%V = carol@example.org (the canonical domain), over IMAP and POP."""
    assert imap_welcome(dc_proxy, "carol@example.info", "carol pw") == "Subject: Welcome carol@example.org on 127.0.0.3"
    assert pop_welcome(dc_proxy, "carol@example.info", "carol pw") == "Subject: Welcome carol@example.org on 127.0.0.3"
    log = wait_for_log(dc_proxy, "login user=carol@example.org store=127.0.0.3")
    assert "carol@example.info" not in log.split("login user=carol@example.org")[0].rsplit("\n", 1)[-1]


def test_alias_costs_one_search_more_once(mail_stack):
    """One search for the alias node, one for the node it names, one for the user: then the cache."""
    info = mail_stack.info()
    alias, org = info["domains"]["example.info"]["dn"], info["domains"]["example.org"]["dn"]
    before = (searches(mail_stack, alias, 0), searches(mail_stack, org, 0), searches(mail_stack, org, 2))
    with Proxy(info) as p:
        for _ in range(3):
            assert imap_welcome(p, "dave@example.info", "dave-pw") == "Subject: Welcome dave@example.org on 127.0.0.2"
    time.sleep(0.2)
    after = (searches(mail_stack, alias, 0), searches(mail_stack, org, 0), searches(mail_stack, org, 2))
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1]


def test_alias_of_an_alias_is_refused_as_a_wrong_password(dc_proxy):
    """chain.example names example.info, itself an alias: one hop only, as Messaging Server."""
    assert imap_reply(dc_proxy, "carol@chain.example", "carol pw") == b"a " + imap.NO_AUTH.encode() + b"\r\n"
    assert pop_replies(dc_proxy, "carol@chain.example", "carol pw") == (b"+OK\r\n", pop.ERR_AUTH.encode() + b"\r\n")
    log = wait_for_log(dc_proxy, "another alias: one hop only; refusing chain.example")
    assert "unknown domain 'chain.example'" in log and "Traceback" not in log


def test_index_node_with_canonical_name(dc_proxy):
    """example.biz: its own DC node (inetDomainBaseDN o=example.com, inetCanonicalDomainName
    example.com): example.com's users log in through it, in the canonical domain."""
    assert imap_welcome(dc_proxy, "alice@example.biz", "alice-pw") == "Subject: Welcome alice on 127.0.0.2"
    assert pop_welcome(dc_proxy, "bob@example.biz", 'b"o b\\pw') == "Subject: Welcome bob on 127.0.0.3"
    wait_for_log(dc_proxy, "login user=alice@example.com store=127.0.0.2")


def test_unknown_domain_is_a_wrong_password(dc_proxy):
    assert imap_reply(dc_proxy, "alice@nowhere.example", "alice-pw") == b"a " + imap.NO_AUTH.encode() + b"\r\n"
    # a Schema 2 domain is no domain in the DC tree
    assert imap_reply(dc_proxy, "nora@example.net", "nora-pw") == b"a " + imap.NO_AUTH.encode() + b"\r\n"


# -- domain status ------------------------------------------------------------------------------

def test_inactive_domain_is_refused_as_a_wrong_password(mail_stack, dc_proxy):
    """closed.example has inetDomainStatus inactive: its users get the bad-credentials answer."""
    store = mail_stack.stores["127.0.0.2"]
    before = store.read_log().count("paul@closed.example")
    assert imap_reply(dc_proxy, "paul@closed.example", "paul-pw") == b"a " + imap.NO_AUTH.encode() + b"\r\n"
    assert pop_replies(dc_proxy, "paul@closed.example", "paul-pw") == (b"+OK\r\n", pop.ERR_AUTH.encode() + b"\r\n")
    log = wait_for_log(dc_proxy, "uid=paul,dc=closed,dc=example,o=internet is inactive")
    assert "login failed user='paul@closed.example': account disabled" in log
    time.sleep(0.2)
    assert store.read_log().count("paul@closed.example") == before        # never sent to the store


def test_domain_on_hold_is_a_temporary_failure(dc_proxy):
    """held.example has mailDomainStatus hold: the right password gets the temporary failure, a
    wrong one the bad-credentials answer (PreAuth checks the password first)."""
    assert imap_reply(dc_proxy, "quinn@held.example", "quinn-pw") == b"a " + imap.NO_TEMP.encode() + b"\r\n"
    assert imap_reply(dc_proxy, "quinn@held.example", "wrong") == b"a " + imap.NO_AUTH.encode() + b"\r\n"
    assert pop_replies(dc_proxy, "quinn@held.example", "quinn-pw") == (b"+OK\r\n", pop.ERR_TEMP.encode() + b"\r\n")
    log = wait_for_log(dc_proxy, "uid=quinn,dc=held,dc=example,o=internet is on hold")
    assert "Traceback" not in log


# -- Schema 2 ------------------------------------------------------------------------------------

def test_schema2_domain_and_its_associated_domains(v2_proxy):
    """LDAP_SCHEMALEVEL=2: example.net is the organisation o=example.net,o=v2,o=internet
    (sunPreferredDomain example.net; associatedDomain also mail.example.net and example.edu), its
    users below it; every name logs in to the canonical domain's mailbox (%U@%V, %V = example.net)."""
    assert imap_welcome(v2_proxy, "nora@example.net", "nora-pw") == "Subject: Welcome nora@example.net on 127.0.0.2"
    otto = "Subject: Welcome otto@example.net on 127.0.0.3"
    assert imap_welcome(v2_proxy, "otto@mail.example.net", "otto-pw") == otto
    assert pop_welcome(v2_proxy, "nora@example.edu", "nora-pw") == "Subject: Welcome nora@example.net on 127.0.0.2"
    assert pop_welcome(v2_proxy, "otto@example.net", "otto-pw") == otto
    wait_for_log(v2_proxy, "login user=nora@example.net store=127.0.0.2")


def test_schema2_costs_one_search_per_domain_and_user(mail_stack):
    """The organisation is found by one subtree search under UserGroupDN, then cached."""
    info = mail_stack.info()
    org = info["domains"]["example.net"]["dn"]
    before = (searches(mail_stack, SCHEMA2_BASE, 2), searches(mail_stack, org, 2))
    with Proxy(info, imap={"UserGroupDN": SCHEMA2_BASE}, option_dat="LDAP_SCHEMALEVEL=2\n") as p:
        for _ in range(3):
            assert imap_welcome(p, "nora@example.edu", "nora-pw") == "Subject: Welcome nora@example.net on 127.0.0.2"
    time.sleep(0.2)
    after = (searches(mail_stack, SCHEMA2_BASE, 2), searches(mail_stack, org, 2))
    assert [a - b for a, b in zip(after, before)] == [1, 1]


def test_schema2_refuses_unknown_domains_and_wrong_passwords_alike(v2_proxy):
    no = b"a " + imap.NO_AUTH.encode() + b"\r\n"
    assert imap_reply(v2_proxy, "nora@example.net", "wrong") == no
    assert imap_reply(v2_proxy, "nora@nowhere.example", "nora-pw") == no
    assert imap_reply(v2_proxy, "alice@example.com", "alice-pw") == no       # a DC-tree domain: not in Schema 2
    assert pop_replies(v2_proxy, "nora@nowhere.example", "nora-pw") == (b"+OK\r\n", pop.ERR_AUTH.encode() + b"\r\n")
    wait_for_log(v2_proxy, "unknown domain 'nowhere.example'")
    # two organisations claim shared.example: neither is it
    assert imap_reply(v2_proxy, "nora@shared.example", "nora-pw") == no
    wait_for_log(v2_proxy, "more than one organisation under o=v2,o=internet is domain shared.example; refusing it")
    assert "Traceback" not in proxy_log(v2_proxy)
