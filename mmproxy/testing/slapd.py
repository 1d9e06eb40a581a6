"""A private OpenLDAP slapd on loopback, seeded with the test directory."""
from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING, Optional, Tuple, Union

from .base import Daemon, find_binary, free_port, port_open, run
from .directory import PROXY_DN, PROXY_PW, ROOT_DN, ROOT_PW, SUFFIX, Directory, default_directory

if TYPE_CHECKING:
    from ldap.ldapobject import LDAPObject  # python-ldap has no type information: this is Any to mypy

SCHEMA_DIR = "/etc/ldap/schema"
SCHEMAS = ("core", "cosine", "inetorgperson", "nis", "misc")   # misc.schema defines mailHost
SUNMS_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sunms.schema")


class Slapd(Daemon):
    """slapd with an mdb database for `o=internet`, listening on ldap://127.0.0.1:<free port>.

    Seeded with slapadd before the first start (from `directory`, default `default_directory()`).
    ACL: userPassword is readable only by the proxy DN (cn=mmproxy,o=internet / proxysecret) and
    by the user itself, anonymous may bind (auth); everything else is readable by everyone.
    The root DN cn=Manager,o=internet / rootsecret changes data (`ldapmodify`, `add`, `delete`).
    slapd's own log (`-d <loglevel>`, default "stats": one line per connection/operation) is
    `log_file`.
    """

    name = "slapd"

    suffix = SUFFIX
    root_dn, root_pw = ROOT_DN, ROOT_PW
    bind_dn, bind_pw = PROXY_DN, PROXY_PW

    def __init__(self, directory: Optional[Directory] = None, *, host: str = "127.0.0.1",
                 port: Optional[int] = None, workdir: Optional[str] = None, loglevel: str = "stats",
                 keep: bool = False, tls: Optional[Tuple[str, str, str]] = None,
                 require_tls: bool = False) -> None:
        self.slapd = find_binary("slapd")
        self.slapadd = find_binary("slapadd")
        self.directory = directory if directory is not None else default_directory()
        self.host = host
        self.port = port or free_port(host)
        self.loglevel = loglevel
        self.tls = tls                    # (certificate, key, CA) PEM paths: StartTLS, and ldaps:// on ldaps_port
        self.ldaps_port = free_port(host) if tls else 0
        self.require_tls = require_tls    # `security tls=1`: nothing but StartTLS before TLS
        super().__init__(workdir, keep)
        self.conf = os.path.join(self.dir, "slapd.conf")

    @property
    def url(self) -> str:
        return "ldap://%s:%d" % (self.host, self.port)

    @property
    def ldaps_url(self) -> str:
        return "ldaps://%s:%d" % (self.host, self.ldaps_port)

    def _prepare(self) -> None:
        db = os.path.join(self.dir, "db")
        os.makedirs(db, exist_ok=True)
        includes = "".join("include %s/%s.schema\n" % (SCHEMA_DIR, s) for s in SCHEMAS)
        tls = ""
        if self.tls:
            cert, key, ca = self.tls
            tls = "TLSCertificateFile %s\nTLSCertificateKeyFile %s\nTLSCACertificateFile %s\n" % (cert, key, ca)
            if self.require_tls:
                tls += "security tls=1\n"
        with open(self.conf, "w") as f:
            f.write(f"""# private slapd for mmproxy tests (written by mmproxy.testing.slapd)
{includes}include {SUNMS_SCHEMA}
pidfile {self.dir}/slapd.pid
argsfile {self.dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit unlimited
threads 4
{tls}
database mdb
suffix "{self.suffix}"
rootdn "{self.root_dn}"
rootpw {self.root_pw}
directory {db}
maxsize 268435456
index objectClass eq
index uid eq,sub
index mail eq
index mailHost eq
index mailAlternateAddress eq
index dc eq
access to attrs=userPassword
  by dn.exact="{PROXY_DN}" read
  by self read
  by anonymous auth
  by * none
access to *
  by * read
""")
        ldif = os.path.join(self.dir, "seed.ldif")
        with open(ldif, "w") as f:
            f.write(self.directory.ldif())
        run([self.slapadd, "-q", "-f", self.conf, "-l", ldif])

    def _argv(self) -> list:
        urls = "ldap://%s:%d/" % (self.host, self.port) + (" %s/" % self.ldaps_url if self.tls else "")
        return [self.slapd, "-d", self.loglevel, "-f", self.conf, "-h", urls]

    def _ready(self) -> bool:
        if not port_open(self.host, self.port):
            return False
        import ldap
        try:
            conn = self.connect("root")
            try:
                return bool(conn.whoami_s())
            finally:
                conn.unbind_s()
        except ldap.LDAPError:             # up, but not answering yet
            return False

    # -- clients -----------------------------------------------------------------------------
    def connect(self, who: Union[str, Tuple[str, str]] = "proxy", timeout: float = 5.0) -> LDAPObject:
        """A python-ldap connection bound as 'proxy', 'root', 'anonymous' or as a (dn, password)."""
        import ldap  # python-ldap; imported late so `python -m mmproxy.testing --help` works without it

        conn = ldap.initialize(self.url)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, timeout)
        conn.set_option(ldap.OPT_TIMEOUT, timeout)
        conn.set_option(ldap.OPT_REFERRALS, 0)
        if self.require_tls:
            assert self.tls is not None
            conn.set_option(ldap.OPT_X_TLS_CACERTFILE, self.tls[2])
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
            conn.start_tls_s()
        if who == "proxy":
            conn.simple_bind_s(self.bind_dn, self.bind_pw)
        elif who == "root":
            conn.simple_bind_s(self.root_dn, self.root_pw)
        elif isinstance(who, tuple):
            dn, pw = who
            conn.simple_bind_s(dn, pw)
        elif who != "anonymous":
            raise ValueError("who: 'proxy', 'root', 'anonymous' or (dn, password), not %r" % who)
        return conn

    def ldapmodify(self, ldif: str, add: bool = False) -> str:
        """Apply LDIF change records (changetype: add/modify/delete/modrdn) as the root DN."""
        argv = [find_binary("ldapmodify"), "-x", "-H", self.url, "-D", self.root_dn, "-w", self.root_pw]
        if add:
            argv.append("-a")
        r = subprocess.run(argv, input=ldif, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("ldapmodify failed (rc=%s): %s\n--- ldif ---\n%s" % (r.returncode,
                                                                                 r.stderr.strip(), ldif))
        return r.stdout

    def add(self, ldif: str) -> str:
        """Add the entries in `ldif` (content records, no changetype needed) as the root DN."""
        return self.ldapmodify(ldif, add=True)

    def delete(self, *dns: str) -> str:
        return self.ldapmodify("".join("dn: %s\nchangetype: delete\n\n" % dn for dn in dns))

    def info(self) -> dict:
        return {"url": self.url, "host": self.host, "port": self.port, "suffix": self.suffix,
                "bind_dn": self.bind_dn, "bind_pw": self.bind_pw, "root_dn": self.root_dn,
                "root_pw": self.root_pw, "log": self.log_file}
