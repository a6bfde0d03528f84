"""/v1/health latency while the daemon is under hostile load (issue #10): does anything slow run on its loop?

    .venv/bin/python bench/bench_health.py [--seconds 10] [--files 20000] [--verify-mib 512]

One probe client asks GET /v1/health back to back (keep-alive) first on an idle daemon, then while, at once:
- a connection flood: 1,500 connections with half a request line, re-opened as the daemon refuses or closes
  them (run as an unprivileged user when the bench runs as root, so the per-user limit applies);
- 12 clients verifying one large model (`--verify-mib` of random bytes) over and over;
- 4 clients resolving a model of `--files` files over and over (each hit checks every file).
Prints a Markdown table; writes bench/results/health.json. Every process is separate from the daemon's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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
from tests.daemon import Daemon, call, start_daemon  # noqa: E402

FLOOD = r"""
import selectors, socket, sys, time
path, count, until = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
selector = selectors.DefaultSelector()
opened = refused = 0
def open_one():
    global opened
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(path)
        s.send(b"GET /v1/hea")
    except OSError:
        s.close()
        return
    selector.register(s, selectors.EVENT_READ)
    opened += 1
while time.monotonic() < until:
    while len(selector.get_map()) < count and time.monotonic() < until:
        open_one()
    for key, _ in selector.select(timeout=0.1):
        selector.unregister(key.fileobj)
        key.fileobj.close()
        refused += 1
print(opened, refused)
"""


def publish(store: Store, handle: str, files: dict[str, bytes | int]) -> str:
    """A published entry of `files` (bytes, or a size of random bytes), written as the engine would."""
    staging = store.new_staging()
    tree = staging.tree
    tree.mkdir()
    records = {}
    for name, content in files.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with open(path, "wb") as out:
            if isinstance(content, bytes):
                out.write(content)
                digest.update(content)
                size = len(content)
            else:
                while size < content:
                    chunk = os.urandom(min(2**22, content - size))
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        records[name] = FileRecord(size, digest.hexdigest())
    listing = TreeListing(files=records)
    source = parse_handle(handle)
    total = sum(r.size for r in records.values())
    meta = ObjectMeta(listing.digest(), "0" * 64, total, time.time(), listing, [source.canonical])
    ref = Ref(source.canonical, handle, meta.digest, meta.archive_sha256, time.time())
    store.publish_entry(tree, meta, [(source.ref_key, ref)])
    staging.cleanup()
    return meta.digest


def probe(daemon: Daemon, seconds: float, path: str = "/v1/health", body: str = "", clients: int = 1) -> Any:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "loadgen.py"),
            str(daemon.socket_path),
            "--concurrency",
            str(clients),
            "--seconds",
            str(seconds),
            "--path",
            path,
            "--body",
            body,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def flood_command(socket_path: Path, seconds: float) -> tuple[list[str], dict[str, Any]]:
    cmd = [sys.executable, "-c", FLOOD, str(socket_path), "1500", str(seconds)]
    if os.geteuid() != 0:
        return cmd, {}
    from tests.users import AS_USER, local_user

    user = local_user("hubd-mallory")
    return [sys.executable, "-c", AS_USER, str(user.uid), str(user.gid), FLOOD, *cmd[3:]], {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--verify-mib", type=int, default=512)
    parser.add_argument(
        "--without", action="append", default=[], choices=["flood", "verify", "resolve"], help="leave out a load"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hubd-bench-health-", dir="/tmp"))
    work.chmod(0o755)
    try:
        settings = Settings(cache_dir=work / "cache", fsync=False)
        store = Store(settings.cache_dir, fsync=False)
        open_cache(store)
        started = time.perf_counter()
        many = "https://tfhub.dev/bench/many-files/1"
        publish(store, many, {"saved_model.pb": b"graph", **{f"assets/f{i:05d}": b"x" for i in range(args.files)}})
        large = "https://tfhub.dev/bench/large/1"
        large_id = publish(store, large, {"saved_model.pb": b"graph", "variables/blob": args.verify_mib * 2**20})
        print(f"cache built in {time.perf_counter() - started:.1f} s", file=sys.stderr)

        daemon = start_daemon(settings, work)
        results: dict[str, Any] = {}
        try:
            daemon.socket_path.chmod(0o666)  # the flood runs as another user
            hit = call(daemon.unix(), "POST", "/v1/resolve", {"handle": many})
            assert hit.status == 200, (hit, daemon.log()[-4000:])
            results["idle"] = probe(daemon, args.seconds)

            stop = threading.Event()
            verifies: list[float] = []

            busy: list[int] = []

            def verify_loop() -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        reply = call(daemon.unix(), "POST", "/v1/verify", {"handle": large_id, "heal": False})
                    except BlockingIOError:  # the flood keeps the socket's accept queue full: try again
                        busy.append(1)
                        continue
                    assert reply.status == 200, reply
                    verifies.append(time.perf_counter() - t0)

            cmd, _ = flood_command(daemon.socket_path, 0 if "flood" in args.without else args.seconds + 2)
            flood = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            verifiers = [
                threading.Thread(target=verify_loop) for _ in range(0 if "verify" in args.without else 12)
            ]
            for thread in verifiers:
                thread.start()
            resolver = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "bench" / "loadgen.py"),
                    str(daemon.socket_path),
                    "--concurrency",
                    "4",
                    "--seconds",
                    str(0 if "resolve" in args.without else args.seconds),
                    "--path",
                    "/v1/resolve",
                    "--body",
                    json.dumps({"handle": many}),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            results["hostile"] = probe(daemon, args.seconds)
            results["resolves_20k"] = json.loads(resolver.communicate()[0])
            stop.set()
            for thread in verifiers:
                thread.join()
            opened, refused = flood.communicate()[0].split()
            results["flood"] = {"opened": int(opened), "closed_by_daemon": int(refused)}
            results["verifies"] = {
                "count": len(verifies),
                "median_s": sorted(verifies)[len(verifies) // 2] if verifies else 0.0,
                "connects_refused_by_full_queue": len(busy),
            }
            metrics = call(daemon.unix(), "GET", "/metrics").body.decode()
            counted = [line for line in metrics.splitlines() if line.startswith("hubd_verify_runs_total")]
            results["verify_runs"] = float(counted[0].split()[-1]) if counted else float("nan")  # before #10
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    idle, hostile, resolves = results["idle"], results["hostile"], results["resolves_20k"]
    print("| /v1/health | p50 | p99 | max | requests | errors |")
    print("|---|---|---|---|---|---|")
    for name, r in (("idle daemon", idle), ("under the hostile load", hostile)):
        print(
            f"| {name} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['max_ms']:.1f} ms | {r['requests']} | "
            f"{r['errors']} |"
        )
    verifies = results["verifies"]
    print(
        f"\nmeanwhile: {resolves['requests']} resolves of the {args.files}-file model "
        f"(p50 {resolves['p50_ms']:.1f} ms, p99 {resolves['p99_ms']:.1f} ms, statuses {resolves['statuses']}); "
        f"{verifies['count']} verifies of {args.verify_mib} MiB answered by {results['verify_runs']:.0f} runs "
        f"(median {verifies['median_s']:.2f} s; {verifies['connects_refused_by_full_queue']} connects found the "
        f"accept queue full); flood: {results['flood']['opened']} connections opened, "
        f"{results['flood']['closed_by_daemon']} refused or timed out by the daemon"
    )
    out = REPO / "bench" / "results" / "health.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
