"""POP-before-SMTP: who logged in over POP from which address, and when (AuthService/AuthServiceTTL).

The POP service records every verified login (directory PreAuth or the store's OK; never a spoofed
mailbox) when its AuthServiceTTL > 0; the SMTP service asks whether a client address has a fresh
record; ``XQUERYAUTH <ip>`` over POP answers from the same records when AuthService is on.

With ``NumThreads`` > 1 the POP login and the SMTP connection may land in different worker
processes: the records live in the box's per-client state store (:mod:`mmproxy.state`), where
each record is written in one transaction, so a reader gets a record as it was written or none.
"""
from __future__ import annotations

import logging
from typing import Optional

from mmproxy import state
from mmproxy.addresses import address_key
from mmproxy.state import Record

log = logging.getLogger("mmproxy.state")

__all__ = ["Record", "record", "lookup"]


def record(ip: str, user: str, ttl: float) -> None:
    """Remember that ``user`` logged in over POP from ``ip``, for ``ttl`` seconds (nothing when
    ttl <= 0).  A busy store loses the record (one warning): POP before SMTP then asks for a new login."""
    if ttl <= 0:
        return
    try:
        state.store().record_login(address_key(ip), user, ttl)
    except state.StateBusy as e:
        log.warning("POP login of %s from %s not recorded: %s", user, ip, e)


def lookup(ip: str) -> Optional[Record]:
    """The fresh POP login from ``ip`` (any spelling of the address), or None (also when the
    store stays busy: nobody is let through for the proxy's own trouble)."""
    try:
        return state.store().login_record(address_key(ip))
    except state.StateBusy as e:
        log.warning("POP-before-SMTP record of %s not read: %s", ip, e)
        return None
