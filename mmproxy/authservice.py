"""POP-before-SMTP: who logged in over POP from which address, and when (AuthService/AuthServiceTTL).

The POP service records every verified login (directory PreAuth or the store's OK; never a spoofed
mailbox) when its AuthServiceTTL > 0; the SMTP service asks whether a client address has a fresh
record; ``XQUERYAUTH <ip>`` over POP answers from the same records when AuthService is on.

With ``NumThreads`` > 1 the POP login and the SMTP connection may land in different worker
processes, so the records live in an anonymous shared memory map made at import, before the
workers are forked: a fixed table of slots, one per client address (open addressing), each
guarded by a sequence counter so a reader never takes a half-written record.  Only memory is
touched: nothing here can block the hub.
"""
from __future__ import annotations

import mmap
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Optional

from mmproxy.addresses import address_key

SLOTS = 16384            # distinct client addresses remembered at once
SLOT = 256               # bytes per slot
PROBE = 8                # slots looked at per address
_HEAD = struct.Struct("<QddB40sH")     # seq, when, expires, ip length, ip, user length
MAX_USER = SLOT - _HEAD.size


@dataclass(frozen=True)
class Record:
    ip: str
    user: str
    when: float          # time.time() of the login
    expires: float


class AuthRecords:
    """The table; shared with every process forked after it was made."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self.map = mmap.mmap(-1, slots * SLOT, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def _read(self, i: int) -> Optional[Record]:
        off = i * SLOT
        for _ in range(3):
            seq, when, expires, iplen, ip, ulen = _HEAD.unpack_from(self.map, off)
            if seq & 1:
                continue                  # being written right now
            user = bytes(self.map[off + _HEAD.size:off + _HEAD.size + min(ulen, MAX_USER)])
            if _HEAD.unpack_from(self.map, off)[0] != seq:
                continue
            if not iplen:
                return None
            return Record(ip[:iplen].decode(), user.decode("utf-8", "replace"), when, expires)
        return None

    def _slots(self, key: str) -> range:
        h = zlib.crc32(key.encode()) % self.slots
        return range(h, h + PROBE)

    def record(self, ip: str, user: str, ttl: float) -> None:
        if ttl <= 0:
            return
        key = address_key(ip)
        raw_user = user.encode("utf-8", "surrogateescape")
        if len(raw_user) > MAX_USER or len(key) > 40:
            return
        now = time.time()
        best, best_expiry = None, float("inf")
        for j in self._slots(key):
            i = j % self.slots
            rec = self._read(i)
            if rec is None or rec.ip == key or rec.expires <= now:
                best = i
                break
            if rec.expires < best_expiry:
                best, best_expiry = i, rec.expires     # full: replace the one that expires first
        assert best is not None                       # PROBE >= 1: some slot was chosen
        off = best * SLOT
        seq = _HEAD.unpack_from(self.map, off)[0]
        struct.pack_into("<Q", self.map, off, seq + 1 | 1)
        self.map[off + _HEAD.size:off + _HEAD.size + len(raw_user)] = raw_user
        _HEAD.pack_into(self.map, off, (seq | 1) + 1, now, now + ttl, len(key), key.encode(), len(raw_user))

    def lookup(self, ip: str) -> Optional[Record]:
        key = address_key(ip)
        now = time.time()
        for j in self._slots(key):
            rec = self._read(j % self.slots)
            if rec is not None and rec.ip == key:
                return rec if rec.expires > now else None
        return None


RECORDS = AuthRecords()
