"""A private HAProxy (Debian's haproxy, 2.6) in TCP mode on loopback: frontends that pass client
connections to backend servers, with a PROXY protocol header (v1, v2, v2 with the SSL TLV) and
optional TLS termination.

    with HAProxy([Frontend("imap", [("127.0.0.1", 1143)], send_proxy="v2")]) as h:
        h.port_of("imap")           # where clients connect (127.0.0.1)

Only the standard library is used (see base.py).
"""
from __future__ import annotations

import dataclasses
import os
import socket
from typing import Dict, List, Optional, Sequence, Tuple

from .base import Daemon, find_binary, free_port, listening

# Frontend.send_proxy -> the haproxy `server` keyword
SEND_PROXY = {
    None: "",
    "v1": "send-proxy",                 # text header: "PROXY TCP4 <src> <dst> <sport> <dport>\r\n"
    "v2": "send-proxy-v2",              # binary header, no TLVs
    "v2-ssl": "send-proxy-v2-ssl",      # binary header + PP2_TYPE_SSL (0x20) TLV (version, cipher...)
    "v2-ssl-cn": "send-proxy-v2-ssl-cn",  # as v2-ssl, + the client certificate's CN
}


@dataclasses.dataclass
class Frontend:
    """One TCP listener and the servers it balances over (haproxy `listen` section `name`).

    servers: (host, port) of each backend server, used in turn (balance roundrobin).
    port: listen port on `host` (127.0.0.1); None: a free port, chosen when HAProxy is made.
    tls_pem: a PEM file with certificate and key concatenated (chain after the certificate):
    HAProxy then terminates TLS on this listener (`bind ... ssl crt FILE`) and passes plain
    TCP on.
    send_proxy: None | "v1" | "v2" | "v2-ssl" | "v2-ssl-cn": the PROXY protocol header sent
    to the servers at the start of each connection (see SEND_PROXY).
    check: TCP health checks of the servers every `check_inter` seconds (with the PROXY
    header too: check-send-proxy, when send_proxy is set); a server that fails them is not
    used. Each check is a connection to the server that sends nothing more and closes.
    """

    name: str
    servers: Sequence[Tuple[str, int]]
    port: Optional[int] = None
    tls_pem: Optional[str] = None
    send_proxy: Optional[str] = "v2"
    check: bool = False
    check_inter: float = 1.0
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.send_proxy not in SEND_PROXY:
            raise ValueError("send_proxy: one of %s, not %r" % (sorted(map(str, SEND_PROXY)), self.send_proxy))
        if not self.name or any(c.isspace() or c == "#" for c in self.name):
            raise ValueError("frontend name: a non-empty word, not %r" % self.name)
        if not self.servers:
            raise ValueError("frontend %s: no servers" % self.name)


def write_pem(cert: str, key: str, out: str) -> str:
    """Concatenate a certificate PEM file and its key PEM file into `out` (mode 0600), the form
    haproxy's `crt` wants; returns `out`."""
    with open(cert, "rb") as f:
        data = f.read()
    with open(key, "rb") as f:
        data += (b"" if data.endswith(b"\n") else b"\n") + f.read()
    with open(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
    return out


class HAProxy(Daemon):
    """`haproxy -db -f <workdir>/haproxy.cfg`: one process in the foreground (no daemon, no
    master-worker), stopped by SIGTERM to its pid (haproxy's hard stop: connections are cut).

    frontends: Frontend list (names unique); each gets a `listen` section (mode tcp, timeouts
    connect 5 s, client/server 1 h). Ports left None are chosen in __init__, so `port_of()`
    works before start(). `maxconn` is the global connection limit. `stats_socket`: a UNIX
    socket `stats_path` in the workdir (level admin) for `command()`. `nbthread`: haproxy
    threads (its default is the number of CPUs).
    Log: alerts/warnings and one line per connection (option tcplog) go to stderr, which is
    `out_file` (= `log_file`); nothing to syslog.
    Ready once every frontend port listens (read from /proc/net/tcp, not by connecting: a test
    connection would reach the servers and carry a PROXY header). Raises MissingBinary if
    haproxy is not installed, DaemonError with the log tail if it exits (bad configuration) or
    does not listen within `start_timeout` seconds.
    """

    name = "haproxy"

    def __init__(self, frontends: Sequence[Frontend], *, workdir: Optional[str] = None, maxconn: int = 2000,
                 stats_socket: bool = False, nbthread: Optional[int] = None, keep: bool = False) -> None:
        self.haproxy = find_binary("haproxy")
        names = [f.name for f in frontends]
        if len(set(names)) != len(names):
            raise ValueError("frontend names must be unique: %s" % names)
        if not frontends:
            raise ValueError("no frontends")
        self.frontends: List[Frontend] = [f if f.port else dataclasses.replace(f, port=free_port(f.host))
                                          for f in frontends]
        self.maxconn = maxconn
        self.stats_socket = stats_socket
        self.nbthread = nbthread
        super().__init__(workdir, keep)
        self.conf = os.path.join(self.dir, "haproxy.cfg")

    @property
    def ports(self) -> Dict[str, int]:
        """{frontend name: listen port}."""
        return {f.name: int(f.port or 0) for f in self.frontends}

    def port_of(self, name: str) -> int:
        """The listen port of frontend `name` (KeyError if there is none)."""
        return self.ports[name]

    def frontend(self, name: str) -> Frontend:
        for f in self.frontends:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def stats_path(self) -> str:
        return os.path.join(self.dir, "haproxy.sock")

    # -- Daemon ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        out = ["# private haproxy for mmproxy tests (written by mmproxy.testing.haproxy)",
               "global",
               "    maxconn %d" % self.maxconn,
               "    log stderr format raw local0 info"]
        if self.nbthread:
            out.append("    nbthread %d" % self.nbthread)
        if self.stats_socket:
            out.append("    stats socket %s mode 600 level admin" % self.stats_path)
        out += ["",
                "defaults",
                "    mode tcp",
                "    log global",
                "    option tcplog",
                "    timeout connect 5s",
                "    timeout client 1h",
                "    timeout server 1h",
                ""]
        for f in self.frontends:
            bind = "    bind %s:%d" % (f.host, f.port or 0)
            if f.tls_pem:
                bind += " ssl crt %s" % f.tls_pem
            out += ["listen %s" % f.name, bind, "    balance roundrobin"]
            proxy = SEND_PROXY[f.send_proxy]
            for i, (host, port) in enumerate(f.servers):
                server = "    server s%d %s:%d" % (i, host, port)
                if proxy:
                    server += " " + proxy
                if f.check:
                    server += " check inter %dms" % max(1, round(f.check_inter * 1000))
                    if proxy:
                        server += " check-send-proxy"
                out.append(server)
            out.append("")
        with open(self.conf, "w") as fh:
            fh.write("\n".join(out))

    def _argv(self) -> list:
        return [self.haproxy, "-db", "-f", self.conf]

    def _env(self) -> Optional[dict]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)        # haproxy is built with systemd support: not ours to notify
        return env

    def _ready(self) -> bool:
        return all(listening(f.host, int(f.port or 0)) for f in self.frontends)

    # -- runtime API ---------------------------------------------------------------------------
    def command(self, cmd: str, timeout: float = 5.0) -> str:
        """One command on the stats socket (needs stats_socket=True), e.g. "show servers state",
        "disable server imap/s0", "enable server imap/s0"; haproxy's answer as text."""
        if not self.stats_socket:
            raise RuntimeError("HAProxy was made without stats_socket=True")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(self.stats_path)
            s.sendall(cmd.encode("utf-8") + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        finally:
            s.close()
        return b"".join(chunks).decode("utf-8", "replace")

    def info(self) -> dict:
        return {"ports": self.ports, "conf": self.conf, "log": self.log_file}
