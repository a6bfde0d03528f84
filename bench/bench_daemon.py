"""The daemon and client side by side with tensorflow_hub: warm resolves, throughput, memory, scale, load.

    .venv/bin/python bench/bench_daemon.py [--seconds 5] [--scale 10000]

Prints a Markdown table; writes bench/results/daemon.json. Needs bench/.models/large_400mb.tar.gz
(bench_fetch.py builds it) for the peak-RSS figure, and builds the small models itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "client")]

from hubd_client.handles import parse_handle  # noqa: E402

from hubd.config import Settings  # noqa: E402
from hubd.layout import open_cache  # noqa: E402
from hubd.store import ObjectMeta, Ref, Store  # noqa: E402
from hubd.tree import FileRecord, TreeListing  # noqa: E402
from tests.daemon import Daemon, start_daemon  # noqa: E402
from tests.hosting import HostingServer  # noqa: E402

ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "TFHUB_"))},
    "TF_CPP_MIN_LOG_LEVEL": "3",
}
ENV["PYTHONPATH"] = f"{REPO / 'client'}:{REPO}"


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def wall(cmd: list[str], env: dict[str, str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loadgen(daemon: Daemon, concurrency: int, seconds: float, body: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "loadgen.py"),
            str(daemon.socket_path),
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(seconds),
            "--body",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def fill_store(root: Path, count: int) -> None:
    """`count` tiny published entries, written through the Store as the engine would (fsync off: a bench)."""
    store = Store(root, fsync=False)
    open_cache(store)
    for i in range(count):
        staging = store.new_staging()
        tree = staging.tree
        tree.mkdir()
        payload = f"graph {i}".encode()
        (tree / "saved_model.pb").write_bytes(payload)
        import hashlib

        listing = TreeListing(
            files={"saved_model.pb": FileRecord(len(payload), hashlib.sha256(payload).hexdigest())}
        )
        handle = f"https://tfhub.dev/scale/model-{i}/1"
        source = parse_handle(handle)
        meta = ObjectMeta(listing.digest(), "0" * 64, len(payload), time.time(), listing, [source.canonical])
        store.publish(tree, meta)
        store.write_ref(
            source.ref_key, Ref(source.canonical, handle, meta.digest, meta.archive_sha256, time.time())
        )
        staging.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--scale", type=int, default=10_000)
    args = parser.parse_args()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    rows: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="hubd-bench-", dir=REPO / "bench"))
    models = work / "models"
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "model_factory.py"), str(models)],
        check=True,
        capture_output=True,
        env=ENV,
    )
    large = REPO / "bench" / ".models" / "large_400mb.tar.gz"
    try:
        with HostingServer() as server:
            server.add("bench/reusable/1", (models / "reusable.tar.gz").read_bytes())
            if large.exists():
                server.add("bench/large/1", large.read_bytes())
            handle = "https://tfhub.dev/bench/reusable/1"
            settings = Settings(cache_dir=work / "cache", mirror=server.url)
            daemon = start_daemon(settings, work)
            try:
                daemon.request("POST", "/v1/resolve", {"handle": handle})
                report["idle_rss_mib"] = rss_mib(daemon.proc.pid)

                # 2. warm resolve as a whole process
                tfhub_cache = work / "tfhub_modules"
                tf_env = {**ENV, "TFHUB_CACHE_DIR": str(tfhub_cache)}
                tf_cmd = [
                    sys.executable,
                    "-c",
                    f"import tensorflow_hub as hub; hub.resolve('{server.url}/bench/reusable/1')",
                ]
                subprocess.run(tf_cmd, env=tf_env, check=True, capture_output=True)  # fill its cache
                hub_env = {**ENV, "HUBD_SOCKET": str(daemon.socket_path)}
                hub_cmd = [sys.executable, "-c", f"import hubd_client; hubd_client.resolve('{handle}')"]
                warm = {"hubd": wall(hub_cmd, hub_env, 5), "tensorflow_hub": wall(tf_cmd, tf_env, 3)}
                report["warm_resolve_process_s"] = warm
                rows.append(
                    f"| warm resolve, whole process (`python -c` ... resolve) | {warm['hubd'] * 1000:.0f} ms | "
                    f"{warm['tensorflow_hub'] * 1000:.0f} ms | tensorflow_hub/hubd "
                    f"{warm['tensorflow_hub'] / warm['hubd']:.1f}x |"
                )

                # 5. client import time
                imp = [
                    sys.executable,
                    "-c",
                    "import time; t=time.perf_counter(); import hubd_client; print(time.perf_counter()-t)",
                ]
                imports = [
                    float(subprocess.run(imp, env=ENV, capture_output=True, text=True, check=True).stdout)
                    for _ in range(7)
                ]
                tfi = [
                    sys.executable,
                    "-c",
                    "import time; t=time.perf_counter(); import tensorflow_hub; print(time.perf_counter()-t)",
                ]
                tf_imports = [
                    float(
                        subprocess.run(tfi, env=ENV, capture_output=True, text=True, check=True).stdout.split()[-1]
                    )
                    for _ in range(3)
                ]
                report["import_s"] = {
                    "hubd_client": statistics.median(imports),
                    "tensorflow_hub": statistics.median(tf_imports),
                }
                rows.append(
                    f"| `import hubd_client` vs `import tensorflow_hub` | "
                    f"{statistics.median(imports) * 1000:.1f} ms | {statistics.median(tf_imports):.2f} s | "
                    f"{statistics.median(tf_imports) / statistics.median(imports):.0f}x |"
                )

                # 3. throughput and latency
                for concurrency in (1, 16, 64):
                    result = loadgen(daemon, concurrency, args.seconds, {"handle": handle})
                    report[f"load_{concurrency}"] = result
                    non_200 = result["requests"] - result["statuses"].get("200", 0)
                    rows.append(
                        f"| warm resolves over the socket, {concurrency} clients | "
                        f"{result['rps']:.0f}/s, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
                        f"{result['errors']} errors, {non_200} non-200 | - | - |"
                    )

                # 5. peak RSS while fetching 400 MB
                if large.exists():
                    before = rss_mib(daemon.proc.pid, "VmHWM")
                    daemon.request("POST", "/v1/resolve", {"handle": "https://tfhub.dev/bench/large/1"})
                    report["rss_mib"] = {
                        "idle": report["idle_rss_mib"],
                        "hwm_before": before,
                        "hwm_after_400mb": rss_mib(daemon.proc.pid, "VmHWM"),
                    }
                    rows.append(
                        f"| daemon RSS: idle / peak while fetching the 358 MiB archive | "
                        f"{report['idle_rss_mib']:.0f} MiB / {report['rss_mib']['hwm_after_400mb']:.0f} MiB"
                        f" | - | - |"
                    )
            finally:
                daemon.stop()

            # 7. load through hubd vs tf.saved_model.load on the same path
            code = (
                "import time, statistics, tensorflow as tf, hubd_client\n"
                f"h = '{handle}'\np = hubd_client.resolve(h)\ntf.saved_model.load(p)\n"
                "a, b = [], []\n"
                "for _ in range(7):\n"
                "    t = time.perf_counter(); tf.saved_model.load(p); a.append(time.perf_counter() - t)\n"
                "    t = time.perf_counter(); hubd_client.load(h); b.append(time.perf_counter() - t)\n"
                "print(statistics.median(a), statistics.median(b))"
            )
            daemon = start_daemon(settings, work)
            try:
                out = subprocess.run(
                    [sys.executable, "-c", code],
                    env={**ENV, "HUBD_SOCKET": str(daemon.socket_path)},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
            finally:
                daemon.stop()
            plain, through = float(out[-2]), float(out[-1])
            report["load_s"] = {"tf.saved_model.load": plain, "hubd_client.load": through}
            rows.append(
                f"| `hubd_client.load` vs `tf.saved_model.load` (same path, small model) | "
                f"{through * 1000:.1f} ms | {plain * 1000:.1f} ms (plain load) | "
                f"overhead {through / plain:.2f}x |"
            )

        # 6. scale: 10 vs N entries
        for count in (10, args.scale):
            root = work / f"scale-{count}"
            fill_store(root / "cache", count)
            starts = []
            for _ in range(2):  # the first start builds the index from the files; the second finds it
                start = time.perf_counter()
                daemon = start_daemon(Settings(cache_dir=root / "cache", offline=True), root)
                starts.append(time.perf_counter() - start)
                try:
                    result = loadgen(daemon, 1, 2.0, {"handle": f"https://tfhub.dev/scale/model-{count // 2}/1"})
                finally:
                    daemon.stop()
            report[f"scale_{count}"] = {"first_start_s": starts[0], "start_s": starts[1], **result}
            rows.append(
                f"| {count:,} entries: daemon start (first / later) and resolve p50, p99 | "
                f"{starts[0]:.2f} s / {starts[1]:.2f} s; "
                f"{result['p50_ms']:.2f} ms, {result['p99_ms']:.2f} ms | - | - |"
            )
    finally:
        from hubd.store import remove_tree

        remove_tree(work)
    print("| figure | hubd | tensorflow_hub | ratio |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "daemon.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
