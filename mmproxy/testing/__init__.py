"""Real-server test fixtures: a private slapd, Dovecot stores and Postfix on loopback.

Used by tests/conftest.py and bench/. Standard library and python-ldap only; works in a plain
process and in a gevent-monkey-patched one. Of mmproxy it imports only the table of service kinds
(mmproxy.config.kinds, standard library only).
Every daemon runs in the foreground in its own process group inside a temp dir, binds only
127.0.0.0/8, and is stopped by pid (SIGTERM, then SIGKILL of its group). A missing binary
raises MissingBinary with the apt install hint.

    from mmproxy.testing import MailStack
    with MailStack() as st:
        info = st.info()          # ldap url/bind dn/pw, store ports, users with passwords
        alice = info["users"]["alice"]   # password, mailhost, store_login, dn, ...
        latin = info["users"]["latin"]
        octets = latin["password"].encode(latin["password_charset"])   # b"p\\xe4sswort"

    python -m mmproxy.testing up [--keep] [--users N]     # the same stack, for manual work

API
    free_port(*hosts)                 port free on all the addresses (default 127.0.0.1)
    Slapd(directory=None, host=, port=, workdir=, loglevel="stats", keep=)
        .start() .stop() .restart() .close(), context manager; .url .host .port .log_file
        .read_log() .connect("proxy"|"root"|"anonymous"|(dn, pw)) -> python-ldap object
        .ldapmodify(ldif) .add(ldif) .delete(*dns)  (as the root DN)
    DovecotStore(ip, port_imap, port_pop3, users, port_lmtp=None, aliases=None, workdir=,
                 mail_root=, large_bytes=0, auth_failure_delay=0, auth_penalty=False,
                 extra_conf="", keep=)
        same lifecycle; .log_file .read_log() .add_user(login, pw) .add_alias(addr, login)
        .home(login)
    Postfix(host="127.0.0.1", port=None, mynetworks="127.0.0.0/8", xclient_hosts="127.0.0.0/8",
            relay_domains=("example.com", "example.org"), transports=None, main_cf=None, workdir=, keep=)
        same lifecycle; .host .port .log_file .read_log() .sink_file .messages()
        .wait_for_messages(n, timeout) .flush()
    MailStack(users=10, directory=None, store_ips=("127.0.0.2", "127.0.0.3"), workdir=,
              keep=False, large_bytes=0, lmtp=True, slapd_loglevel="stats", store_conf="",
              postfix=False, postfix_options=None)
        .start() .stop() context manager .info() .user(name) .transports() .slapd .stores[ip]
        .postfix .imap_port .pop3_port .lmtp_port .ldap_url .directory
    Proxy(info, imap=None, pop=None, smtp=None, aservice=None, tls=None, option_dat=None, ...)
        (mmproxy.testing.proxy) mmproxy started as operators do over a legacy config tree
    DelayProxy(target_host, target_port, listen_host="127.0.0.1", delay=0.0)
        .start() .stop() context manager .port .url; .delay may change at any time
    default_directory(n_users=10) -> Directory; welcome_subject(login, ip); ssha(pw: str | bytes)

Directory (LDAP, suffix o=internet)
    cn=Manager,o=internet / rootsecret      root DN (not an entry)
    cn=mmproxy,o=internet / proxysecret     the proxy's bind DN; only it and the user itself
                                            read userPassword; anonymous may bind
    The sunms.schema attributes are Sun's names under a documentation OID arc (not Sun's OIDs).

Default data model: default_directory(n_users=10)
    dc=com,o=internet                    objectClass domain
    dc=example,dc=com,o=internet         domain inetDomain mailDomain;
                                         inetDomainBaseDN: o=example.com,o=internet;
                                         inetDomainStatus: active; NO proxy overrides
      users under ou=People,o=example.com,o=internet, replayed to the store as the bare uid:
        alice   mailHost 127.0.0.2   password  alice-pw
        bob     mailHost 127.0.0.3   password  b"o b\\pw   (a quote, a space, a backslash)
        erin    mailHost 127.0.0.2   password  erin-pw   mailAlternateAddress: erin@alias.example.com
        frank   NO mailHost          password  frank-pw  (in no store)
        latin   mailHost 127.0.0.2   password  the ISO-8859-1 octets b"p\\xe4sswort" ("pässwort"),
                                     NOT valid UTF-8; the UTF-8 of "pässwort" is a wrong password
        gina    mailHost 127.0.0.2   password  gina-pw   mailAllowedServiceAccess: +imap:ALL EXCEPT 127.0.0.22
                                     (IMAP from anywhere but 127.0.0.22; nothing else)
        hank    mailHost 127.0.0.2   password  hank-pw   mailAllowedServiceAccess: +imap:ALL$+popx:ALL
                                     (a value that does not parse: popx)
        ivan    mailHost 127.0.0.2   password  ivan-pw   inetUserStatus: inactive
        judy    mailHost 127.0.0.2   password  judy-pw   mailUserStatus: hold
        kurt    mailHost 127.0.0.2   password  kurt-pw   inetUserStatus: Active; mailUserStatus: overquota
        user1..userN  odd k on 127.0.0.2, even k on 127.0.0.3, password pw-userK
    dc=org,o=internet                    objectClass domain
    dc=example,dc=org,o=internet         domain inetDomain mailDomain; inetDomainStatus: active;
                                         NO inetDomainBaseDN: users directly below the DC node;
                                         mailAccessProxyReplay: %U@%V; mailAccessProxyPreAuth: yes
      users uid=<uid>,dc=example,dc=org,o=internet, replayed as uid@example.org:
        carol   mailHost 127.0.0.3   password  carol pw     (store login carol@example.org)
        dave    mailHost 127.0.0.2   password  dave-pw      (store login dave@example.org)
    dc=example,dc=info,o=internet        objectClass alias inetDomainAlias; aliasedObjectName:
                                         dc=example,dc=org,o=internet (a DC-tree domain alias)
    dc=chain,dc=example,o=internet       alias of dc=example,dc=info (an alias of an alias: refused)
    dc=example,dc=biz,o=internet         an index node: inetDomainBaseDN o=example.com,o=internet,
                                         inetCanonicalDomainName example.com (example.com's users)
    dc=closed,dc=example,o=internet      inetDomainStatus: inactive; mailAccessProxyReplay %U@%V
        paul    mailHost 127.0.0.2   password  paul-pw   (store login paul@closed.example)
    dc=held,dc=example,o=internet        mailDomainStatus: hold; mailAccessProxyReplay %U@%V
        quinn   mailHost 127.0.0.2   password  quinn-pw  (store login quinn@held.example)
    o=example.net,o=v2,o=internet        Schema 2 (native mode) organisation, no DC node: objectClass
                                         organization sunManagedOrganization mailDomain;
                                         sunPreferredDomain example.net; associatedDomain example.net,
                                         mail.example.net, example.edu, shared.example;
                                         mailAccessProxyReplay %U@%V;
                                         UserGroupDN o=v2,o=internet (SCHEMA2_BASE) with
                                         LDAP_SCHEMALEVEL=2 in option.dat (Proxy(option_dat=...))
      users under ou=People,o=example.net,o=v2,o=internet, replayed as uid@example.net:
        nora    mailHost 127.0.0.2   password  nora-pw
        otto    mailHost 127.0.0.3   password  otto-pw
    o=other.example,o=v2,o=internet      Schema 2 organisation, no users; associatedDomain
                                         shared.example as well (two organisations: refused)
    Every user: objectClass top person organizationalPerson inetOrgPerson inetUser mailUser;
    uid, cn, sn, mail (uid@domain), userPassword ({SSHA}), mailHost, inetUserStatus active,
    mailUserStatus active, mailDeliveryOption mailbox.

Passwords: a user's info() entry has `password` (always a str) and `password_charset`, and the
exact octets a client sends are password.encode(password_charset). password_charset is "utf-8"
for every user but latin ("iso-8859-1": password "pässwort", octets b"p\\xe4sswort"). Both
{SSHA} hashes, slapd's userPassword and the store's passwd-file, are over those octets, so an
LDAP simple bind and an IMAP/POP3 login succeed with exactly them. Dovecot (2.3) takes them in an
IMAP quoted string, a literal (also LITERAL+), AUTHENTICATE PLAIN, POP3 PASS and AUTH PLAIN, but
refuses them in an IMAP atom ("BAD 8bit data in atom"). A test that a log does not show a
`password` str finds latin's only if it was decoded as ISO-8859-1: look for the octets too.

Stores
    Each store's passwd-file holds only its own users' store logins ({SSHA} over the password
    octets); a login on the wrong store fails. Every INBOX holds a message with Subject
    "Welcome <store login> on <ip>" (e.g. "Welcome carol@example.org on 127.0.0.3"), as UID 1.
    login_trusted_networks = 127.0.0.0/8, so an IMAP ID ("x-originating-ip" ...) or POP3 XCLIENT
    from loopback sets rip= in the store log. LMTP (same port on both stores) also accepts each
    user's mail address and mailAlternateAddress (userdb-only aliases: they cannot log in).
    Failed logins take about 0.5 s (auth_failure_delay 0) and Dovecot's per-IP auth penalty is
    off, so wrong-password tests do not slow later logins.

Postfix (MailStack(postfix=True), the session fixture has it)
    smtpd on 127.0.0.1:<free port>; relays for mynetworks 127.0.0.0/8 and to example.com /
    example.org; XCLIENT/XFORWARD from 127.0.0.0/8. Every user's address goes by LMTP to the
    user's store (so it shows up over IMAP); any other recipient, bounces too, lands in the sink
    mbox (postfix.messages()). Nothing is ever delivered off the machine.

MailStack.info() keys
    workdir; ldap {url host port suffix bind_dn bind_pw root_dn root_pw log};
    imap_port pop3_port lmtp_port; stores {ip: {ip imap pop3 lmtp log users}};
    smtp: None, or {host port mynetworks xclient_hosts relay_domains sink log};
    domains {name: {dn org_dn people_dn status attrs}};
    users {uid: {uid domain login password password_charset mailhost store_login dn mail attrs}}
"""
from .base import DaemonError, MissingBinary, free_port, ssha
from .delayproxy import DelayProxy
from .directory import (
    PROXY_DN,
    PROXY_PW,
    ROOT_DN,
    ROOT_PW,
    STORE_IPS,
    SUFFIX,
    Directory,
    Domain,
    User,
    default_directory,
)
from .dovecot import DovecotStore, welcome_subject
from .postfix import Postfix
from .slapd import Slapd
from .stack import MailStack

__all__ = [
    "DaemonError", "MissingBinary", "free_port", "ssha", "DelayProxy", "Directory", "Domain", "User",
    "default_directory", "DovecotStore", "welcome_subject", "Slapd", "MailStack", "Postfix",
    "PROXY_DN", "PROXY_PW", "ROOT_DN", "ROOT_PW", "STORE_IPS", "SUFFIX",
]
