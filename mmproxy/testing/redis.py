"""A private Redis server (Debian's redis-server) on loopback, plain or TLS, with an optional password.

    with RedisServer(password="s3cret") as r:
        r.url                       # "redis://:s3cret@127.0.0.1:<port>/0"
        r.cli("GET", "key")         # redis-cli against it: stdout as text
        r.pause(); r.resume()       # SIGSTOP / SIGCONT: a hung server
        r.kill(); r.start()         # SIGKILL: a dead server; start() again on the same port

Only the standard library is used (see base.py); `connect()` imports the redis package late.
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
from typing import TYPE_CHECKING, Any, Optional, Tuple
from urllib.parse import quote

from .base import Daemon, DaemonError, find_binary, free_port

if TYPE_CHECKING:
    from redis import Redis

PING = b"*1\r\n$4\r\nPING\r\n"


def _quoted(value: str) -> str:
    """`value` as a double-quoted redis.conf argument (backslash and quote escaped)."""
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def _resp(*args: str) -> bytes:
    """One RESP command: an array of bulk strings (UTF-8)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        raw = a.encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class RedisServer(Daemon):
    """`redis-server <workdir>/redis.conf` in the foreground on 127.0.0.1:<port> (a free port
    unless given), no persistence (`save ""`, `appendonly no`), `protected-mode yes`.

    password: `requirepass` (the default user's password; clients send AUTH <password>).
    tls: (certificate, key, CA) PEM paths: the server then speaks TLS only (`port 0`,
    `tls-port <port>`), clients need not present a certificate (`tls-auth-clients no`) and
    verify the server against CA; `url` is then rediss://.
    Redis's own log (loglevel notice) is `log_file`; its stdout/stderr `out_file`.

    The port is chosen once: stop()/kill() then start() brings the server back on the same
    port (empty: nothing is saved). pause()/resume() stop and continue the process (SIGSTOP /
    SIGCONT): connections are accepted by the kernel but nothing is answered. stop() continues
    a paused server first, so it always ends. Raises MissingBinary if redis-server is not
    installed, DaemonError (with the log tail) if it does not start or answer within
    `start_timeout` seconds.
    """

    name = "redis"

    def __init__(self, *, password: Optional[str] = None, tls: Optional[Tuple[str, str, str]] = None,
                 host: str = "127.0.0.1", port: Optional[int] = None, workdir: Optional[str] = None,
                 loglevel: str = "notice", keep: bool = False) -> None:
        self.server = find_binary("redis-server")
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.tls = tls                  # (certificate, key, CA) PEM paths
        self.loglevel = loglevel
        self.paused = False
        super().__init__(workdir, keep)
        self.conf = os.path.join(self.dir, "redis.conf")

    @property
    def url(self) -> str:
        """redis://[:password@]host:port/0, or rediss://... with TLS (the password URL-quoted)."""
        auth = ":%s@" % quote(self.password, safe="") if self.password is not None else ""
        return "%s://%s%s:%d/0" % ("rediss" if self.tls else "redis", auth, self.host, self.port)

    @property
    def log_file(self) -> str:
        return os.path.join(self.dir, "redis.log")

    # -- Daemon ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        lines = [
            "# private redis-server for mmproxy tests (written by mmproxy.testing.redis)",
            "bind %s" % self.host,
            "protected-mode yes",
            "daemonize no",
            "supervised no",
            'save ""',
            "appendonly no",
            "dir %s" % _quoted(self.dir),
            "logfile %s" % _quoted(self.log_file),
            "loglevel %s" % self.loglevel,
            "always-show-logo no",
            "databases 16",
        ]
        if self.tls:
            cert, key, ca = self.tls
            lines += ["port 0", "tls-port %d" % self.port, "tls-cert-file %s" % _quoted(cert),
                      "tls-key-file %s" % _quoted(key), "tls-ca-cert-file %s" % _quoted(ca),
                      "tls-auth-clients no"]
        else:
            lines.append("port %d" % self.port)
        if self.password is not None:
            lines.append("requirepass %s" % _quoted(self.password))
        with open(os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _argv(self) -> list:
        return [self.server, self.conf]

    def _ready(self) -> bool:
        """True once PING (after AUTH when a password is set) answers +PONG over a raw socket."""
        try:
            return self._ping()
        except ssl.SSLCertVerificationError as e:       # would never pass: say so now, not after the timeout
            self.stop()
            raise DaemonError("%s: its certificate does not verify against the CA: %s\n%s"
                              % (self.name, e, self._log_tails())) from e

    def _ping(self, timeout: float = 1.0) -> bool:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            if self.tls:
                ctx = ssl.create_default_context(cafile=self.tls[2])
                ctx.check_hostname = False       # readiness only; the chain is still verified
                sock = ctx.wrap_socket(sock)
            f = sock.makefile("rb")
            if self.password is not None:
                sock.sendall(_resp("AUTH", self.password))
                if f.readline() != b"+OK\r\n":
                    return False
            sock.sendall(PING)
            return f.readline() == b"+PONG\r\n"
        finally:
            sock.close()

    def start(self, wait: bool = True) -> "RedisServer":
        """Start redis-server (again, on the same port, after stop() or kill()) and wait for PING
        unless `wait` is false."""
        self.paused = False
        super().start(wait)
        return self

    def terminate(self) -> None:
        self.resume()                  # SIGTERM is not acted on while stopped
        super().terminate()

    # -- faults ------------------------------------------------------------------------------
    def pause(self) -> None:
        """SIGSTOP the server: it keeps its port and connections but answers nothing (a hung server)."""
        if self.running and not self.paused:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.paused and self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL the server and reap it (a crashed server: clients see their connections reset).
        start() brings it back on the same port."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=self.stop_timeout)
            self.proc = None
        self.paused = False

    # -- clients -----------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """`redis-cli` with `args` against this server (password by REDISCLI_AUTH, --tls --cacert
        with TLS); its stdout without the final newline (an error reply is output too, e.g. "ERR
        unknown command ...": redis-cli exits 0 then). RuntimeError if redis-cli fails (cannot
        connect) or takes longer than `timeout` seconds (redis-cli 7.0 has no -t of its own)."""
        argv = [find_binary("redis-cli"), "-h", self.host, "-p", str(self.port)]
        if self.tls:
            argv += ["--tls", "--cacert", self.tls[2]]
        env = None
        if self.password is not None:
            env = dict(os.environ, REDISCLI_AUTH=self.password)
        argv += args
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError("%s: no answer within %s s" % (" ".join(argv), timeout)) from e
        if r.returncode != 0:
            raise RuntimeError("%s failed (rc=%s):\n%s%s" % (" ".join(argv), r.returncode, r.stdout[-3000:],
                                                           r.stderr[-3000:]))
        return r.stdout.rstrip("\n")

    def connect(self, **kwargs: Any) -> Redis:
        """A redis-py client for `url` (with TLS: verifying against the CA); `kwargs` go to
        redis.Redis.from_url (e.g. socket_timeout=2). Needs the redis package."""
        import redis  # imported late: the fixture itself needs only the standard library

        if self.tls:
            kwargs.setdefault("ssl_ca_certs", self.tls[2])
        return redis.Redis.from_url(self.url, **kwargs)

    def info(self) -> dict:
        return {"url": self.url, "host": self.host, "port": self.port, "password": self.password,
                "tls": self.tls is not None, "log": self.log_file}
