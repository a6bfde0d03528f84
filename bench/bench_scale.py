"""hubd at 10 to 100,000 cached entries (#15 item 3): start-up, resolve latency, list, status, inotify watches.

    .venv/bin/python bench/bench_scale.py [--entries 10,1000,10000,100000] [--resolves 1000]

For each size, writes a cache under the system temp dir the way publishes leave it (an object of one file, its
meta, its ref and its users record per entry; no downloads, no index), then runs real `hubd serve` processes
on it (offline, tfhub_modules/ view off: relinking 100,000 entries' views is the first start's background work,
not what is measured here):

- first start: the daemon builds the index from the files (seconds per 10,000 entries; once per cache);
- start-up: a second `hubd serve` from its launch until GET /v1/health answers;
- resolve p50/p99: `--resolves` POST /v1/resolve of cached handles drawn at random from the whole cache, one
  at a time over the Unix socket;
- first page of GET /v1/models (limit=100) and GET /v1/status: median of 5;
- the inotify watches the daemon holds after those resolves, as the kernel counts them (/proc/PID/fdinfo);
- `hubd rm`: DELETE /v1/models/{id} of 5 entries drawn at random, as root (an admin), median.

Prints a Markdown table; writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "client")]

from hubd.config import Settings  # noqa: E402
from tests.daemon import Daemon, start_daemon  # noqa: E402
from tests.test_scale import watches, write_entries  # noqa: E402

ENV = {"HUBD_OFFLINE": "1", "HUBD_TFHUB_VIEW": "0", "HUBD_FSYNC": "0"}


def timed_start(settings: Settings, workdir: Path) -> tuple[Daemon, float]:
    """A daemon, and the seconds from its launch until /v1/health answered."""
    started = time.perf_counter()
    daemon = start_daemon(settings, workdir, env_extra=ENV)
    reply = daemon.request("GET", "/v1/health")
    assert reply.status == 200, reply.body
    return daemon, time.perf_counter() - started


def median_ms(daemon: Daemon, path: str, runs: int = 5) -> float:
    return statistics.median(timed_ms(daemon, "GET", path) for _ in range(runs))


def timed_ms(daemon: Daemon, method: str, path: str) -> float:
    started = time.perf_counter()
    reply = daemon.request(method, path)
    elapsed = time.perf_counter() - started
    assert reply.status == 200, reply.body
    return elapsed * 1000


def measure(entries: int, resolves: int, tmp: Path) -> dict[str, float]:
    workdir = tmp / f"n{entries}"
    workdir.mkdir()
    settings = Settings(cache_dir=workdir / "cache", offline=True, fsync=False)
    users = {1000: range(0, entries, 2), 1001: range(0, entries, 3)}
    started = time.perf_counter()
    digests = write_entries(settings.cache_dir, entries, users)
    figures = {"entries": entries, "write_s": time.perf_counter() - started}
    first, figures["first_start_s"] = timed_start(settings, workdir)
    first.stop()
    daemon, figures["start_s"] = timed_start(settings, workdir)
    try:
        rng = random.Random(15)
        latencies = []
        for _ in range(resolves):
            handle = f"https://tfhub.dev/scale/model-{rng.randrange(entries)}/1"
            began = time.perf_counter()
            reply = daemon.request("POST", "/v1/resolve", {"handle": handle})
            latencies.append(time.perf_counter() - began)
            assert reply.status == 200, reply.body
        latencies.sort()
        figures["resolve_p50_ms"] = latencies[len(latencies) // 2] * 1000
        figures["resolve_p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000
        figures["list_ms"] = median_ms(daemon, "/v1/models?limit=100")
        figures["status_ms"] = median_ms(daemon, "/v1/status")
        figures["watches"] = watches(daemon)
        doomed = rng.sample(digests, min(5, len(digests)))
        figures["rm_ms"] = statistics.median(timed_ms(daemon, "DELETE", f"/v1/models/{d}") for d in doomed)
    finally:
        daemon.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", default="10,1000,10000,100000")
    parser.add_argument("--resolves", type=int, default=1000)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="hubd-bench-scale-") as tmp:
        for entries in (int(n) for n in args.entries.split(",")):
            results.append(measure(entries, args.resolves, Path(tmp)))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(
        "\n| entries | first start (index build) | start-up | resolve p50 | resolve p99 | list, first page | "
        "status | inotify watches | rm |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['entries']:,} | {r['first_start_s']:.2f} s | {r['start_s']:.2f} s "
            f"| {r['resolve_p50_ms']:.2f} ms | {r['resolve_p99_ms']:.2f} ms | {r['list_ms']:.1f} ms "
            f"| {r['status_ms']:.1f} ms | {r['watches']} | {r['rm_ms']:.1f} ms |"
        )
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
