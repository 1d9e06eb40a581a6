"""MailStack: slapd + two Dovecot stores (+ optionally Postfix) on loopback, in one temp dir."""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional

from .base import free_port, make_tempdir
from .directory import STORE_IPS, Directory, default_directory
from .dovecot import DovecotStore
from .postfix import Postfix
from .slapd import Slapd

STORE_ADMIN, STORE_ADMIN_PW = "mmpstore", "mmpstore-pw"     # Dovecot master user of every store


def _ports(n: int, *hosts: str) -> list:
    """n distinct ports, each free on all `hosts`."""
    out: list = []
    while len(out) < n:
        p = free_port(*hosts)
        if p not in out:
            out.append(p)
    return out


class MailStack:
    """slapd (ldap://127.0.0.1:<port>) and one DovecotStore per address in store_ips
    (default 127.0.0.2 and 127.0.0.3), all stores on the SAME IMAP, POP3 and LMTP ports, as an
    MMP has one BacksidePort for all stores. Users live on the store their mailHost names.
    postfix=True adds a Postfix relay on 127.0.0.1 (`stack.postfix`) that delivers every user's
    address (and mailAlternateAddress) by LMTP into the user's store and everything else into
    its sink file; `postfix_options` go to Postfix() (mynetworks, xclient_hosts, main_cf, ...).

    users: how many numbered users (user1..userN) the default directory gets; or pass your own
    `directory`. large_bytes > 0 adds a message of about that size to every INBOX.
    tls=True (the default) gives every store a certificate from the stack's own CA (``stack.ca``, a
    certs.TestCA: it issues client certificates too), STARTTLS/STLS and implicit TLS on the SAME
    ``imaps_port``/``pop3s_port`` everywhere, and the master user STORE_ADMIN / STORE_ADMIN_PW.
    `stop()` stops everything and removes the temp dir unless keep=True; use
    `stack.slapd.restart()` / `stack.stores[ip].restart()` to bounce one part.
    """

    def __init__(self, users: int = 10, directory: Optional[Directory] = None, *,
                 store_ips: tuple = STORE_IPS, workdir: Optional[str] = None, keep: bool = False,
                 large_bytes: int = 0, lmtp: bool = True, slapd_loglevel: str = "stats",
                 store_conf: str = "", postfix: bool = False,
                 postfix_options: Optional[dict] = None, tls: bool = True) -> None:
        self.store_ips = tuple(store_ips)
        self.directory = directory if directory is not None else default_directory(users, self.store_ips)
        self.keep = keep
        self.large_bytes = large_bytes
        self.lmtp = lmtp
        self.slapd_loglevel = slapd_loglevel
        self.store_conf = store_conf
        self.with_postfix = postfix
        self.postfix_options = dict(postfix_options or {})
        self.postfix: Optional[Postfix] = None
        self._own_dir = workdir is None
        self.dir: Optional[str] = workdir
        self.slapd: Optional[Slapd] = None
        self.stores: Dict[str, DovecotStore] = {}
        self.imap_port = self.pop3_port = 0
        self.tls = tls
        self.imaps_port = self.pop3s_port = 0
        self.ca: Optional[Any] = None          # certs.TestCA when tls
        self.lmtp_port: Optional[int] = None

    @property
    def workdir(self) -> str:
        """The stack's directory (``workdir``, or the temp dir start() made)."""
        if self.dir is None:
            raise RuntimeError("MailStack is not started")
        return self.dir

    def __enter__(self) -> "MailStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "MailStack":
        if self.dir is None:
            self.dir = make_tempdir("mmproxy-stack-")
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        started = False
        try:
            self.slapd = Slapd(self.directory, workdir=os.path.join(self.dir, "ldap"),
                               loglevel=self.slapd_loglevel)
            ports = _ports(5, *self.store_ips)
            self.imap_port, self.pop3_port, self.imaps_port, self.pop3s_port = ports[:4]
            self.lmtp_port = ports[4] if self.lmtp else None
            cert = key = None
            if self.tls:
                from .certs import TestCA  # cryptography: only when asked for
                self.ca = TestCA(os.path.join(self.dir, "tls"), "mmproxy test store CA")
                cert, key = self.ca.issue("store", ips=self.store_ips, dns=("localhost",))
            else:
                self.imaps_port = self.pop3s_port = 0
            for ip in self.store_ips:
                self.stores[ip] = DovecotStore(
                    ip, self.imap_port, self.pop3_port, self.directory.store_users(ip),
                    aliases=self.directory.store_aliases(ip),
                    port_lmtp=self.lmtp_port, workdir=os.path.join(self.dir, "store-" + ip),
                    mail_root=os.path.join(self.dir, "mail"), large_bytes=self.large_bytes,
                    extra_conf=self.store_conf, port_imaps=self.imaps_port, port_pop3s=self.pop3s_port,
                    ssl_cert=cert, ssl_key=key, master_users={STORE_ADMIN: STORE_ADMIN_PW} if self.tls else None)
            daemons = [self.slapd, *self.stores.values()]
            if self.with_postfix:
                opts = dict(self.postfix_options)
                opts.setdefault("relay_domains", sorted(self.directory.domains))
                opts.setdefault("transports", self.transports())
                self.postfix = Postfix(workdir=os.path.join(self.dir, "postfix"), **opts)
                daemons.append(self.postfix)
            for d in daemons:          # start all, then wait: the daemons boot in parallel
                d.start(wait=False)
            for d in daemons:
                d.wait_ready()
            started = True
        finally:
            if not started:        # a part failed (or we were interrupted): stop what did start
                self.stop()
        return self

    def stop(self) -> None:
        daemons = [d for d in [self.postfix, *self.stores.values(), self.slapd] if d is not None]
        for d in daemons:          # SIGTERM to all first: they shut down in parallel
            d.terminate()
        for d in daemons:
            d.stop()
        if self.dir and self._own_dir and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- queries -----------------------------------------------------------------------------
    @property
    def ldap_url(self) -> str:
        assert self.slapd is not None
        return self.slapd.url

    def transports(self) -> Dict[str, str]:
        """Postfix transport map: each user's address and alternate addresses -> its store's LMTP."""
        if not self.lmtp_port:
            return {}
        out = {}
        for ip in self.store_ips:
            for addr in [*self.directory.store_aliases(ip), *self.directory.store_users(ip)]:
                if "@" in addr:
                    out[addr] = "lmtp:[%s]:%d" % (ip, self.lmtp_port)
        return out

    def user(self, name: str) -> dict:
        """A user's info() entry, by uid or uid@domain."""
        return self.directory.user(name).as_dict()

    def info(self) -> dict:
        """Everything a test or a human needs to connect (plain data, JSON-serialisable):

        workdir; ldap {url host port suffix bind_dn bind_pw root_dn root_pw log};
        imap_port pop3_port lmtp_port imaps_port pop3s_port (the same on every store; TLS ports None
        without tls); tls: None, or {ca store_admin store_admin_pw};
        stores {ip: {ip imap pop3 lmtp log users}};
        smtp (None without postfix) {host port mynetworks xclient_hosts relay_domains sink log};
        domains {name: {dn org_dn people_dn status attrs}};
        users {uid: {uid domain login password password_charset mailhost store_login dn mail attrs}}
        (a password's octets: password.encode(password_charset)).
        """
        assert self.slapd is not None
        return {
            "workdir": self.dir,
            "ldap": self.slapd.info(),
            "imap_port": self.imap_port,
            "pop3_port": self.pop3_port,
            "lmtp_port": self.lmtp_port,
            "imaps_port": self.imaps_port or None,
            "pop3s_port": self.pop3s_port or None,
            "tls": ({"ca": self.ca.path, "store_admin": STORE_ADMIN, "store_admin_pw": STORE_ADMIN_PW}
                    if self.ca else None),
            "stores": {ip: s.info() for ip, s in self.stores.items()},
            "smtp": self.postfix.info() if self.postfix else None,
            "domains": {d.name: {"dn": d.dn, "org_dn": d.org_dn, "people_dn": d.people_dn,
                                 "status": d.status, "attrs": {k: list(v) for k, v in d.attrs.items()}}
                        for d in self.directory.domains.values()},
            "users": {uid: u.as_dict() for uid, u in self.directory.users.items()},
        }
