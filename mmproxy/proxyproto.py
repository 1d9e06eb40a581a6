"""The PROXY protocol, received: the header a load balancer (HAProxy ``send-proxy`` /
``send-proxy-v2``, nginx ``proxy_protocol``) puts before a connection's first byte to say who the
client is.  Specification: HAProxy's "The PROXY protocol, versions 1 & 2" (proxy-protocol.txt).

Only listeners in ``ProxyProtocolPorts`` read a header, and only from addresses in
``ProxyProtocolFrom``: anybody else could claim any address.  :func:`read_origin` reads exactly
the header (never a byte of the client's own), within one deadline for all of it, and returns
the :class:`Origin` the rest of mmproxy uses as the client: ConnLimits, BadGuys, access filters,
ClientLookup, POP-before-SMTP, logs, and what stores and relays are told (IMAP ID, XCLIENT).

A v2 header's PP2_TYPE_SSL TLV with the PP2_CLIENT_SSL bit says the balancer took the client's TLS:
the session counts as TLS (RestrictPlainPasswords, no STARTTLS offered).
"""
from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import Sequence, Tuple

import gevent

from mmproxy.addresses import Address, Network, in_network, unmapped
from mmproxy.xclient import PROXY_V2_SIGNATURE

V1_MAX = 107                  # octets of a v1 line, CR LF included (the specification's bound)
V2_MAX = 16 + 4096            # octets of a v2 header mmproxy reads; longer ones are refused
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_CLIENT_SSL = 0x01


class HeaderError(Exception):
    """No usable PROXY header: what was wrong, in words for the log."""


@dataclass(frozen=True)
class Origin:
    """Who a connection is from as the balancer says: ``client`` and ``server`` (ip, port) as the
    client saw the connection, whether the balancer took the client's TLS (and which version), and
    ``balancer``, the address the connection itself came from."""

    client: Tuple[str, int]
    server: Tuple[str, int]
    tls: bool = False
    tls_version: str = ""
    balancer: str = ""


def trusted(ip: str, networks: Sequence[Network]) -> bool:
    """Whether ``ip`` (the connection's own source) is in ``networks`` (ProxyProtocolFrom)."""
    try:
        a = unmapped(ip)
    except ValueError:
        return False
    return any(in_network(a, n) for n in networks)


def read_origin(sock: socket.socket, peer: Tuple[str, int], seconds: float) -> Origin:
    """Read the PROXY header (v1 or v2) at the start of ``sock`` within ``seconds`` in all, and no
    octet past it.  ``peer``: the connection's own source (the balancer).  A v1 ``UNKNOWN`` or v2
    ``LOCAL`` header (the balancer's own health check) gives the connection's own addresses.

    Raises HeaderError (no header, a malformed or oversized one, the client gone, the time up).
    """
    try:
        with gevent.Timeout(seconds, HeaderError("no complete PROXY header within %gs" % seconds)):
            return _read(sock, peer)
    except OSError as e:
        raise HeaderError("connection lost while reading the PROXY header: %s" % (e.strerror or e)) from None


def _read(sock: socket.socket, peer: Tuple[str, int]) -> Origin:
    taken = b""                                  # octets consumed: all of them header octets
    while True:
        peeked = sock.recv(V2_MAX - len(taken), socket.MSG_PEEK)
        if not peeked:
            raise HeaderError("connection closed before a complete PROXY header")
        data = taken + peeked
        if data[:12] == PROXY_V2_SIGNATURE[:len(data[:12])]:
            if len(data) >= 16:
                need = 16 + struct.unpack("!H", data[14:16])[0]
                if need > V2_MAX:
                    raise HeaderError("PROXY v2 header of %d octets (at most %d read)" % (need, V2_MAX))
                if len(data) >= need:
                    _take(sock, need - len(taken))
                    return parse_v2(data[:need], peer, _local(sock))
        elif data[:6] == b"PROXY "[:len(data[:6])]:
            end = data.find(b"\r\n", 0, V1_MAX)
            if end >= 0:
                _take(sock, end + 2 - len(taken))
                return parse_v1(data[:end + 2], peer, _local(sock))
            if len(data) >= V1_MAX:
                raise HeaderError("PROXY v1 line longer than %d octets" % V1_MAX)
        else:
            raise HeaderError("no PROXY header: the connection starts %r" % data[:16])
        taken += _take(sock, len(peeked))        # incomplete: what arrived is header; wait for more


def _take(sock: socket.socket, n: int) -> bytes:
    """Consume ``n`` octets already seen by a peek (they are in the socket's buffer)."""
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise HeaderError("connection closed inside the PROXY header")
        got += chunk
    return got


def _local(sock: socket.socket) -> Tuple[str, int]:
    name = sock.getsockname()
    return name[0], name[1]


def parse_v1(line: bytes, peer: Tuple[str, int], local: Tuple[str, int]) -> Origin:
    """A v1 line (``PROXY TCP4|TCP6 SRC DST SPORT DPORT`` or ``PROXY UNKNOWN ...``, CR LF ended).

    Raises HeaderError when it does not follow the specification (section 2.1)."""
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError("PROXY v1 line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return Origin(peer, local, balancer=peer[0])
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise HeaderError("malformed PROXY v1 line %r" % text[:V1_MAX])
    version = 4 if parts[1] == "TCP4" else 6
    try:
        src, dst = _address(parts[2]), _address(parts[3])
        sport, dport = _port(parts[4]), _port(parts[5])
    except ValueError as e:
        raise HeaderError("malformed PROXY v1 line %r: %s" % (text, e)) from None
    if src.version != version or dst.version != version:
        raise HeaderError("PROXY v1 line %r: the addresses are not %s" % (text, parts[1]))
    return Origin((_text(src), sport), (_text(dst), dport), balancer=peer[0])


_ADDRESS = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")


def _address(text: str) -> Address:
    """An address as the specification writes it: no IPv6 zone (``%eth0``), nothing else."""
    if not _ADDRESS.match(text):
        raise ValueError("%r is not an address" % text)
    return ipaddress.ip_address(text)


def _text(a: Address) -> str:
    """How mmproxy spells a client address everywhere: an IPv4-mapped IPv6 address (a dual-stack
    balancer) as the IPv4 one (addresses.unmapped)."""
    return str(unmapped(str(a)))


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ValueError("%r is not a port" % text)
    return int(text)


def parse_v2(header: bytes, peer: Tuple[str, int], local: Tuple[str, int]) -> Origin:
    """A whole v2 header (signature, version and command, family, length, addresses, TLVs).

    Raises HeaderError when it does not follow the specification (section 2.2)."""
    ver_cmd, family = header[12], header[13]
    if ver_cmd >> 4 != 2:
        raise HeaderError("PROXY v2 header of version %d" % (ver_cmd >> 4))
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise HeaderError("PROXY v2 header with command %d" % command)
    if command == 0 or family == 0x00:           # LOCAL (a health check), UNSPEC: the connection's own
        return Origin(peer, local, balancer=peer[0])     # addresses; the block is discarded (2.2)
    body = header[16:]
    if family == 0x11:                           # TCP over IPv4
        size = 12
    elif family == 0x21:                         # TCP over IPv6
        size = 36
    else:
        raise HeaderError("PROXY v2 header for address family/protocol 0x%02x (only TCP is proxied)" % family)
    if len(body) < size:
        raise HeaderError("PROXY v2 header too short for its addresses")
    tls, version = _tls(body[size:])
    half = (size - 4) // 2
    src, dst = ipaddress.ip_address(body[:half]), ipaddress.ip_address(body[half:2 * half])
    sport, dport = struct.unpack("!HH", body[2 * half:size])
    return Origin((_text(src), sport), (_text(dst), dport), tls, version, peer[0])


def _tls(area: bytes) -> Tuple[bool, str]:
    """(the balancer took the client's TLS, its version) from the TLVs after the addresses."""
    tls, version = False, ""
    for kind, value in tlvs(area):
        if kind == PP2_TYPE_SSL:
            if len(value) < 5:
                raise HeaderError("PROXY v2 SSL TLV too short")
            tls = bool(value[0] & PP2_CLIENT_SSL)
            for sub, sub_value in tlvs(value[5:]):
                if sub == PP2_SUBTYPE_SSL_VERSION:
                    version = sub_value.decode("ascii", "replace")[:32]
    return tls, version


def tlvs(data: bytes) -> Sequence[Tuple[int, bytes]]:
    """The (type, value) pairs of a v2 header's TLV area (section 2.2.7); HeaderError when cut short."""
    out, i = [], 0
    while i < len(data):
        if len(data) - i < 3:
            raise HeaderError("PROXY v2 TLV cut short")
        kind, length = data[i], struct.unpack("!H", data[i + 1:i + 3])[0]
        if i + 3 + length > len(data):
            raise HeaderError("PROXY v2 TLV longer than the header")
        out.append((kind, data[i + 3:i + 3 + length]))
        i += 3 + length
    return out
