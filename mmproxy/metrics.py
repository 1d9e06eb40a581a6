"""Prometheus metrics over HTTP (``MetricsAddress``, an mmproxy extension; off when unset).

Each process that serves sessions counts what happens in :mod:`mmproxy.stats` (the same counters
``mmproxy status`` shows).  A scrape asks every such process over its control socket (control.py)
and answers with the sum, so one scrape of the address gives the box's figures whichever worker
takes it: with ``NumThreads`` > 1 every worker listens on the address with SO_REUSEPORT, and each
one answers for all of them.  Instead of prometheus_client's multiprocess mode (its files on disk,
written at every increment) the counters stay plain integers in memory; the price is that a worker
that dies takes its counts with it (its replacement starts from zero, and the sum drops, which
Prometheus' ``rate()`` takes for a counter reset).

The HTTP side is gevent's WSGI server on the hub (never a thread) serving prometheus_client's
``make_wsgi_app`` over a registry with one collector; every path answers the metrics.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional

from gevent.pywsgi import WSGIServer
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from mmproxy import control, stats

log = logging.getLogger("mmproxy.metrics")

SCRAPE_TIMEOUT = 5.0       # seconds one process may take to answer a scrape's question


class Collector:
    """What a scrape shows: every serving process's status, added up."""

    def __init__(self, config_dir: str, instance: str = "") -> None:
        self.config_dir = config_dir
        self.instance = instance

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector interface: every family, the processes' figures added up."""
        answers = [a for _, a in control.ask(self.config_dir, {"cmd": "status"}, SCRAPE_TIMEOUT) if a.get("ok")]
        total = stats.combine([a["stats"] for a in answers])
        sessions: Dict[str, Dict[str, int]] = {}
        for a in answers:
            for service, row in a["sessions"].items():
                for state, n in row.items():
                    into = sessions.setdefault(service, {})
                    into[state] = into.get(state, 0) + n
        for family in families(total, sessions, len(answers)):
            if self.instance:
                family.samples = [s._replace(labels={"instance_name": self.instance, **s.labels})
                                  for s in family.samples]
            yield family


def families(snap: Dict[str, Any], sessions: Dict[str, Dict[str, int]], processes: int) -> List[Metric]:
    """The metric families of a combined stats snapshot and session counts (the collector labels
    every sample with ``instance_name``: InstanceName, else the host name)."""
    up = GaugeMetricFamily("mmproxy_processes", "Processes serving sessions that answered this scrape")
    up.add_metric([], processes)
    open_ = GaugeMetricFamily("mmproxy_sessions", "Open client sessions by service and state "
                              "(pre_login: before login, SMTP before EHLO; relaying: logged in)",
                              labels=["service", "state"])
    for service, row in sorted(sessions.items()):
        for state, n in sorted(row.items()):
            open_.add_metric([service, state], n)
    logins = CounterMetricFamily("mmproxy_logins", "Logins answered, by service and outcome (ok, or why they failed)",
                                 labels=["service", "outcome"])
    for service, row in sorted(snap.get("logins", {}).items()):
        for outcome, n in sorted(row.items()):
            logins.add_metric([service, outcome], n)
    refusals = CounterMetricFamily("mmproxy_refusals", "Connections or logins refused, or answers delayed, by reason "
                                   "(connlimits, tcpaccess, access_filter: TCPAccessAttr, badguys, "
                                   "proxy_protocol: ProxyProtocolPorts)",
                                   labels=["service", "reason"])
    for service, row in sorted(snap.get("refusals", {}).items()):
        for reason, n in sorted(row.items()):
            refusals.add_metric([service, reason], n)
    hits = CounterMetricFamily("mmproxy_directory_cache_hits", "Directory cache hits (ldap: entries; auth: PreAuth "
                               "results)", labels=["cache"])
    misses = CounterMetricFamily("mmproxy_directory_cache_misses", "Directory cache misses", labels=["cache"])
    for cache, row in sorted(snap.get("cache", {}).items()):
        hits.add_metric([cache], row["hits"])
        misses.add_metric([cache], row["misses"])
    relay = CounterMetricFamily("mmproxy_relay_bytes", "Bytes relayed after login, by service and direction",
                                labels=["service", "direction"])
    for service, row in sorted(snap.get("relayed_bytes", {}).items()):
        relay.add_metric([service, "client_to_store"], row["up"])
        relay.add_metric([service, "store_to_client"], row["down"])
    directory = _histogram("mmproxy_directory_request_seconds", "Directory (LDAP) requests: searches as BindDN, "
                           "binds as the user (failover included)", "op", snap.get("directory_seconds", {}))
    store = _histogram("mmproxy_store_login_seconds", "Logins at the store: connect, greeting, replayed login, "
                       "answer", "service", snap.get("store_seconds", {}))
    redis_rt = CounterMetricFamily("mmproxy_redis_requests", "Round trips to the fleet's Redis (StateRedisURL) by "
                                   "operation: admit (ConnLimits with the BadGuys sentence), penalty, add_penalty, "
                                   "release, forgive, login_record, writes (queued writes, pipelined), renew",
                                   labels=["op"])
    for op, n in sorted(snap.get("redis_requests", {}).items()):
        redis_rt.add_metric([op], n)
    return [up, open_, logins, refusals, hits, misses, relay, directory, store, redis_rt]


def _histogram(name: str, doc: str, label: str, table: Dict[str, Dict[str, Any]]) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=[label])
    for key, row in sorted(table.items()):
        buckets, seen = [], 0
        for bound, n in zip([*map(_bound, stats.BUCKETS), "+Inf"], row["counts"]):
            seen += n
            buckets.append((bound, seen))
        h.add_metric([key], buckets, row["sum"])
    return h


def _bound(b: float) -> str:
    return repr(float(b))


class MetricsServer:
    """The HTTP endpoint of one process: :meth:`open` binds (while still root, as the listeners),
    :meth:`start` serves on the hub, :meth:`close` stops."""

    def __init__(self, config_dir: str, instance: str = "") -> None:
        """``instance``: the value of every sample's ``instance_name`` label (none when empty)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(config_dir, instance))
        self.app = make_wsgi_app(registry)
        self.server: Optional[WSGIServer] = None

    def open(self, sock: Any) -> None:
        """Serve on ``sock``, a bound and listening socket."""
        self.server = WSGIServer(sock, self.app, log=None, error_log=log)

    def start(self) -> None:
        """Serve on the hub."""
        if self.server is not None:
            self.server.start()

    def close(self) -> None:
        """Stop serving (the process stops)."""
        if self.server is not None:
            self.server.close()
            self.server = None
