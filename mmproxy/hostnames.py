"""Client host names: reverse DNS, forward-confirmed, cached, never blocking the hub.

One place for every use: the access filters' host-name patterns and wildcards (``TCPAccess``,
``TCPAccessAttr``), ``ClientLookup`` (which starts the lookup for every client at connect) and
SMTP's ``XCLIENT NAME``.  ``socket.gethostbyaddr`` and ``getaddrinfo`` are gevent's after
``patch_all()``: its default (thread) resolver runs the libc call on the hub's thread pool, so a
slow DNS server delays only the session waiting for its answer, and that wait ends after
LOOKUP_TIMEOUT (the name is then unknown).  Answers are cached per worker process in bounded
``TTLCache``s, and concurrent lookups of one address share one request.
"""
from __future__ import annotations

import logging
import socket
from typing import Dict

import gevent
from cachetools import TTLCache
from gevent.event import AsyncResult

from mmproxy.access import HostName
from mmproxy.addresses import address_key, is_host_name

LOOKUP_TIMEOUT = 5.0      # seconds for the reverse and the forward lookup together
CACHE_SIZE = 10000        # addresses remembered
CACHE_TTL = 600           # seconds an answer (a name, or none) is remembered
TIMEOUT_TTL = 30          # seconds a lookup that timed out is remembered (a dead DNS costs one wait)

log = logging.getLogger(__name__)

_answers: TTLCache = TTLCache(CACHE_SIZE, CACHE_TTL)
_timeouts: TTLCache = TTLCache(CACHE_SIZE, TIMEOUT_TTL)
_pending: Dict[str, AsyncResult] = {}


def lookup(ip: str) -> HostName:
    """The forward-confirmed host name of the address ``ip`` (waits at most LOOKUP_TIMEOUT)."""
    key = address_key(ip)
    hit = _answers.get(key) or _timeouts.get(key)
    if hit is not None:
        return hit
    name = _start(key).get()
    assert isinstance(name, HostName)      # _run always sets one
    return name


def prefetch(ip: str) -> None:
    """Start the lookup of ``ip`` (ClientLookup) without waiting; ``lookup`` later gets the answer."""
    key = address_key(ip)
    if key not in _answers and key not in _timeouts:
        _start(key)


def xclient_name(ip: str) -> str:
    """SMTP ``XCLIENT NAME``: the confirmed name, ``[TEMPUNAVAIL]`` after a timeout, else
    ``[UNAVAILABLE]`` (Postfix's XCLIENT_README)."""
    name = lookup(ip)
    if name.status == "ok":
        return name.name
    return "[TEMPUNAVAIL]" if name.status == "timeout" else "[UNAVAILABLE]"


def clear() -> None:
    """Forget every answer (tests)."""
    _answers.clear()
    _timeouts.clear()


def _start(key: str) -> AsyncResult:
    pending = _pending.get(key)
    if pending is None:
        # a greenlet of its own: a session killed while it waits cannot leave the others waiting
        pending = _pending[key] = AsyncResult()
        gevent.spawn(_run, key, pending)
    return pending


def _run(key: str, pending: AsyncResult) -> None:
    name = HostName("none")        # whatever happens, the waiters get an answer
    try:
        name = _resolve(key)
        (_timeouts if name.status == "timeout" else _answers)[key] = name
    finally:
        _pending.pop(key, None)
        pending.set(name)


def _resolve(ip: str) -> HostName:
    """Reverse, then forward: a name is confirmed only when it maps back to the address (a PTR
    record alone is whatever the owner of the address's reverse zone claims)."""
    try:
        with gevent.Timeout(LOOKUP_TIMEOUT):
            try:
                name = socket.gethostbyaddr(ip)[0].rstrip(".").lower()
            except (OSError, UnicodeError, ValueError):
                return HostName("none")
            if not is_host_name(name):
                log.debug("reverse DNS of %s is not a host name: %r", ip, name[:100])
                return HostName("none")
            try:
                infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)
            except (OSError, UnicodeError, ValueError):
                infos = []
    except gevent.Timeout:
        return HostName("timeout")
    if ip in {address_key(str(ai[4][0])) for ai in infos}:
        return HostName("ok", name)
    log.debug("reverse DNS of %s gives %s, which does not map back to it", ip, name)
    return HostName("spoofed", name)
