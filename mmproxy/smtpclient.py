"""The proxy's SMTP client connection to one relay: multi-line replies, EHLO keywords, STARTTLS.

``smtp`` drives it; this module knows sockets, RFC 5321 reply syntax and the failure taxonomy.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Dict, List, Optional

from mmproxy import tls as tlsmod
from mmproxy.backend import MAX_STORE_LINE, Store, address_family
from mmproxy.errors import BackendProtocolError, BackendUnavailable
from mmproxy.linereader import BackendReader

MAX_REPLY_LINES = 256
# Towards the relay (RFC 5321 4.5.3.2); the greeting comes within FailoverTimeout instead.
SETUP_TIMEOUT = 60.0        # EHLO, STARTTLS and the TLS handshake while a relay is being chosen
REPLY_TIMEOUT = 300.0       # MAIL, RCPT (4.5.3.2.2, .3) and every other command


@dataclass
class Reply:
    code: int
    lines: List[bytes]

    def text(self) -> str:
        return " | ".join(line.decode("utf-8", "replace") for line in self.lines)[:300]


class RelayConnection(Store):
    """The proxy's SMTP client connection to one relay."""

    def __init__(self, host: str, port: int, connect_timeout: float, header: bytes = b"") -> None:
        super().__init__(host, port, connect_timeout, phase=None)
        self.keywords: Dict[str, str] = {}      # EHLO keyword -> its parameters
        self.proxied = bool(header)             # the PROXY protocol told it the client already
        self.tls = False
        if header:
            self.send(header)

    def send(self, data: bytes, timeout: Optional[float] = REPLY_TIMEOUT) -> None:
        super().send(data, timeout)

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        """One (multi-line) reply, all of it within ``timeout`` seconds however the relay trickles it
        (BackendUnavailable); BackendProtocolError unless every line is ``NNN[- ]text`` with one code."""
        self.reader.idle = timeout
        self.reader.set_deadline(timeout, "the relay's reply")
        try:
            return self._reply()
        finally:
            self.reader.set_deadline(None)

    def _reply(self) -> Reply:
        lines: List[bytes] = []
        while True:
            line = self.readline()
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-") \
                    or (lines and line[:3] != lines[0][:3]):
                raise BackendProtocolError("%s: not an SMTP reply: %r" % (self, line[:80]))
            lines.append(line)
            if line[3:4] != b"-":
                return Reply(int(line[:3]), lines)
            if len(lines) >= MAX_REPLY_LINES:
                raise BackendProtocolError("%s: reply of more than %d lines" % (self, MAX_REPLY_LINES))

    def command(self, line: bytes, timeout: float = REPLY_TIMEOUT) -> Reply:
        self.send(line + b"\r\n")
        return self.reply(timeout)

    def learn(self, r: Reply) -> None:
        """Remember the keywords of an EHLO reply."""
        self.keywords = {}
        for line in r.lines[1:]:
            word, _, params = line[4:].decode("ascii", "replace").strip().partition(" ")
            self.keywords[word.partition("=")[0].upper()] = params

    def ehlo(self, name: str) -> None:
        r = self.command(b"EHLO " + name.encode("ascii", "replace"), SETUP_TIMEOUT)
        if r.code != 250:
            raise BackendUnavailable("%s answered EHLO with %s" % (self, r.text()))
        self.learn(r)

    def starttls(self, ctx: ssl.SSLContext, seconds: float = tlsmod.HANDSHAKE_TIMEOUT) -> None:
        """The client side of a TLS handshake, all of it within ``seconds``; BackendUnavailable."""
        if self.reader.take_pending():
            raise BackendProtocolError("%s sent data after its STARTTLS go-ahead" % self)
        try:
            self.sock = tlsmod.handshake(ctx, self.sock, seconds,
                                         server_hostname=None if address_family(self.host) else self.host)
        except tlsmod.HandshakeTimeout as e:
            raise BackendUnavailable("%s: %s" % (self, e)) from None
        except (OSError, ssl.SSLError) as e:
            raise BackendUnavailable("%s: TLS handshake failed: %s" % (self, e)) from None
        self.reader = BackendReader(self.sock, MAX_STORE_LINE, SETUP_TIMEOUT, str(self))
        self.tls = True

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

