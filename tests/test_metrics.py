"""/metrics as Prometheus reads it: parsed with prometheus_client's own parser from a real daemon."""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubd import __version__
from hubd.config import Settings
from hubd.engine import Engine
from hubd.server.metrics import Metrics
from tests.conftest import REPO, Upstream
from tests.daemon import Daemon, start_daemon

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def daemon(settings: Settings, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(settings, tmp_path, "--mirror-listen", "127.0.0.1:0")
    yield d
    d.stop()


def scrape(daemon: Daemon) -> tuple[Samples, dict[str, str]]:
    """{(sample name, labels): value}, and {family name: type}."""
    reply = daemon.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(reply.body.decode()))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return samples, {f.name: f.type for f in families}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_requests_count_by_method_route_template_and_code(daemon: Daemon, upstream: Upstream) -> None:
    entry = daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{upstream.publish('reusable')}"})
    model = entry.json()["id"]
    before, _ = scrape(daemon)
    assert daemon.request("GET", f"/v1/models/{model}").status == 200
    assert daemon.request("GET", f"/v1/models/{model[:12]}").status == 200
    assert daemon.request("DELETE", f"/v1/models/{'0' * 64}").status == 404
    assert daemon.request("GET", "/no/such/route").status == 404
    after, types = scrape(daemon)
    assert types["hubd_requests"] == "counter"

    def grew(**labels: str) -> float:
        return value(after, "hubd_requests_total", **labels) - value(before, "hubd_requests_total", **labels)

    assert grew(method="GET", route="/v1/models/{id}", code="200") == 2
    assert grew(method="DELETE", route="/v1/models/{id}", code="404") == 1
    assert grew(method="GET", route="unmatched", code="404") == 1
    assert value(after, "hubd_requests_total", method="POST", route="/v1/resolve", code="200") == 1
    assert not any(name == "hubd_requests_total" and model in str(labels) for name, labels in after)


def test_cache_fetch_and_byte_metrics_follow_resolves(daemon: Daemon, upstream: Upstream) -> None:
    first, types = scrape(daemon)
    assert value(first, "hubd_cache_entries") == 0 and value(first, "hubd_fetch_duration_seconds_count") == 0
    via_mirror = upstream.publish("reusable")
    for _ in range(2):
        daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{via_mirror}"})
    daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{upstream.publish('text_embedding')}"})
    samples, types = scrape(daemon)

    assert value(samples, "hubd_cache_hits_total") == 1
    assert value(samples, "hubd_cache_misses_total") == 2
    fetched = len(upstream.models["reusable"]) + len(upstream.models["text_embedding"])
    assert value(samples, "hubd_fetched_bytes_total", source="mirror") == fetched
    assert value(samples, "hubd_fetched_bytes_total", source="upstream") == 0
    assert value(samples, "hubd_fetched_bytes_total", source="spool") == 0
    assert types["hubd_fetch_duration_seconds"] == "histogram"
    assert value(samples, "hubd_fetch_duration_seconds_count") == 2
    assert value(samples, "hubd_fetch_duration_seconds_bucket", le="+Inf") == 2
    assert value(samples, "hubd_fetch_duration_seconds_sum") > 0
    models = daemon.request("GET", "/v1/models").json()["models"]
    assert value(samples, "hubd_cache_entries") == 2
    assert value(samples, "hubd_cache_bytes") == sum(m["size_bytes"] for m in models)
    assert types["hubd_cache_entries"] == types["hubd_cache_bytes"] == "gauge"


def test_bytes_from_a_server_other_than_the_mirror_count_as_upstream(
    settings: Settings, tmp_path: Path, upstream: Upstream
) -> None:
    direct = settings.model_copy(update={"mirror": None, "http_hosts": [upstream.server.url.split("//")[1]]})
    daemon = start_daemon(direct, tmp_path)
    try:
        daemon.request("POST", "/v1/resolve", {"handle": upstream.handle(upstream.publish("reusable"))})
        samples, _ = scrape(daemon)
    finally:
        daemon.stop()
    assert value(samples, "hubd_fetched_bytes_total", source="upstream") == len(upstream.models["reusable"])
    assert value(samples, "hubd_fetched_bytes_total", source="mirror") == 0


def test_lan_mirror_counts_the_bytes_it_serves(daemon: Daemon, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{path}"})
    host, port = daemon.mirrors[0].removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", f"/{path}?tf-hub-format=compressed")
    served = len(conn.getresponse().read())
    conn.close()
    samples, _ = scrape(daemon)
    assert served > 0 and value(samples, "hubd_mirror_served_bytes_total") == served


def test_verify_runs_build_info_and_process_metrics(daemon: Daemon, upstream: Upstream) -> None:
    daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{upstream.publish('reusable')}"})
    daemon.request("POST", "/v1/verify", {})
    samples, types = scrape(daemon)
    assert value(samples, "hubd_verify_runs_total") == 1
    assert value(samples, "hubd_build_info", version=__version__) == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "process_open_fds") > 0
    assert types["process_cpu_seconds"] == "counter"
    dashboard = (REPO / "docs" / "grafana-dashboard.json").read_text()
    shown = {name for name, _ in samples}
    assert set(re.findall(r"\b(?:hubd|process)_[a-z_]+", dashboard)) <= shown


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    """Two daemons' apps in one process (as in tests) neither clash on registration nor share counts."""
    engines = [Engine(Settings(cache_dir=tmp_path / str(n))) for n in range(2)]
    first, second = (Metrics(engine) for engine in engines)
    first.observe_request("GET", "/v1/health", 200)
    parsed = [
        {s.name: s.value for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
        for m in (first, second)
    ]
    assert parsed[0]["hubd_requests_total"] == 1
    assert "hubd_requests_total" not in parsed[1]
