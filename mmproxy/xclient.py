"""How the SMTP proxy tells a relay who the client really is: Postfix's XCLIENT command and the
PROXY protocol (HAProxy's v1 text and v2 binary headers).

Pure functions; ``smtp`` decides when to use which.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import List, Sequence, Tuple, Union

from mmproxy.addresses import unmapped

XCLIENT_MAX = 510           # octets of one XCLIENT command before its CR LF (512 with it)
XCLIENT_VALUE_MAX = 255     # octets of one (xtext-encoded) attribute value; Postfix refuses longer
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def xtext(value: bytes) -> str:
    """RFC 3461 xtext: '+', '=' and octets outside 33..126 as +HH."""
    return "".join(chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else "+%02X" % b for b in value)


def xclient_commands(attrs: Sequence[Tuple[str, str]]) -> List[str]:
    """XCLIENT commands of at most 510 octets; ADDR and NAME in the last one (the relay re-checks
    its XCLIENT authorisation against them). A value over 255 octets is sent as [UNAVAILABLE]."""
    def item(k: str, v: str) -> str:
        return " %s=%s" % (k, v if len(v) <= XCLIENT_VALUE_MAX else "[UNAVAILABLE]")

    first = [item(k, v) for k, v in attrs if k not in ("ADDR", "NAME")]
    last = "".join(item(k, v) for k, v in attrs if k in ("ADDR", "NAME"))
    cmds: List[str] = []
    cur = "XCLIENT"
    for it in first:
        if len(cur + it) > XCLIENT_MAX:
            cmds.append(cur)
            cur = "XCLIENT"
        cur += it
    if len(cur + last) > XCLIENT_MAX:
        cmds.append(cur)
        cur = "XCLIENT"
    cmds.append(cur + last)
    return [c for c in cmds if c != "XCLIENT"]


def proxy_header(version: int, client: Tuple[str, int], server: Tuple[str, int]) -> bytes:
    """The PROXY protocol header (v1 text, v2 binary) for a TCP connection from ``client`` to ``server``."""
    src, dst = unmapped(client[0]), unmapped(server[0])
    if src.version != dst.version:          # a v4 client on a v6 listener: say both in v6
        src, dst = _as_v6(src), _as_v6(dst)
    if version == 1:
        return ("PROXY TCP%d %s %s %d %d\r\n" % (src.version, src, dst, client[1], server[1])).encode()
    body = src.packed + dst.packed + struct.pack("!HH", client[1], server[1])
    family = 0x11 if src.version == 4 else 0x21         # TCP over IPv4 / IPv6
    return PROXY_V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def xclient_addr(ip: str) -> str:
    """XCLIENT ADDR: IPv4 as is, IPv6 as IPV6:..., an IPv4-mapped IPv6 address as the IPv4 one."""
    a = unmapped(ip)
    return ("IPV6:%s" % a) if a.version == 6 else str(a)


def _as_v6(a: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]) -> ipaddress.IPv6Address:
    return a if isinstance(a, ipaddress.IPv6Address) else ipaddress.IPv6Address("::ffff:%s" % a)
