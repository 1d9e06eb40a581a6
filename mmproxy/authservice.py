"""POP-before-SMTP: who logged in over POP from which address, and when (AuthService/AuthServiceTTL).

The POP service records every verified login (directory PreAuth or the store's OK; never a spoofed
mailbox) when its AuthServiceTTL > 0; the SMTP service asks whether a client address has a fresh
record; ``XQUERYAUTH <ip>`` over POP answers from the same records when AuthService is on.
"""
from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Dict, Optional

MAX_RECORDS = 100000     # one per client address; the oldest go first when full


@dataclass(frozen=True)
class Record:
    ip: str
    user: str
    when: float          # time.time() of the login
    expires: float


def _key(ip: str) -> str:
    """One spelling per address (an IPv4-mapped IPv6 address is the IPv4 one)."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    return str(a)


class AuthRecords:
    """The records of this process (insertion-ordered dict: cheap expiry of the oldest)."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.max = max_records
        self.records: Dict[str, Record] = {}

    def record(self, ip: str, user: str, ttl: float) -> None:
        if ttl <= 0:
            return
        key = _key(ip)
        now = time.time()
        self.records.pop(key, None)
        self.records[key] = Record(key, user, now, now + ttl)
        while len(self.records) > self.max:
            del self.records[next(iter(self.records))]

    def lookup(self, ip: str) -> Optional[Record]:
        rec = self.records.get(_key(ip))
        if rec is None:
            return None
        if rec.expires <= time.time():
            del self.records[rec.ip]
            return None
        return rec


RECORDS = AuthRecords()
