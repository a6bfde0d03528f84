"""The daemon's /metrics, through prometheus_client, in one registry per app (several apps share a test process).

Request counts and fetch durations are observed as they happen; what the engine already counts (hits, bytes by
source) and what the cache holds are read at scrape time by a collector, so there is one owner for each number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hubd import __version__
from hubd.engine import Engine
from hubd.server.connections import ConnectionLimits

#: A fetch takes from well under a second (a small model from a mirror) to most of an hour (GBs from upstream).
FETCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Everything /metrics shows for one daemon app."""

    def __init__(self, engine: Engine, connections: Callable[[], ConnectionLimits | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hubd_requests",
            "API requests by method, route template and HTTP status code.",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.fetch_duration = Histogram(
            "hubd_fetch_duration_seconds",
            "Time from a fetch's first request to its publish: download, extraction, verification.",
            buckets=FETCH_BUCKETS,
            registry=self.registry,
        )
        self.verify_runs = Counter(
            "hubd_verify_runs",
            "Verifications run for the API; concurrent ones of a model share one.",
            registry=self.registry,
        )
        Info("hubd_build", "The running hubd.", registry=self.registry).info({"version": __version__})
        ProcessCollector(registry=self.registry)
        self.registry.register(_EngineCollector(engine, connections))
        engine.fetch_observers.append(self.fetch_duration.observe)

    def observe_request(self, method: str, route: str, code: int) -> None:
        self.requests.labels(method, route, str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's counters and the cache's contents, read when scraped."""

    def __init__(self, engine: Engine, connections: Callable[[], ConnectionLimits | None]) -> None:
        self.engine = engine
        self.connections = connections

    def collect(self) -> Iterable[Metric]:
        stats = self.engine.stats
        yield _counter("hubd_cache_hits", "Resolves served from the cache.", stats.hits)
        yield _counter("hubd_cache_misses", "Resolves that needed a fetch.", stats.misses)
        fetched = CounterMetricFamily(
            "hubd_fetched_bytes", "Archive bytes fetched, by where they came from.", labels=["source"]
        )
        for source, size in sorted(stats.bytes_by_source().items()):  # a new source shows up by itself
            fetched.add_metric([source], size)
        yield fetched
        yield _counter(
            "hubd_mirror_served_bytes",
            "Archive bytes the LAN mirror listener (--mirror-listen) served to other machines.",
            stats.bytes_served_mirror,
        )
        if self.engine.started:  # before start-up has opened the cache there is nothing to count
            yield from self._cache_gauges()
        limits = self.connections()
        if limits is not None:
            yield GaugeMetricFamily("hubd_connections_open", "API connections open now.", value=limits.open)
            yield _counter(
                "hubd_connections_refused", "Connections refused at a connection limit (503).", limits.refused
            )
            yield _counter(
                "hubd_connections_timed_out",
                "Connections closed for sending their headers too slowly.",
                limits.timed_out,
            )

    def _cache_gauges(self) -> Iterable[Metric]:
        """From the index's totals (`Engine.counts`): a scrape costs the same at 10 entries as at 100,000."""
        counts = self.engine.counts()
        yield GaugeMetricFamily("hubd_cache_entries", "Published models in the cache.", value=counts.entries)
        yield GaugeMetricFamily(
            "hubd_cache_broken_entries",
            "Models that failed verification and wait for a re-fetch.",
            value=counts.broken,
        )
        yield GaugeMetricFamily("hubd_cache_bytes", "Bytes of published models.", value=counts.size_bytes)

    def describe(self) -> Iterable[Metric]:
        return []  # the families depend on the daemon (connections only behind a listener): not known up front


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
