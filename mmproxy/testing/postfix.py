"""A private Postfix (the SMTP relay behind mmproxy's SMTP proxy) on loopback."""
from __future__ import annotations

import mailbox
import os
import pwd
import subprocess
import time
from typing import Dict, Iterable, List, Optional

from .base import Daemon, _family, _proc_table, find_binary, free_port, listening, run, tail


class _Mbox(mailbox.mbox):
    """The sink mbox: its envelope ("From ") lines may hold UTF-8 (SMTPUTF8 senders), which the
    standard library reads as ASCII only."""

    def get_message(self, key: str) -> mailbox.mboxMessage:
        from_line, _, text = self.get_bytes(key, from_=True).partition(b"\n")
        msg = mailbox.mboxMessage(text)
        msg.set_from(from_line[5:].decode("utf-8", "replace"))
        return msg

DAEMON_DIR = "/usr/lib/postfix/sbin"


class Postfix(Daemon):
    """`postfix -c <tmp>/conf start-fg`: smtpd on host:port (default 127.0.0.1:<free port>).

    Relays for `mynetworks` (default 127.0.0.0/8) to anywhere and for anyone to
    `relay_domains`; XCLIENT and XFORWARD are allowed from `xclient_hosts` (default 127.0.0.0/8).
    Delivery never leaves the machine: `transports` {address or domain: "lmtp:[ip]:port"} route
    to the Dovecot stores' LMTP (MailStack does this for every user); everything else, bounces
    included, goes to the sink: an mbox file (`sink_file`, one copy per recipient, with
    Delivered-To and X-Original-To), read with `messages()` / `wait_for_messages()`. No chroot,
    no DNS, own queue and data directories; the log is `log_file`.
    """

    name = "postfix"
    stop_timeout = 10.0

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, *,
                 mynetworks: str = "127.0.0.0/8", xclient_hosts: str = "127.0.0.0/8",
                 relay_domains: Iterable[str] = ("example.com", "example.org"),
                 transports: Optional[Dict[str, str]] = None, main_cf: Optional[Dict[str, str]] = None,
                 workdir: Optional[str] = None, keep: bool = False) -> None:
        self.postfix = find_binary("postfix")
        find_binary("postconf")
        self.host = host
        self.port = port or free_port(host)
        self.mynetworks = mynetworks
        self.xclient_hosts = xclient_hosts
        self.relay_domains = list(relay_domains)
        self.transports = dict(transports or {})
        self.main_cf = dict(main_cf or {})
        super().__init__(workdir, keep)
        self.conf_dir = os.path.join(self.dir, "conf")

    @property
    def log_file(self) -> str:
        return os.path.join(self.dir, "postfix.log")

    @property
    def sink_file(self) -> str:
        return os.path.join(self.dir, "sink", "sink.mbox")

    def _env(self) -> dict:
        return dict(os.environ, MAIL_CONFIG=self.conf_dir)

    # -- mail that reached the sink --------------------------------------------------------------
    def messages(self) -> List[mailbox.mboxMessage]:
        """Every message delivered to the sink so far (email.message.Message subclasses)."""
        if not os.path.exists(self.sink_file):
            return []
        box = _Mbox(self.sink_file, create=False)
        try:
            return list(box)
        finally:
            box.close()

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> List[mailbox.mboxMessage]:
        """Poll until the sink holds at least `count` messages; raise TimeoutError with the log."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            if len(msgs) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if len(msgs) < count:
            raise TimeoutError("postfix sink has %d message(s), wanted %d\n%s" % (len(msgs), count,
                                                                                 tail(self.log_file)))
        return msgs

    def flush(self) -> None:
        """Retry deferred mail now (postqueue -f)."""
        run([self.postfix, "-c", self.conf_dir, "flush"], env=self._env())

    # -- daemon ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        pf = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam("nobody")
        for sub in ("conf", "queue", "data", "sink"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        os.chown(os.path.join(self.dir, "data"), pf.pw_uid, pf.pw_gid)
        # the pipe transport appends as nobody
        os.chown(os.path.join(self.dir, "sink"), nobody.pw_uid, nobody.pw_gid)
        with open(os.path.join(self.conf_dir, "transport"), "w") as f:
            f.write("".join("%s %s\n" % kv for kv in self.transports.items()))
        main = {
            "compatibility_level": "3.6",
            "queue_directory": os.path.join(self.dir, "queue"),
            "data_directory": os.path.join(self.dir, "data"),
            "command_directory": "/usr/sbin",
            "daemon_directory": DAEMON_DIR,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "relay.mmproxy.test",
            "mydomain": "mmproxy.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": self.mynetworks,
            "smtpd_authorized_xclient_hosts": self.xclient_hosts,
            "smtpd_authorized_xforward_hosts": self.xclient_hosts,
            "relay_domains": ", ".join(self.relay_domains),
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "transport_maps": "texthash:" + os.path.join(self.conf_dir, "transport"),
            # nothing ever leaves the machine: what no transport entry claims goes to the sink
            "default_transport": "sink",
            "relay_transport": "sink",
            "local_transport": "sink",
            "sink_destination_recipient_limit": "1",
            "smtp_dns_support_level": "disabled",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "maillog_file": self.log_file,
            "maillog_file_prefixes": self.dir,
            "syslog_name": "mmproxy-test-postfix",
            "queue_run_delay": "10s",
            "minimal_backoff_time": "10s",
            "maximal_backoff_time": "20s",
            "delay_warning_time": "0",
        }
        main.update(self.main_cf)
        with open(os.path.join(self.conf_dir, "main.cf"), "w") as f:
            f.write("# private Postfix for mmproxy tests (written by mmproxy.testing.postfix)\n")
            f.write("".join("%s = %s\n" % kv for kv in main.items()))
        with open(os.path.join(self.conf_dir, "master.cf"), "w") as f:
            f.write(self._master_cf())
        # Postfix rereads a config file while it is "hot" (changed within the last second), in
        # 0.3 s steps, in every command: backdate them, or each start pays 2+ s
        past = time.time() - 60
        for name in os.listdir(self.conf_dir):
            os.utime(os.path.join(self.conf_dir, name), (past, past))
        run([self.postfix, "-c", self.conf_dir, "check"], env=self._env())

    def _master_cf(self) -> str:
        # service type private unpriv chroot wakeup maxproc command: chroot n everywhere (the
        # queue is not under /var/spool/postfix); no smtp client: nothing may leave the machine
        rows = [
            ("%s:%d" % (self.host, self.port), "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            # smtpd's TLS (smtpd_tls_security_level via main_cf) needs its session cache and entropy
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
            # one process: the mbox appends never interleave
            ("sink", "unix", "-", "n", "n", "-", "1",
             "pipe flags=DFOR user=nobody argv=/bin/sh -c { cat >> %s }" % self.sink_file),
        ]
        return "".join("%-18s %-10s %-3s %-3s %-3s %-6s %-3s %s\n" % r for r in rows)

    def terminate(self) -> None:
        """`postfix stop`: the master (which left our process group with setsid()) stops its
        children and exits; stop() kills whatever is left."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self._family |= _family(self.proc.pid, _proc_table())
            subprocess.run([self.postfix, "-c", self.conf_dir, "stop"], env=self._env(),
                           capture_output=True)
            self._terminated = True

    def _argv(self) -> list:
        return [self.postfix, "-c", self.conf_dir, "start-fg"]

    def _ready(self) -> bool:
        return listening(self.host, self.port)

    def info(self) -> dict:
        return {"host": self.host, "port": self.port, "mynetworks": self.mynetworks,
                "xclient_hosts": self.xclient_hosts, "relay_domains": self.relay_domains,
                "sink": self.sink_file, "log": self.log_file}
