"""A small model's time-to-ready while a 10-model prefetch runs, against its time on an idle daemon (#13 item 6).

    .venv/bin/python bench/bench_priority.py [--large-mb 20] [--repeat 5] [--rate-mib 0] [--no-fsync]

Builds SavedModels with TensorFlow (tests/model_factory.py) and runs a real `hubd serve` on its defaults
(HUBD_MAX_FETCHES=8, per user 4, prefetch concurrency 4). Each round: resolve a small model on the idle daemon (a
handle it has never seen, so a real fetch); then start a prefetch of 10 large models, wait until its first MiB
has gone out, and resolve another new small handle. `--rate-mib` caps each upstream stream (MiB/s; 0: as fast as
loopback goes), as a real network would. Prints medians and the ratio; writes bench/results/priority.json.

The large and the small models come from two hosting-protocol servers (tests/hosting.py), each in a process of
its own, as two upstreams are: with both in this process, the server thread pushing four large streams held the
GIL that the small model's server (and this process's timing thread) waited for, and a trace showed 20-30 ms of
the small model's time spent between hubd's request and the upstream's headers, which no daemon can change.
"""

from __future__ import annotations

import argparse
import json
import queue
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

UPSTREAM = r"""
import sys
sys.path.insert(0, sys.argv[1])
from tests.hosting import Behaviour, HostingServer
archive, paths, rate = open(sys.argv[2], "rb").read(), sys.argv[3].split(","), float(sys.argv[4])
report_at = int(sys.argv[5])
server = HostingServer().start()
behaviour = Behaviour(throttle_chunk=256 * 1024, throttle_delay=0.25 / rate) if rate else None
for path in paths:
    server.add(path, archive, behaviour)
count, reported = server._count, set()
def report(path, size):
    count(path, size)
    if path not in reported and server.bytes_sent[path] >= report_at:
        reported.add(path)
        print("sent", path, flush=True)
server._count = report
print("url", server.url, flush=True)
sys.stdin.read()  # serve until the bench closes our stdin
server.stop()
"""


class Upstream:
    """A hosting-protocol server in a child process, serving `archive` at each of `paths`."""

    def __init__(self, archive: Path, paths: list[str], rate_mib: float, report_at: int = 1 << 20) -> None:
        """`report_at`: a path is reported (on `sent`) once this many of its bytes have gone out."""
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                UPSTREAM,
                str(REPO),
                str(archive),
                ",".join(paths),
                str(rate_mib),
                str(report_at),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        kind, self.url = self.proc.stdout.readline().split()
        assert kind == "url", kind
        self.sent: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.sent.put(line.split()[1])

    def handle(self, path: str) -> str:
        return f"{self.url}/{path}"

    def host(self) -> str:
        return self.url.split("://", 1)[1]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def build(out: Path, large_mb: int) -> dict[str, Path]:
    if not (out / f"large_{large_mb}mb.tar.gz").exists() or not (out / "reusable.tar.gz").exists():
        cmd = [sys.executable, str(REPO / "tests" / "model_factory.py"), str(out), "--large-mb", str(large_mb)]
        subprocess.run(cmd, check=True, capture_output=True)
    return {"small": out / "reusable.tar.gz", "large": out / f"large_{large_mb}mb.tar.gz"}


def time_to_ready(d: Daemon, handle: str) -> float:
    start = time.perf_counter()
    reply = d.request("POST", "/v1/resolve", {"handle": handle})
    took = time.perf_counter() - start
    assert reply.status == 200, reply.body
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large-mb", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rate-mib", type=float, default=0.0)
    parser.add_argument("--no-fsync", action="store_true", help="HUBD_FSYNC=0: leave the disk's share out")
    parser.add_argument(
        "--after-mib",
        type=float,
        default=1.0,
        help="resolve the small model once this many MiB of one large model have gone out: 1 (the default) lands "
        "in the prefetch's start-up burst, half the large model's size in its steady state",
    )
    parser.add_argument(
        "--daemon-cpus",
        help="run the daemon alone on these CPUs (taskset list, e.g. 0,1): a small workstation whose upstreams "
        "run elsewhere; run the bench itself on the other CPUs (taskset -c 2-15 python ...)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hubd-bench-priority-", dir="/tmp"))
    models = build(Path("/tmp/hubd-bench-models"), args.large_mb)
    rounds = range(args.repeat)
    small_paths = [f"small{i}/model/1" for i in range(2 * args.repeat + 1)]
    large_paths = [[f"large{r}-{i}/model/1" for i in range(10)] for r in rounds]
    small = Upstream(models["small"], small_paths, 0.0)
    report_at = int(args.after_mib * (1 << 20))
    large = Upstream(models["large"], [p for batch in large_paths for p in batch], args.rate_mib, report_at)
    alone: list[float] = []
    busy: list[float] = []
    prefetch_s: list[float] = []
    try:
        settings = Settings(cache_dir=work / "cache", http_hosts=[small.host(), large.host()])
        env = {"HUBD_FSYNC": "0"} if args.no_fsync else None
        cpus = args.daemon_cpus
        d = start_daemon(
            settings, work, env_extra=env, wrap=(lambda cmd: ["taskset", "-c", cpus, *cmd]) if cpus else None
        )
        try:
            fresh = iter(small_paths)
            time_to_ready(d, small.handle(next(fresh)))  # warm-up: imports, first connection
            for r in rounds:
                alone.append(time_to_ready(d, small.handle(next(fresh))))
                manifest = {"model": [{"handle": large.handle(p)} for p in large_paths[r]]}
                result: dict[str, Any] = {}

                def run_prefetch(body: dict[str, Any] = manifest, out: dict[str, Any] = result) -> None:
                    t0 = time.perf_counter()
                    out["reply"] = d.request("POST", "/v1/prefetch", body)
                    out["seconds"] = time.perf_counter() - t0

                thread = threading.Thread(target=run_prefetch)
                thread.start()
                assert large.sent.get(timeout=60) in large_paths[r]  # the prefetch is well under way
                busy.append(time_to_ready(d, small.handle(next(fresh))))
                thread.join()
                assert result["reply"].ndjson()[-1]["ok"] == 10
                prefetch_s.append(result["seconds"])
                while not large.sent.empty():
                    large.sent.get_nowait()
                handles = {large.handle(p).split("://", 1)[1] for p in large_paths[r]}
                for model_id in _ids_of(d, handles):  # the next round fetches for real again
                    d.request("DELETE", f"/v1/models/{model_id}")
        finally:
            d.stop()
    finally:
        small.close()
        large.close()
    figures = {
        "large_mb": args.large_mb,
        "rate_mib_per_stream": args.rate_mib or None,
        "fsync": not args.no_fsync,
        "daemon_cpus": args.daemon_cpus,
        "after_mib": args.after_mib,
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


def _ids_of(d: Daemon, names: set[str]) -> set[str]:
    """The models those canonical names name (the ten archives are alike: one content-addressed entry)."""
    return {str(m["id"]) for m in d.request("GET", "/v1/models").json()["models"] if names & set(m["handles"])}


if __name__ == "__main__":
    main()
