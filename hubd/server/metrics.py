"""Prometheus text exposition of the daemon's counters; plain code, no client library needed for a dozen lines."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from hubd.engine import Engine
from hubd.server.connections import ConnectionLimits


@dataclass
class Metrics:
    requests: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    fetch_seconds_sum: float = 0.0
    fetch_count: int = 0
    verify_runs: int = 0
    """Verifications started through the API (concurrent ones of one model share a run)."""

    def observe_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def render(self, engine: Engine, connections: ConnectionLimits | None = None) -> str:
        entries = engine.list_entries()
        lines = [
            "# HELP hubd_requests_total API requests by route and status.",
            "# TYPE hubd_requests_total counter",
        ]
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f'hubd_requests_total{{route="{route}",status="{status}"}} {count}')
        stats = engine.stats
        lines += [
            "# HELP hubd_cache_hits_total Resolves served from the cache.",
            "# TYPE hubd_cache_hits_total counter",
            f"hubd_cache_hits_total {stats['hits']}",
            "# HELP hubd_cache_misses_total Resolves that needed a fetch.",
            "# TYPE hubd_cache_misses_total counter",
            f"hubd_cache_misses_total {stats['misses']}",
            "# HELP hubd_fetched_bytes_total Archive bytes downloaded from upstream.",
            "# TYPE hubd_fetched_bytes_total counter",
            f"hubd_fetched_bytes_total {stats['bytes_fetched']}",
            "# HELP hubd_fetch_duration_seconds Time spent fetching, extracting and publishing.",
            "# TYPE hubd_fetch_duration_seconds summary",
            f"hubd_fetch_duration_seconds_sum {stats['fetch_seconds']:.6f}",
            f"hubd_fetch_duration_seconds_count {stats['fetches']}",
            "# HELP hubd_cache_entries Published models in the cache.",
            "# TYPE hubd_cache_entries gauge",
            f"hubd_cache_entries {sum(1 for e in entries if e.state == 'ok')}",
            "# HELP hubd_cache_broken_entries Models that failed verification and wait for a re-fetch.",
            "# TYPE hubd_cache_broken_entries gauge",
            f"hubd_cache_broken_entries {sum(1 for e in entries if e.state != 'ok')}",
            "# HELP hubd_cache_bytes Bytes of published models.",
            "# TYPE hubd_cache_bytes gauge",
            f"hubd_cache_bytes {sum(e.size_bytes for e in entries if e.state == 'ok')}",
        ]
        lines += [
            "# HELP hubd_verify_runs_total Verifications run for the API; concurrent ones of a model share one.",
            "# TYPE hubd_verify_runs_total counter",
            f"hubd_verify_runs_total {self.verify_runs}",
        ]
        if connections is not None:
            lines += [
                "# HELP hubd_connections_open API connections open now.",
                "# TYPE hubd_connections_open gauge",
                f"hubd_connections_open {connections.open}",
                "# HELP hubd_connections_refused_total Connections refused at a connection limit (503).",
                "# TYPE hubd_connections_refused_total counter",
                f"hubd_connections_refused_total {connections.refused}",
                "# HELP hubd_connections_timed_out_total Connections closed for sending their headers too slowly.",
                "# TYPE hubd_connections_timed_out_total counter",
                f"hubd_connections_timed_out_total {connections.timed_out}",
            ]
        return "\n".join(lines) + "\n"
