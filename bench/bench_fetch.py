"""Cold fetch, concurrency and memory: hubd vs tensorflow_hub vs `curl | tar -xz`, side by side in one run.

    .venv/bin/python bench/bench_fetch.py [--sizes 50,400] [--clients 8] [--repeat 3]

Builds SavedModels of random float32 weights (nearly incompressible, like real weights) with TensorFlow,
serves them from the tests' hosting-protocol server on 127.0.0.1, and runs each contender as a fresh process
with an empty cache. Prints a Markdown table of medians and ratios; writes bench/results/fetch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.hosting import HostingServer  # noqa: E402

HUBD_SCRIPT = """
import asyncio, json, sys, time
from hubd.config import Settings
from hubd.engine import Engine
async def main():
    engine = Engine(Settings(cache_dir=sys.argv[1], mirror=sys.argv[2], http_hosts=["127.0.0.1"]))
    await engine.start()
    start = time.perf_counter()
    entry = await engine.resolve(sys.argv[3])
    took = time.perf_counter() - start
    hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps({"resolve_s": took, "path": entry.path, "peak_rss_mib": hwm}))
    await engine.close()
asyncio.run(main())
"""

TFHUB_SCRIPT = """
import json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
start = time.perf_counter()
import tensorflow_hub as hub
imported = time.perf_counter()
path = hub.resolve(sys.argv[1])
took = time.perf_counter() - imported
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"import_s": imported - start, "resolve_s": took, "path": path, "peak_rss_mib": hwm}))
"""


def build_models(sizes: list[int], cache: Path) -> dict[int, bytes]:
    missing = [mb for mb in sizes if not (cache / f"large_{mb}mb.tar.gz").exists()]
    if missing:
        args = [sys.executable, str(REPO / "tests" / "model_factory.py"), str(cache), "--only-large"]
        for mb in missing:
            args += ["--large-mb", str(mb)]
        subprocess.run(args, check=True, capture_output=True)
    return {mb: (cache / f"large_{mb}mb.tar.gz").read_bytes() for mb in sizes}


def timed(cmd: list[str], env: dict[str, str] | None = None, shell: bool = False) -> dict[str, Any]:
    """Run a process; wall time and its JSON output (which reports its own peak RSS: VmHWM, reset at exec)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd if not shell else cmd[0], env=env, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, status, _usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed: {err[-2000:]}")
    # ru_maxrss is no use here: Linux carries the parent's high-water mark across fork+exec.
    result: dict[str, Any] = {"wall_s": wall}
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if last.startswith("{"):
        result.update(json.loads(last))
    return result


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "TFHUB_"))}
    env.update(extra)
    return env


def cold_fetch(server: HostingServer, path: str, repeat: int, work: Path) -> dict[str, list[dict[str, Any]]]:
    url = f"{server.url}/{path}"
    results: dict[str, list[dict[str, Any]]] = {"hubd": [], "tensorflow_hub": [], "curl | tar -xz": []}
    for i in range(repeat):
        for name in results:
            target = work / f"{name.split()[0]}-{i}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            if name == "hubd":
                cmd = [sys.executable, "-c", HUBD_SCRIPT, str(target), server.url, f"https://tfhub.dev/{path}"]
                results[name].append(timed(cmd, env_for(PYTHONPATH=str(REPO))))
            elif name == "tensorflow_hub":
                cmd = [sys.executable, "-c", TFHUB_SCRIPT, url]
                results[name].append(timed(cmd, env_for(TFHUB_CACHE_DIR=str(target))))
            else:
                pipe = f"curl -sf '{url}?tf-hub-format=compressed' | tar -xz -C '{target}'"
                results[name].append(timed([pipe], shell=True))
            shutil.rmtree(target, ignore_errors=True)
    return results


def concurrent_cold(server: HostingServer, path: str, clients: int, work: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in ("hubd", "tensorflow_hub"):
        server.reset_counts()
        cache = work / f"concurrent-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        if name == "hubd":
            cmd = [sys.executable, "-c", HUBD_SCRIPT, str(cache), server.url, f"https://tfhub.dev/{path}"]
            env = env_for(PYTHONPATH=str(REPO))
        else:
            cmd = [sys.executable, "-c", TFHUB_SCRIPT, f"{server.url}/{path}"]
            env = env_for(TFHUB_CACHE_DIR=str(cache))
        start = time.perf_counter()
        procs = [
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(clients)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(
                f"{name}: a client failed: {procs[codes.index(next(c for c in codes if c))].stderr}"
            )
        out[name] = {
            "wall_s": time.perf_counter() - start,
            "upstream_bytes": server.bytes_sent[path],
            "archive_bytes": len(server.archives[path]),
        }
        shutil.rmtree(cache, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="50,400")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    models = build_models(sizes, REPO / "bench" / ".models")
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    with HostingServer() as server, tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        work = Path(tmp)
        rows = []
        for mb, archive in models.items():
            path = f"bench/large-{mb}mb/1"
            server.add(path, archive)
            runs = cold_fetch(server, path, args.repeat, work)
            report[f"cold_{mb}mb"] = runs
            med = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()}
            inproc = {
                name: statistics.median(r.get("resolve_s", r["wall_s"]) for r in rs) for name, rs in runs.items()
            }
            rss = {name: max(r.get("peak_rss_mib", 0.0) for r in rs) for name, rs in runs.items()}
            limit = med["curl | tar -xz"]
            rows.append(
                f"| cold fetch {len(archive) / 2**20:.0f} MiB archive | {inproc['hubd']:.2f} s "
                f"({med['hubd']:.2f} s whole process, {rss['hubd']:.0f} MiB peak RSS) | "
                f"{inproc['tensorflow_hub']:.2f} s "
                f"({med['tensorflow_hub']:.2f} s, {rss['tensorflow_hub']:.0f} MiB) | "
                f"{limit:.2f} s | hubd/limit {inproc['hubd'] / limit:.2f}x, "
                f"tensorflow_hub/hubd {inproc['tensorflow_hub'] / inproc['hubd']:.2f}x |"
            )
        smallest = min(models)
        path = f"bench/large-{smallest}mb/1"
        conc = concurrent_cold(server, path, args.clients, work)
        report["concurrent"] = conc
        rows.append(
            f"| {args.clients} concurrent cold clients, one handle ({smallest} MB) | "
            f"{conc['hubd']['upstream_bytes'] / conc['hubd']['archive_bytes']:.2f} archives upstream, "
            f"{conc['hubd']['wall_s']:.1f} s wall | "
            f"{conc['tensorflow_hub']['upstream_bytes'] / conc['tensorflow_hub']['archive_bytes']:.2f} archives, "
            f"{conc['tensorflow_hub']['wall_s']:.1f} s wall | - | "
            f"wall tensorflow_hub/hubd {conc['tensorflow_hub']['wall_s'] / conc['hubd']['wall_s']:.1f}x |"
        )
    print("| figure | hubd | tensorflow_hub | limit | ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "fetch.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
