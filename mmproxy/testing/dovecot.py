"""A private Dovecot mail store (IMAP, POP3 and LMTP) on one loopback address."""
from __future__ import annotations

import base64
import grp
import os
import pwd
import time
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

from .base import Daemon, find_binary, listening, run, ssha

DOVECOT_LIBEXEC = "/usr/lib/dovecot"
Password = Union[str, bytes]      # a str is UTF-8; bytes are the exact octets (any charset)


def welcome_subject(login: str, ip: str) -> str:
    """Subject of the first message in every INBOX: proves which store a session reached."""
    return "Welcome %s on %s" % (login, ip)


class DovecotStore(Daemon):
    """`dovecot -F -c <tmp>/dovecot.conf` listening on `ip` only.

    users: {login: password} (or (login, password) pairs): the ONLY logins this store accepts
    (passdb passwd-file, {SSHA}), so a login routed to the wrong store fails. A str password is
    hashed as UTF-8, bytes as they are (b"p\\xe4sswort": Dovecot checks the raw octets).
    Logins are kept as given, lower-cased (auth_username_format = %Lu): 'carol@example.org'
    stays 'carol@example.org'.
    Each INBOX (maildir, home <mail_root>/<ip>/<login>, owned by nobody:nogroup) holds a message
    with Subject `Welcome <login> on <ip>`, and, when large_bytes > 0, a second message
    `Large message` of about that size (one file per store, hard-linked into every INBOX).
    login_trusted_networks = 127.0.0.0/8: the IMAP ID x-originating-ip/-port and POP3 XCLIENT
    of a proxy on loopback are honoured, so the login lines in `log_file` show the real client
    as rip=. `extra_conf` is appended to the generated configuration.

    TLS: with `ssl_cert`/`ssl_key` (PEM paths) the store offers STARTTLS/STLS and, when
    `port_imaps`/`port_pop3s` are given, implicit TLS there (Dovecot logs `TLS` in the login
    line of such a session). `master_users`: {login: password} of master users (a master passdb):
    SASL PLAIN with authzid=<user>, authcid=<master>, the master's password logs in as <user>.

    aliases: {address: login}: further names that reach a login's mailbox by LMTP only (e.g.
    'alice@example.com' -> 'alice'); they are userdb entries, not passdb ones, so they cannot
    log in over IMAP or POP3.

    Speed: Dovecot delays a failed login by auth_failure_delay (default here 0; Dovecot's own
    default is 2 s, and a failure still takes about 0.5 s) and, unless auth_penalty=True, its
    per-IP auth penalty (up to 15 s, growing with each failure from one address, trusted
    networks included in 2.3) is off, so one wrong-password test does not slow all later
    logins from 127.0.0.1.
    """

    name = "dovecot"

    def __init__(self, ip: str, port_imap: int, port_pop3: int,
                 users: Union[Mapping[str, Password], Iterable[Tuple[str, Password]]] = (), *,
                 port_lmtp: Optional[int] = None, workdir: Optional[str] = None,
                 aliases: Optional[Dict[str, str]] = None,
                 mail_root: Optional[str] = None, large_bytes: int = 0,
                 auth_failure_delay: float = 0, auth_penalty: bool = False, extra_conf: str = "",
                 port_imaps: int = 0, port_pop3s: int = 0, ssl_cert: Optional[str] = None,
                 ssl_key: Optional[str] = None, master_users: Optional[Dict[str, Password]] = None,
                 keep: bool = False) -> None:
        self.dovecot = find_binary("dovecot")
        self.doveconf = find_binary("doveconf")
        for proto, port in (("imap", port_imap), ("pop3", port_pop3), ("lmtp", port_lmtp)):
            if port:
                find_binary(os.path.join(DOVECOT_LIBEXEC, proto))
        self.ip = ip
        self.port_imap = port_imap
        self.port_pop3 = port_pop3
        self.port_lmtp = port_lmtp
        self.port_imaps, self.port_pop3s = (port_imaps, port_pop3s) if ssl_cert else (0, 0)
        self.ssl_cert, self.ssl_key = ssl_cert, ssl_key
        self.master_users: Dict[str, Password] = dict(master_users or {})
        self.users: Dict[str, Password] = dict(users.items() if isinstance(users, dict) else users)
        self.aliases: Dict[str, str] = dict(aliases or {})
        self.large_bytes = int(large_bytes)
        self.extra_conf = extra_conf
        self.auth_failure_delay = auth_failure_delay
        self.auth_penalty = auth_penalty
        super().__init__(workdir, keep)
        self.mail_root = mail_root or os.path.join(self.dir, "mail")
        self.conf = os.path.join(self.dir, "dovecot.conf")
        self.passwd = os.path.join(self.dir, "passwd")
        self.userdb = os.path.join(self.dir, "userdb")
        self.masters = os.path.join(self.dir, "masters")
        # unique per process and store, so it never clashes with the system's or another test's
        self.instance_name = "mmproxy-test-%d-%s-%d" % (os.getpid(), ip, port_imap)

    @property
    def log_file(self) -> str:
        """Dovecot's log (log_path): logins, with user=<...> rip=... lip=..."""
        return os.path.join(self.dir, "dovecot.log")

    def home(self, login: str) -> str:
        return os.path.join(self.mail_root, self.ip, login.lower())

    # -- users and mailboxes -----------------------------------------------------------------
    def add_user(self, login: str, password: Password) -> None:
        """Add a login (and its INBOX) to this store, also while Dovecot runs.

        Dovecot checks the passwd-file for changes at most once per second (of its clock), so
        when running this returns only after the next second has begun: the next login then
        sees the new user."""
        self.users[login] = password
        self._make_mailbox(login)
        with open(self.passwd, "a") as f:
            f.write(self._passwd_line(login, password))
        with open(self.userdb, "a") as f:
            f.write(self._userdb_line(login, login))
        if self.running:
            time.sleep(1.02 - time.time() % 1)

    def add_alias(self, address: str, login: str) -> None:
        """Let LMTP deliver `address` into `login`'s INBOX (same timing rule as add_user)."""
        self.aliases[address] = login
        with open(self.userdb, "a") as f:
            f.write(self._userdb_line(address, login))
        if self.running:
            time.sleep(1.02 - time.time() % 1)

    @staticmethod
    def _passwd_line(login: str, password: Password) -> str:
        return "%s:%s\n" % (login.lower(), ssha(password))

    def _userdb_line(self, name: str, login: str) -> str:
        # user:password:uid:gid:gecos:home:shell:extra fields; user= renames an alias to its login
        nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
        extra = "user=%s" % login.lower() if name.lower() != login.lower() else ""
        return "%s::%d:%d::%s::%s\n" % (name.lower(), nobody, nogroup, self.home(login), extra)

    def _make_mailbox(self, login: str) -> None:
        nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
        home = self.home(login)
        md = os.path.join(home, "Maildir")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(md, sub), exist_ok=True)
        msgs: list = [self._welcome(login)]
        if self.large_bytes > 0:
            msgs.append(self._large_file())
        t0 = int(time.time())
        uidlist = []
        for i, data in enumerate(msgs):
            size = os.path.getsize(data) if isinstance(data, str) else len(data)
            # CRLF on disk and S=/W= in the name: the sizes Dovecot reports need no recount
            base = "%d.M%dP%d.mmproxy-test,S=%d,W=%d" % (t0, i + 1, os.getpid(), size, size)
            path = os.path.join(md, "cur", base + ":2,")
            if isinstance(data, str):
                os.link(data, path)           # one copy on disk, however many mailboxes
            else:
                with open(path, "wb") as f:
                    f.write(data)
                os.chown(path, nobody, nogroup)
            uidlist.append("%d :%s\n" % (i + 1, base))
        # fix the UIDs (welcome = UID 1) even if LMTP delivers before the first IMAP/POP3 login
        path = os.path.join(md, "dovecot-uidlist")
        with open(path, "w") as f:
            f.write("3 V%d N%d\n" % (t0, len(msgs) + 1) + "".join(uidlist))
        os.chown(path, nobody, nogroup)
        for d in (os.path.join(self.mail_root, self.ip), home, md, md + "/cur", md + "/new", md + "/tmp"):
            os.chown(d, nobody, nogroup)

    def _welcome(self, login: str) -> bytes:
        return ("From: postmaster@example.com\r\nTo: %s\r\nSubject: %s\r\n"
                "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <welcome.%s.%s@mmproxy.test>\r\n"
                "\r\nHello %s,\r\nthis mailbox lives on the store at %s.\r\n"
                % (login, welcome_subject(login, self.ip), login.replace("@", "."), self.ip, login, self.ip)
                ).encode("utf-8")

    def _large_file(self) -> str:
        """The large message, written once per store and hard-linked into every INBOX."""
        path = os.path.join(self.mail_root, "large-message-%s" % self.ip)
        if not os.path.exists(path):
            hdr = ("From: postmaster@example.com\r\nTo: users@example.com\r\nSubject: Large message\r\n"
                   "Date: Tue, 14 Nov 2023 22:14:00 +0000\r\nMessage-ID: <large.%s@mmproxy.test>\r\n"
                   "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
                   "Content-Transfer-Encoding: base64\r\n\r\n" % self.ip).encode("utf-8")
            line = base64.b64encode(bytes(range(256)))[:76] + b"\r\n"
            os.makedirs(self.mail_root, exist_ok=True)
            with open(path, "wb") as f:
                f.write(hdr + line * max(1, (self.large_bytes - len(hdr)) // len(line)))
            os.chown(path, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        return path

    # -- daemon ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        for sub in ("run", "state"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        os.makedirs(os.path.join(self.mail_root, self.ip), exist_ok=True)
        for parent in (self.mail_root,):
            os.chmod(parent, 0o755)
        with open(self.passwd, "w") as f:
            f.writelines(self._passwd_line(login, pw) for login, pw in self.users.items())
        with open(self.userdb, "w") as f:
            f.writelines(self._userdb_line(login, login) for login in self.users)
            f.writelines(self._userdb_line(addr, login) for addr, login in self.aliases.items())
        for login in self.users:
            self._make_mailbox(login)
        with open(self.masters, "w") as f:
            f.writelines(self._passwd_line(login, pw) for login, pw in self.master_users.items())
        ssl, listener_ssl = "ssl = no", ""
        if self.ssl_cert:
            listener_ssl = "\n    ssl = yes"
            ssl = "ssl = yes\nssl_cert = <%s\nssl_key = <%s\nssl_min_protocol = TLSv1.2" % (self.ssl_cert, self.ssl_key)
        protocols = "imap pop3" + (" lmtp" if self.port_lmtp else "")
        lmtp = ""
        if self.port_lmtp:
            lmtp = f"""service lmtp {{
  inet_listener lmtp {{
    port = {self.port_lmtp}
  }}
}}
"""
        penalty = ""
        if not self.auth_penalty:
            # auth disables the penalty when it cannot connect to this socket (Dovecot's way)
            penalty = """service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""
        with open(self.conf, "w") as f:
            f.write(f"""# private Dovecot store for mmproxy tests (written by mmproxy.testing.dovecot)
instance_name = {self.instance_name}
base_dir = {self.dir}/run
state_dir = {self.dir}/state
log_path = {self.log_file}
protocols = {protocols}
listen = {self.ip}
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
# keep the login exactly as replayed (lower-cased): 'alice', 'carol@example.org'
auth_username_format = %Lu
auth_verbose = yes
auth_failure_delay = {self.auth_failure_delay:g} s
# the proxy is on loopback: honour its ID x-originating-ip / XCLIENT, log the real client as rip=
login_trusted_networks = 127.0.0.0/8
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
first_valid_uid = 1
# master users (SASL PLAIN authzid=<user> authcid=<master>): the user is then looked up in the userdb only
passdb {{
  driver = passwd-file
  master = yes
  args = scheme=SSHA {self.masters}
}}
passdb {{
  driver = passwd-file
  args = scheme=SSHA {self.passwd}
}}
# home <mail_root>/<ip>/<login>, uid nobody; LMTP-only aliases map to their login (user=)
userdb {{
  driver = passwd-file
  args = {self.userdb}
}}
service imap-login {{
  inet_listener imap {{
    port = {self.port_imap}
  }}
  inet_listener imaps {{
    port = {self.port_imaps}{listener_ssl}
  }}
  process_min_avail = 1
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.port_pop3}
  }}
  inet_listener pop3s {{
    port = {self.port_pop3s}{listener_ssl}
  }}
  process_min_avail = 1
}}
{lmtp}{penalty}{self.extra_conf}
""")
        run([self.doveconf, "-c", self.conf, "-n"])     # config errors surface here, with the message

    def _argv(self) -> list:
        return [self.dovecot, "-F", "-c", self.conf]

    def _ready(self) -> bool:
        ports = [self.port_imap, self.port_pop3] + [p for p in (self.port_lmtp, self.port_imaps, self.port_pop3s) if p]
        return all(listening(self.ip, p) for p in ports)

    def info(self) -> dict:
        return {"ip": self.ip, "imap": self.port_imap, "pop3": self.port_pop3, "lmtp": self.port_lmtp,
                "imaps": self.port_imaps or None, "pop3s": self.port_pop3s or None,
                "log": self.log_file, "users": sorted(self.users)}
