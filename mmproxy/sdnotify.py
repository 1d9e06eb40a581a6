"""Tell systemd how the daemon is doing (``Type=notify``), the sd_notify(3) protocol without libsystemd.

systemd passes the address of its notification socket in ``$NOTIFY_SOCKET``: a file system path, or
an abstract-namespace name written with a leading ``@`` (the ``@`` stands for the NUL byte that
starts such an address, unix(7)).  A message is one datagram of newline-separated ``VARIABLE=value``
assignments: ``READY=1`` once the listeners accept, ``RELOADING=1`` (with ``MONOTONIC_USEC=``, which
``Type=notify-reload`` requires) when a refresh begins and ``READY=1`` when it is done,
``STOPPING=1`` when a stop begins, ``STATUS=`` free text for ``systemctl status``.  Only the main
process notifies (the unit's default ``NotifyAccess=main``): one AService, or the Master for
NumThreads > 1.  Without ``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent.

The socket is the unpatched stdlib one: the Master has no gevent hub and must not make one, and a
datagram to a local socket does not wait (it is sent non-blocking; a full queue drops it).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import List, Optional

import gevent.monkey

log = logging.getLogger("mmproxy.aservice")


def address(value: Optional[str]) -> Optional[bytes]:
    """The socket address for a ``$NOTIFY_SOCKET`` value: ``/path`` as it is, ``@name`` as the
    abstract name ``\\0name``; None for nothing or a kind not supported here (``vsock:``)."""
    if not value:
        return None
    raw = os.fsencode(value)
    if raw.startswith(b"@"):
        return b"\0" + raw[1:]
    if raw.startswith(b"/"):
        return raw
    return None


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (e.g. ``"READY=1"``, ``"STATUS=..."``) as one message to
    ``$NOTIFY_SOCKET``.  True when sent; False when there is no socket to tell or sending failed
    (logged at debug level: a daemon does not stop serving because its manager cannot hear)."""
    target = address(os.environ.get("NOTIFY_SOCKET"))
    if target is None or not assignments:
        return False
    sock = gevent.monkey.get_original("socket", "socket")(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.sendto("\n".join(assignments).encode() + b"\n", target)
        return True
    except OSError as e:
        log.debug("sd_notify %s to %r failed: %s", assignments, target, e)
        return False
    finally:
        sock.close()


def reloading() -> List[str]:
    """The assignments that announce a refresh: RELOADING=1 and the CLOCK_MONOTONIC time in µs."""
    return ["RELOADING=1", "MONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)]
