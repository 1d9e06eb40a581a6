"""Run mmproxy as operators do: a legacy configuration tree and ``mmproxy start --foreground``.

Used by the end-to-end tests, the demo and the benchmark.  The tree looks like one migrated from a
Sun install (ServiceList naming /opt/SUNWmsgsr/lib/ImapProxyAService, ``default:Key value`` lines).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Literal, Optional, Union

from mmproxy.config.kinds import SERVICES

from .base import free_port, listening, make_tempdir, tail

LIBDIR = "/opt/SUNWmsgsr/lib"     # only the basename selects the service, as in the legacy product


def write_cfg(path: str, items: Dict[str, object], header: str = "") -> None:
    """A legacy file: ``default:Key value``, values with blanks double-quoted."""
    with open(path, "w") as f:
        f.write("# %s\n" % (header or os.path.basename(path)))
        for key, value in items.items():
            if value is None:
                continue
            v = "yes" if value is True else "no" if value is False else str(value)
            if not v or any(c in v for c in " \t#"):
                v = '"%s"' % v
            f.write("default:%s %s\n" % (key, v))




class Proxy:
    """An mmproxy subprocess over a config tree written for a MailStack's info().

    imap / pop / smtp: extra settings for that service's file (they override the defaults written
    here); None leaves the service out of ServiceList (IMAP is in unless imap=False).
    aservice: extra AService.cfg settings.  option_dat: the text of the MTA's option.dat beside
    the .cfg files (e.g. "LDAP_SCHEMALEVEL=2\n"), None for none.
    tls: (cert, key) PEM paths: STARTTLS and one implicit-TLS
    port per service.  Ports: ``ports[kind]`` and ``tls_ports[kind]`` on 127.0.0.1 (``imap_port``,
    ``imaps_port``, ``pop_port``, ... as shortcuts).
    """

    def __init__(self, info: dict, imap: Union[Dict[str, object], Literal[False], None] = None,
                 aservice: Optional[Dict[str, object]] = None, tls: Optional[tuple] = None,
                 workdir: Optional[str] = None, host: str = "127.0.0.1",
                 imap_port: int = 0, imaps_port: int = 0, pop: Optional[Dict[str, object]] = None,
                 smtp: Optional[Dict[str, object]] = None, keep: bool = False,
                 pop_port: int = 0, pops_port: int = 0, smtp_port: int = 0, smtps_port: int = 0,
                 option_dat: Optional[str] = None) -> None:
        self.info = info
        self.host = host
        self.own_dir = workdir is None and not keep      # a temp dir we made goes away at stop()
        self.dir = workdir or make_tempdir("mmproxy-proxy-")
        self.config_dir = os.path.join(self.dir, "config")
        self.log_dir = os.path.join(self.dir, "log")
        os.makedirs(self.config_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.settings: Dict[str, Dict[str, object]] = {}
        if imap is not False:
            self.settings["imap"] = dict(imap or {})
        if pop is not None:
            self.settings["pop"] = dict(pop)
        if smtp is not None:
            self.settings["smtp"] = dict(smtp)
        fixed = {"imap": (imap_port, imaps_port), "pop": (pop_port, pops_port), "smtp": (smtp_port, smtps_port)}
        self.ports = {k: fixed.get(k, (0, 0))[0] or free_port(host) for k in self.settings}
        self.tls_ports = {k: fixed.get(k, (0, 0))[1] or free_port(host) for k in self.settings} if tls else {}
        self.tls = tls
        self.aservice_settings = aservice or {}
        self.option_dat = option_dat
        self.proc: Optional[subprocess.Popen] = None
        self.out_file = os.path.join(self.dir, "mmproxy.out")

    imap_port = property(lambda self: self.ports.get("imap"))
    imaps_port = property(lambda self: self.tls_ports.get("imap"))
    pop_port = property(lambda self: self.ports.get("pop"))
    pops_port = property(lambda self: self.tls_ports.get("pop"))
    smtp_port = property(lambda self: self.ports.get("smtp"))
    smtps_port = property(lambda self: self.tls_ports.get("smtp"))

    # ------------------------------------------------------------------ config tree
    def defaults(self, kind: str) -> Dict[str, object]:
        """What this harness writes into a service file before the caller's settings."""
        ldap = self.info["ldap"]
        out: Dict[str, object] = {"LogDir": self.log_dir, "LogLevel": 5}
        if kind in ("imap", "pop"):
            out.update({
                "LdapURL": "%s/o=internet" % ldap["url"], "BindDN": ldap["bind_dn"], "BindPass": ldap["bind_pw"],
                "HostedDomains": True, "DefaultDomain": "example.com", "PreAuth": True,
                "BacksidePort": self.info["imap_port" if kind == "imap" else "pop3_port"],
                # BadGuys (on by default, as in the legacy product) off unless asked for: tests fail
                # logins on purpose, from the same few addresses
                "BGPenalty": 0,
            })
        if kind == "imap":
            out["ServerDownAlert"] = "Your IMAP server appears to be temporarily out of service."
        if self.tls:
            cert, key = self.tls
            # the legacy layout: SSLCacheDir/<nickname>.pem (SSLCertFile is obsolete), the key beside it
            directory, name = os.path.split(cert)
            nickname = name[:-4] if name.endswith(".pem") else name
            if not name.endswith(".pem"):
                raise ValueError("a certificate for the harness is a .pem file: %s" % cert)
            out.update({"SSLEnable": True, "SSLPorts": "%s:%d" % (self.host, self.tls_ports[kind]),
                        "SSLCacheDir": directory, "SSLCertNicknames": nickname, "SSLKeyFile": key})
        return out

    def write_config(self) -> None:
        entries = []
        for kind, settings in self.settings.items():
            listeners = "%s:%d" % (self.host, self.ports[kind])
            if self.tls:
                listeners += "|%s:%d" % (self.host, self.tls_ports[kind])
            entries.append("%s/%s@%s" % (LIBDIR, SERVICES[kind].file, listeners))
            write_cfg(os.path.join(self.config_dir, SERVICES[kind].file + ".cfg"), {**self.defaults(kind), **settings})
        write_cfg(os.path.join(self.config_dir, "AService.cfg"), {
            "ServiceList": " ".join(entries), "LogDir": self.log_dir, "LogLevel": 5, **self.aservice_settings})
        if self.option_dat is not None:
            with open(os.path.join(self.config_dir, "option.dat"), "w") as f:
                f.write(self.option_dat)

    # ------------------------------------------------------------------ process
    wrapper: List[str] = []        # e.g. ["prlimit", "--nofile=64"] to start it under limits

    def command(self) -> List[str]:
        return self.wrapper + [sys.executable, "-m", "mmproxy", "start", "--foreground",
                               "--config-dir", self.config_dir]

    def start(self, timeout: float = 20.0) -> "Proxy":
        self.write_config()
        out = open(self.out_file, "ab")
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        ports = list(self.ports.values()) + list(self.tls_ports.values())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                self.stop()
                raise RuntimeError("mmproxy exited with %s:\n%s" % (self.proc.returncode, output))
            if all(listening(self.host, p) for p in ports):
                return self
            time.sleep(0.05)
        output = self.output()
        self.stop()
        raise RuntimeError("mmproxy did not listen within %ss:\n%s" % (timeout, output))

    def output(self) -> str:
        return tail(self.out_file, 20000)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_cert(directory: str, name: str = "localhost") -> tuple:
    """A self-signed RSA-2048 certificate and key (PEM files) for TLS tests and the demo."""
    from .certs import self_signed
    return self_signed(directory, name)
