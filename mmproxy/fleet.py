"""Control requests to every proxy of a fleet, through the Redis they share (``StateRedisURL``).

Every process that serves sessions, on every box, subscribes to the channel ``<prefix>control``.
A command (``mmproxy flush``, ``kick``, ``who --all``, ``status --all``) publishes
``{"request": {...}, "reply": "<prefix>reply:<token>"}`` there: PUBLISH answers how many processes
received it, each answers the request as its control socket would (:class:`control.Control`),
adding its ``instance_name`` (InstanceName), and pushes the answer on the reply list; the command
waits for that many answers, at most ANSWER_WAIT seconds.

Whoever can publish on that Redis can ask these (who is logged in; kick; flush): protect it with
a password and TLS (rediss://), as the README says.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

import gevent
import gevent.event
import redis

from mmproxy import redisstate

log = logging.getLogger("mmproxy.fleet")

ANSWER_WAIT = 5.0            # seconds a command waits for the fleet's answers
HEALTH_EVERY = 10.0          # seconds between PINGs on a quiet subscription; 3 unanswered: resubscribe
REPLY_TTL = 60               # seconds an answer list is kept if its asker is gone
MAX_MESSAGE = 64 * 1024      # octets of a request message a process reads


def instance_name(aservice: Any) -> str:
    """This proxy's name in the fleet: InstanceName, else the host name."""
    return str(aservice.InstanceName or socket.gethostname())


def channel(prefix: str) -> str:
    return prefix + "control"


class Subscriber:
    """One serving process's subscription: answers the fleet's requests with ``control``
    (a control.Control), as ``instance``; resubscribes after PROBE_EVERY when Redis is gone."""

    def __init__(self, url: str, prefix: str, ca_file: Optional[str], control: Any, instance: str) -> None:
        self.url, self.prefix, self.ca_file = url, prefix, ca_file
        self.control, self.instance = control, instance
        self._greenlet: Optional[gevent.Greenlet] = None
        self.subscribed = gevent.event.Event()

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._serve_forever)

    def close(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def _serve_forever(self) -> None:
        down = False
        while True:
            r = redisstate.client(self.url, self.ca_file, timeout=None, pool_size=2)
            try:
                sub = r.pubsub(ignore_subscribe_messages=True)
                sub.subscribe(channel(self.prefix))
                self.subscribed.set()
                if down:
                    log.warning("fleet: subscribed again to %s on %s", channel(self.prefix),
                                redisstate.redacted(self.url))
                    down = False
                heard = time.monotonic()        # a connection lost without a word must be noticed
                while True:
                    message = sub.get_message(timeout=HEALTH_EVERY)
                    if message is not None:
                        heard = time.monotonic()
                        if message.get("type") == "message":
                            self._answer(r, message["data"])
                        continue
                    if time.monotonic() - heard > 3 * HEALTH_EVERY:
                        raise redis.ConnectionError("no answer to PING for %gs" % (3 * HEALTH_EVERY))
                    sub.ping()
            except Exception as e:              # whatever the client library raises: subscribe again
                self.subscribed.clear()
                if not down:
                    log.warning("fleet: Redis at %s does not answer (%s: %s): flush, kick and --all requests do "
                                "not reach this process until it does", redisstate.redacted(self.url),
                                type(e).__name__, e)
                    down = True
            finally:
                r.connection_pool.disconnect()
            gevent.sleep(redisstate.PROBE_EVERY)

    def _answer(self, r: redis.Redis, data: Any) -> None:
        """Answer one published request (anything that is not one is ignored)."""
        try:
            if len(data) > MAX_MESSAGE:
                return
            message = json.loads(data)
            request, reply = message["request"], message["reply"]
        except (ValueError, TypeError, KeyError):
            return
        if not isinstance(reply, str) or not reply.startswith(self.prefix + "reply:") or len(reply) > 200:
            return
        try:
            answer = dict(self.control.answer(request), instance_name=self.instance)
        except Exception as e:                   # a fault of ours must not end the subscription
            log.error("fleet: %s request failed: %s: %s", str(request.get("cmd") if isinstance(request, dict)
                                                             else "?")[:40], type(e).__name__, e)
            answer = {"ok": False, "error": "internal error: %s" % type(e).__name__, "instance_name": self.instance}
        try:
            pipe = r.pipeline(transaction=False)
            pipe.rpush(reply, json.dumps(answer))
            pipe.expire(reply, REPLY_TTL)
            pipe.execute()
        except redisstate.TROUBLE as e:
            log.warning("fleet: answer to %s not delivered: %s", request.get("cmd") if isinstance(request, dict)
                        else "?", e)


def ask(url: str, prefix: str, ca_file: Optional[str], request: Dict[str, Any],
        wait: float = ANSWER_WAIT) -> Tuple[List[Tuple[str, Dict[str, Any]]], int, int]:
    """Publish ``request`` to every process of the fleet and collect their answers:
    ([(``instance/worker``, answer)], how many processes received it, how many hold a lease).
    Fewer answers than receivers means some did not answer within ``wait`` seconds; fewer
    receivers than leases, that some lost their subscription.  redis.RedisError when Redis cannot
    be reached (within REDIS_TIMEOUT x 4: a hung Redis is not waited for)."""
    quick = redisstate.client(url, ca_file, timeout=4 * redisstate.REDIS_TIMEOUT, pool_size=1)
    try:
        leases = sum(1 for _ in quick.scan_iter(match=prefix + "alive:*", count=1000))
    finally:
        quick.connection_pool.disconnect()
    r = redisstate.client(url, ca_file, timeout=wait + 2, pool_size=1)
    try:
        reply = "%sreply:%s" % (prefix, os.urandom(8).hex())
        n = int(r.publish(channel(prefix), json.dumps({"request": request, "reply": reply})))
        out: List[Tuple[str, Dict[str, Any]]] = []
        deadline = time.monotonic() + wait
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            item = r.blpop([reply], timeout=max(0.01, left))
            if item is None:
                break
            answer = json.loads(item[1])
            worker = answer.get("worker")
            out.append(("%s/%s" % (answer.get("instance_name", "?"), "main" if worker is None else "w%s" % worker),
                        answer))
        r.delete(reply)
        return out, n, leases
    finally:
        r.connection_pool.disconnect()
