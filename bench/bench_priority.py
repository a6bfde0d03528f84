"""A small model's time-to-ready while a 10-model prefetch runs, against its time on an idle daemon (#13 item 6).

    .venv/bin/python bench/bench_priority.py [--large-mb 20] [--repeat 5] [--rate-mib 0]

Builds SavedModels with TensorFlow (tests/model_factory.py), serves them from the tests' hosting-protocol server on
127.0.0.1, and runs a real `hubd serve` on its defaults (HUBD_MAX_FETCHES=8, per user 4, prefetch concurrency 4).
Each round: resolve a small model on the idle daemon (a handle it has never seen, so a real fetch); then start a
prefetch of 10 large models, wait until its first bytes flow, and resolve another new small handle. `--rate-mib`
caps each upstream stream (MiB/s; 0: as fast as loopback goes), as a real network would. Prints medians and the
ratio; writes bench/results/priority.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hubd.config import Settings  # noqa: E402
from tests.daemon import Daemon, start_daemon  # noqa: E402
from tests.hosting import Behaviour, HostingServer  # noqa: E402

_paths = itertools.count()


def build(out: Path, large_mb: int) -> dict[str, bytes]:
    if not (out / f"large_{large_mb}mb.tar.gz").exists() or not (out / "reusable.tar.gz").exists():
        cmd = [sys.executable, str(REPO / "tests" / "model_factory.py"), str(out), "--large-mb", str(large_mb)]
        subprocess.run(cmd, check=True, capture_output=True)
    return {
        "small": (out / "reusable.tar.gz").read_bytes(),
        "large": (out / f"large_{large_mb}mb.tar.gz").read_bytes(),
    }


def publish(server: HostingServer, data: bytes, behaviour: Behaviour | None = None) -> str:
    path = f"bench{next(_paths)}/model/1"
    server.add(path, data, behaviour)
    return path


def time_to_ready(d: Daemon, server: HostingServer, small: bytes) -> float:
    path = publish(server, small)
    start = time.perf_counter()
    reply = d.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{path}"})
    took = time.perf_counter() - start
    assert reply.status == 200, reply.body
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large-mb", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rate-mib", type=float, default=0.0)
    parser.add_argument("--no-fsync", action="store_true", help="HUBD_FSYNC=0: leave the disk's share out")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hubd-bench-priority-", dir="/tmp"))
    models = build(Path("/tmp/hubd-bench-models"), args.large_mb)
    throttle = Behaviour(throttle_chunk=256 * 1024, throttle_delay=0.25 / args.rate_mib) if args.rate_mib else None
    alone: list[float] = []
    busy: list[float] = []
    prefetch_s: list[float] = []
    with HostingServer() as server:
        settings = Settings(cache_dir=work / "cache", mirror=server.url, http_hosts=["127.0.0.1"])
        d = start_daemon(settings, work, env_extra={"HUBD_FSYNC": "0"} if args.no_fsync else None)
        try:
            time_to_ready(d, server, models["small"])  # warm-up: imports, first connection
            for _ in range(args.repeat):
                alone.append(time_to_ready(d, server, models["small"]))
                large = [publish(server, models["large"], throttle) for _ in range(10)]
                manifest = {"model": [{"handle": f"https://tfhub.dev/{p}"} for p in large]}
                result: dict[str, Any] = {}

                def run_prefetch(body: dict[str, Any] = manifest, out: dict[str, Any] = result) -> None:
                    t0 = time.perf_counter()
                    out["reply"] = d.request("POST", "/v1/prefetch", body)
                    out["seconds"] = time.perf_counter() - t0

                thread = threading.Thread(target=run_prefetch)
                thread.start()
                assert server.wait_any_sent(large, 1 << 20) is not None  # the prefetch is well under way
                busy.append(time_to_ready(d, server, models["small"]))
                thread.join()
                assert result["reply"].ndjson()[-1]["ok"] == 10
                prefetch_s.append(result["seconds"])
                for model_id in _ids_of(d, large):  # the next round fetches for real again
                    d.request("DELETE", f"/v1/models/{model_id}")
        finally:
            d.stop()
    figures = {
        "large_mb": args.large_mb,
        "rate_mib_per_stream": args.rate_mib or None,
        "repeat": args.repeat,
        "small_alone_s": statistics.median(alone),
        "small_during_prefetch_s": statistics.median(busy),
        "ratio": statistics.median(busy) / statistics.median(alone),
        "prefetch_of_10_s": statistics.median(prefetch_s),
        "alone_all": alone,
        "during_all": busy,
    }
    print("| small model, time to ready | median |")
    print("|---|---|")
    print(f"| idle daemon | {figures['small_alone_s'] * 1000:.0f} ms |")
    print(f"| during a 10 x {args.large_mb} MiB prefetch | {figures['small_during_prefetch_s'] * 1000:.0f} ms |")
    print(f"| ratio | {figures['ratio']:.2f}x |")
    print(f"(prefetch of 10 took {figures['prefetch_of_10_s']:.1f} s)")
    out = REPO / "bench" / "results" / "priority.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")


def _ids_of(d: Daemon, paths: list[str]) -> set[str]:
    """The models those handles name (the ten archives are alike, so they share one content-addressed entry)."""
    names = {f"tfhub.dev/{path}" for path in paths}
    return {str(m["id"]) for m in d.request("GET", "/v1/models").json()["models"] if names & set(m["handles"])}


if __name__ == "__main__":
    main()
