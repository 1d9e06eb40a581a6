"""Shared helpers of the real-server fixtures: free ports, binaries, password hashes, and
`Daemon`, the start/poll/stop logic common to slapd, Dovecot and Postfix.

Only the standard library is used here, so the fixtures run both in a plain process and in a
gevent-monkey-patched one (subprocess, socket and time.sleep are then cooperative).
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence, TypeVar, Union

# apt packages that provide each binary we run (for the error message)
APT_HINT = {
    "slapd": "slapd",
    "slapadd": "slapd",
    "ldapmodify": "ldap-utils",
    "ldapwhoami": "ldap-utils",
    "dovecot": "dovecot-imapd dovecot-pop3d dovecot-lmtpd",
    "doveconf": "dovecot-imapd dovecot-pop3d dovecot-lmtpd",
    "/usr/lib/dovecot/imap": "dovecot-imapd",
    "/usr/lib/dovecot/pop3": "dovecot-pop3d",
    "/usr/lib/dovecot/lmtp": "dovecot-lmtpd",
    "postfix": "postfix",
    "postconf": "postfix",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "haproxy": "haproxy",
}
# root's PATH has these, a normal user's often does not
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class MissingBinary(RuntimeError):
    """A server binary the fixtures need is not installed (the message says how to install it)."""


class DaemonError(RuntimeError):
    """A daemon failed to start or to answer (the message ends with the tail of its log)."""


def find_binary(name: str) -> str:
    """Absolute path of `name` (searched in PATH and the sbin dirs), else MissingBinary."""
    if os.path.isabs(name):
        if os.access(name, os.X_OK):
            return name
        path = None
    else:
        search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
        path = shutil.which(name, path=search)
    if path is None:
        pkgs = APT_HINT.get(name, name)
        raise MissingBinary(
            "%s is not installed; the real-server tests need it. Install with:\n"
            "    sudo bash scripts/setup-system      (or: sudo apt-get install -y %s)" % (name, pkgs))
    return path


_given: set = set()          # ports handed out by this process: never twice


def _listener_range() -> range:
    """Ports below the kernel's ephemeral range (ip_local_port_range), where no outgoing
    connection ever takes one: a port found free there stays free until its server binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768
    return range(10000, first) if first > 12000 else range(first + 1, 65536)


def free_port(*hosts: str) -> int:
    """A TCP port that is free on every address in `hosts` (default 127.0.0.1), drawn at random
    below the ephemeral range (the clients' outgoing connections of a busy test run took ports
    that bind(0) had just handed out) and never handed out twice by this process."""
    import random
    hosts = hosts or ("127.0.0.1",)
    ports = _listener_range()
    for _ in range(500):
        port = random.choice(ports)
        if port not in _given and all(_bindable(h, port) for h in hosts):
            _given.add(port)
            return port
    raise RuntimeError("no TCP port free on all of %s" % (hosts,))


def _bindable(host: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def listening(host: str, port: int) -> bool:
    """True if a TCP socket listens on host:port (or on 0.0.0.0:port), read from /proc/net/tcp.
    Unlike a test connection this leaves no trace in the daemon's log."""
    want_port = "%04X" % port
    want_addrs = {"%08X" % int.from_bytes(socket.inet_aton(a), sys.byteorder) for a in (host, "0.0.0.0")}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                addr, _, lport = local.partition(":")
                if state == "0A" and lport == want_port and addr in want_addrs:
                    return True
    except OSError:
        return port_open(host, port)
    return False


def ssha(password: Union[str, bytes], salt: Optional[bytes] = None) -> str:
    """RFC 2307 {SSHA} hash, understood by both slapd and Dovecot: over the UTF-8 of a str, over
    bytes as they are (e.g. the ISO-8859-1 octets b"p\\xe4sswort")."""
    salt = os.urandom(8) if salt is None else salt
    raw = password.encode("utf-8") if isinstance(password, str) else password
    digest = hashlib.sha1(raw + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def make_tempdir(prefix: str) -> str:
    """A fresh temp dir, mode 0755: the daemons run as root but drop to other users
    (dovenull, nobody, postfix) that must reach their sockets and the mailboxes below it."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return d


def tail(path: str, nbytes: int = 4000) -> str:
    """The last `nbytes` of a file, as text ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run(argv: Sequence[str], input: Optional[str] = None, env: Optional[dict] = None) -> str:
    """Run a short command; raise with its output when it fails. Returns stdout."""
    r = subprocess.run(list(argv), input=input, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError("%s failed (rc=%s):\n%s%s" % (" ".join(argv), r.returncode, r.stdout[-3000:],
                                                       r.stderr[-3000:]))
    return r.stdout


def _proc_table() -> dict:
    """{pid: (ppid, pgrp, state, starttime)} of every process, from /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()     # state ppid pgrp session ... starttime(20th)
        table[int(d)] = (int(fields[1]), int(fields[2]), fields[0], int(fields[19]))
    return table


def _family(root: int, table: dict) -> set:
    """(pid, starttime) of `root`, its descendants, and the members of any process group one of
    them leads (Postfix's master calls setsid(): its children are in its own group)."""
    kids: dict = {}
    for pid, (ppid, _pg, _st, _t) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        todo.extend(kids.get(pid, []))
    leaders = {pid for pid in found if table[pid][1] == pid}
    found |= {pid for pid, row in table.items() if row[1] in leaders}
    return {(pid, table[pid][3]) for pid in found}


def _alive(members: set) -> list:
    """The pids in `members` that still run (same start time, so not a reused pid; no zombies)."""
    table = _proc_table()
    return [pid for pid, t in members if pid in table and table[pid][3] == t and table[pid][2] != "Z"]


_D = TypeVar("_D", bound="Daemon")


class Daemon:
    """One foreground server process that we start in its own session (process group).

    Subclasses set `name` and implement `_prepare()` (write config, once), `_argv()` and
    `_ready()` (True once the daemon answers). `stop()` signals only what we started: SIGTERM to
    the process, then SIGKILL to what is left of its family (descendants, and the process groups
    they lead) after `stop_timeout` seconds.
    """

    name = "daemon"
    start_timeout = 20.0
    stop_timeout = 5.0

    def __init__(self, workdir: Optional[str] = None, keep: bool = False) -> None:
        self._own_dir = workdir is None
        self.dir = workdir if workdir is not None else make_tempdir("mmproxy-%s-" % self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.keep = keep
        self.proc: Optional[subprocess.Popen] = None
        self._prepared = False
        self._terminated = False
        self._family: set = set()      # (pid, starttime) of what we started, see stop()

    # -- to override -------------------------------------------------------------------------
    def _prepare(self) -> None:
        raise NotImplementedError

    def _argv(self) -> list:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _env(self) -> Optional[dict]:
        return None

    def _logs(self) -> list:
        """Files whose tail goes into a start failure message."""
        return [self.out_file] if self.log_file == self.out_file else [self.out_file, self.log_file]

    @property
    def log_file(self) -> str:
        """The daemon's own log (its output unless a subclass says otherwise)."""
        return self.out_file

    def read_log(self) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def out_file(self) -> str:
        """stdout+stderr of the process."""
        return os.path.join(self.dir, self.name + ".out")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> "Daemon":
        if self.running:
            return self
        if not self._prepared:
            self._prepare()
            self._prepared = True
        argv = self._argv()
        self._terminated = False
        with open(self.out_file, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.dir, env=self._env(), start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Poll until the daemon answers; raise DaemonError (with its log) if it exits or times out."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while True:
            if self.proc is None:
                raise DaemonError("%s was not started" % self.name)
            if self.proc.poll() is not None:
                raise DaemonError("%s exited with rc=%s while starting\n%s"
                                  % (self.name, self.proc.returncode, self._log_tails()))
            try:
                if self._ready():
                    return
            except OSError:                # not listening yet
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonError("%s did not answer within %.0f s\n%s" % (self.name, self.start_timeout,
                                                                           self._log_tails()))
            time.sleep(0.05)

    def _log_tails(self) -> str:
        parts = []
        for p in self._logs():
            t = tail(p)
            if t:
                parts.append("--- %s ---\n%s" % (p, t))
        return "\n".join(parts) or "(no log output)"

    def terminate(self) -> None:
        """Ask the daemon to stop (SIGTERM) and return at once; stop() then waits. Lets several
        daemons shut down in parallel."""
        if self.proc is not None and self.proc.poll() is None:
            self._family |= _family(self.proc.pid, _proc_table())
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._terminated = True

    def stop(self) -> None:
        """Stop the process and everything it started; keeps the directory so start() works
        again. Only processes descended from the one we started are signalled: SIGTERM (see
        terminate()), then after `stop_timeout` SIGKILL to whatever of that family is left."""
        if self.proc is None:
            return
        if not self._terminated:
            self.terminate()
        p, self.proc = self.proc, None
        family, self._family = self._family | _family(p.pid, _proc_table()), set()
        try:
            p.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 0.5
        left = _alive(family)
        while left and time.monotonic() < deadline:     # a short grace for children on their way out
            time.sleep(0.02)
            left = _alive(family)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.wait(timeout=self.stop_timeout)
        deadline = time.monotonic() + self.stop_timeout
        while left and time.monotonic() < deadline:
            time.sleep(0.02)
            left = _alive(family)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """stop(), then remove the temp dir if we made it (unless keep=True)."""
        self.stop()
        if self._own_dir and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self: _D) -> _D:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
