"""Cold fetch of one large archive as a whole process: hubd against the ISA-L floor, side by side in one run.

    .venv/bin/python bench/bench_cold.py [--mb 400] [--rounds 3] [--threads 1,2,4,8,16] [--quick]

The floor (issue #15 item 4) is reading and inflating the same archive with ISA-L in one process, on one
thread; the parallel floor is rapidgzip on N threads. The contenders run as fresh processes, alternating round
by round, each with an empty cache, fetching from the tests' hosting-protocol server on 127.0.0.1:

- `floor isal`: `python -c` that reads the archive and inflates it with ISA-L (`isal.igzip`, into one reused
  buffer), discarding the output;
- `floor rapidgzip N`: the same with rapidgzip on N threads;
- `hubd pull (stream)`: `python -m hubd pull HANDLE` with no daemon (the engine in-process), streaming inflate;
- `hubd pull (parallel N)`: the same with HUBD_INFLATE_THREADS=N (spool, then rapidgzip on N threads);
- `hubd pull via daemon`: `python -m hubd pull HANDLE` asking a `hubd serve` started once before the rounds (the
  deployment the README sets up: no imports of aiohttp or the engine in the pulling process). Its CPU and peak
  RSS add the daemon's (CPU from /proc per pull, RSS the daemon's high-water mark) to the client's; each model
  is removed with `hubd rm` after its round, untimed.

Each hubd run fetches a handle of its own into an empty cache, so every one is cold.

The archive is built here without TensorFlow or numpy: a SavedModel-shaped tree whose variables are float32
weights (random mantissas, exponents clustered as in real weights: deflate saves about 10%), compressed at
level 6 in parallel (pigz-style, one gzip member) so building it takes seconds on many cores. It is cached in
the system temp dir. Prints a Markdown table of medians and writes bench/results/cold.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hubd.config import Settings  # noqa: E402
from tests.daemon import Daemon, start_daemon  # noqa: E402
from tests.hosting import HostingServer  # noqa: E402

_BLOCK = 8 << 20
_WINDOW = 32 << 10


def weights(n_bytes: int, seed: int) -> bytearray:
    """`n_bytes` of little-endian float32 in about [0.06, 1): random mantissas, the high byte (sign and
    exponent) one of four values, as in trained weights; deflate saves about a tenth, as it does on real ones."""
    rng = random.Random(seed)
    data = bytearray()
    while len(data) < n_bytes:  # randbytes takes fewer than 2**31 bits at a time
        data += rng.randbytes(min(64 << 20, n_bytes - len(data)))
    table = bytes(0x3F if b < 128 else 0x3E if b < 224 else 0x3D if b < 248 else 0x3C for b in range(256))
    data[3::4] = data[3::4].translate(table)
    return data


def gzip_parallel(data: bytes | bytearray, level: int = 6, threads: int | None = None) -> bytes:
    """One gzip member, deflated in 8 MiB blocks on all cores (each primed with the 32 KiB before it, ended
    with a sync flush, as pigz does): what `gzip -6` would write, at many times its speed."""
    view = memoryview(data)
    starts = list(range(0, len(view), _BLOCK)) or [0]

    def block(start: int) -> bytes:
        zdict = bytes(view[max(0, start - _WINDOW) : start])
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, *([zdict] if zdict else []))
        last = start == starts[-1]
        return comp.compress(view[start : start + _BLOCK]) + comp.flush(
            zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
        )

    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        body = b"".join(pool.map(block, starts))
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff"
    return header + body + struct.pack("<II", zlib.crc32(view), len(view) & 0xFFFFFFFF)


def _tar_member(name: str, payload: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o644, 1_700_000_000
    pad = -len(payload) % tarfile.BLOCKSIZE
    return [info.tobuf(tarfile.GNU_FORMAT), payload, b"\0" * pad]


def saved_model_tar(mb: int, seed: int = 11) -> bytes:
    """A tar shaped like a TF Hub SavedModel: a graph, a variables index, one large data shard, a few assets."""
    rng = random.Random(seed)
    parts: list[bytes | bytearray | memoryview] = []
    parts += _tar_member("saved_model.pb", b"\x08\x01\x12" + rng.randbytes(60_000))
    parts += _tar_member("fingerprint.pb", rng.randbytes(60))
    for i in range(8):
        parts += _tar_member(f"assets/vocab-{i}.txt", "\n".join(f"token{j}" for j in range(2000)).encode())
    parts += _tar_member("variables/variables.index", rng.randbytes(4_000))
    parts += _tar_member("variables/variables.data-00000-of-00001", weights(mb * 2**20, seed))
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE))
    return b"".join(parts)


def build_archive(mb: int, cache: Path) -> Path:
    path = cache / f"hubd-bench-cold-{mb}mb-v1.tar.gz"
    if not path.exists():
        started = time.perf_counter()
        archive = gzip_parallel(saved_model_tar(mb))
        temp = path.with_suffix(".tmp")
        temp.write_bytes(archive)
        temp.rename(path)
        print(
            f"built {path} ({len(archive) / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    return path


FLOOR = """
import sys
from isal import igzip
buffer = bytearray(1 << 20)
with igzip.open(sys.argv[1], "rb") as archive:
    while archive.readinto(buffer):
        pass
"""
"""The floor reads through ISA-L's C gzip reader into one reused buffer. An earlier floor called
`isal_zlib.decompressobj().decompress(chunk, 1 MiB)` and dropped each result: every fresh 1 MiB output was
mmapped and faulted in (184,000 minor faults), 0.4 s of the 1.5 s it took on the 2-core box, none of it
inflating; this one takes 1.1 s with 2,500 faults."""

FLOOR_PARALLEL = """
import sys
import rapidgzip
with rapidgzip.open(sys.argv[1], parallelization=int(sys.argv[2])) as archive:
    buffer = bytearray(1 << 20)
    while archive.readinto(buffer):
        pass
"""


SHIM = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execve(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
cpu = usage.ru_utime + usage.ru_stime
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": usage.ru_maxrss / 1024}), file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Runs one contender from a small process: Linux counts the image a child was forked from in its peak RSS, so
forking from this benchmark (which holds the archive) would report the benchmark's own size. The rapidgzip
child of a parallel hubd pull is counted in CPU (waited for) but its RSS is its own (ru_maxrss is per process)."""


def run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time, CPU (with waited-for children) and peak RSS of one process, measured by SHIM."""
    proc = subprocess.run(
        [sys.executable, "-c", SHIM, *cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {err[-2000:]}")
    result: dict[str, float] = json.loads(err.strip().splitlines()[-1])
    result["fell_back"] = float("gave no verdict" in err)  # hubd's log line when rapidgzip failed
    return result


def hubd_env(work: Path, server: HostingServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "TFHUB_"))}
    inherited = [part for part in env.get("PYTHONPATH", "").split(os.pathsep) if part]
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "client"), *inherited]),  # keeps packages found there
        HUBD_CONFIG=str(work / "no-config.toml"),
        HUBD_CACHE_DIR=str(work / "cache"),
        HUBD_SOCKET=str(work / "no-daemon.sock"),
        HUBD_MIRROR=server.url,
        HUBD_HTTP_HOSTS="127.0.0.1",
    )
    env.update(extra)
    return env


def daemon_cpu_and_hwm(pid: int) -> tuple[float, float]:
    """The daemon's CPU seconds so far (user + system, its threads included) and peak RSS in MiB."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return cpu, int(hwm.split()[1]) / 1024


def pull_via_daemon(daemon: Daemon, work: Path, server: HostingServer, handle: str) -> dict[str, float]:
    """One cold `hubd pull` through the running daemon, with the daemon's share of CPU and memory added."""
    env = hubd_env(work, server, HUBD_SOCKET=str(daemon.socket_path), HUBD_CACHE_DIR=str(work / "daemon-cache"))
    url = f"https://tfhub.dev/{handle}"
    before, _ = daemon_cpu_and_hwm(daemon.proc.pid)
    result = run([sys.executable, "-m", "hubd", "pull", "-q", url], env)
    after, hwm = daemon_cpu_and_hwm(daemon.proc.pid)
    result["cpu_s"] += after - before
    result["peak_rss_mib"] = max(result["peak_rss_mib"], hwm)
    subprocess.run([sys.executable, "-m", "hubd", "rm", url], env=env, check=True, capture_output=True)
    return result


def contenders(threads: list[int], parallel_ok: bool) -> list[tuple[str, str, int | None]]:
    """(name, kind, threads): kind floor, floor-parallel, hubd (threads 0: stream) or daemon."""
    out: list[tuple[str, str, int | None]] = [("floor isal (1 thread)", "floor", None)]
    out.append(("hubd pull (stream)", "hubd", 0))
    out.append(("hubd pull via daemon", "daemon", None))
    if parallel_ok:
        for n in threads:
            out.append((f"floor rapidgzip {n}", "floor-parallel", n))
            out.append((f"hubd pull (parallel {n})", "hubd", n))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=400, help="MiB of float32 weights (400: a 360 MiB archive)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2,4,8,16")
    parser.add_argument("--fsync", default="1", help="HUBD_FSYNC for hubd (1: as shipped)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]
    cores = len(os.sched_getaffinity(0))
    threads = [t for t in threads if t <= cores] or [1]
    try:
        import rapidgzip  # noqa: F401

        parallel_ok = True
    except ImportError:
        parallel_ok = False
    started = time.perf_counter()
    path = build_archive(args.mb, Path(tempfile.gettempdir()))
    data = path.read_bytes()
    runs: dict[str, list[dict[str, float]]] = {}
    plan = contenders(threads, parallel_ok)
    with HostingServer() as server, tempfile.TemporaryDirectory(prefix="hubd-bench-cold-") as tmp:
        work = Path(tmp)
        count = 0
        daemon = start_daemon(
            Settings(cache_dir=work / "daemon-cache", mirror=server.url, http_hosts=["127.0.0.1"]),
            work,
            env_extra={"PYTHONPATH": hubd_env(work, server)["PYTHONPATH"], "HUBD_FSYNC": args.fsync},
        )
        try:
            for round_ in range(args.rounds):
                for name, kind, n in plan if round_ % 2 == 0 else list(reversed(plan)):
                    if kind == "floor":
                        result = run([sys.executable, "-c", FLOOR, str(path)], dict(os.environ))
                    elif kind == "floor-parallel":
                        result = run([sys.executable, "-c", FLOOR_PARALLEL, str(path), str(n)], dict(os.environ))
                    else:
                        count += 1
                        handle = f"bench/cold-{count}/1"
                        server.add(handle, data)
                        if kind == "daemon":
                            result = pull_via_daemon(daemon, work, server, handle)
                        else:
                            shutil.rmtree(work / "cache", ignore_errors=True)
                            env = hubd_env(work, server, HUBD_INFLATE_THREADS=str(n), HUBD_FSYNC=args.fsync)
                            result = run(
                                [sys.executable, "-m", "hubd", "pull", "-q", f"https://tfhub.dev/{handle}"], env
                            )
                        server.archives.pop(handle, None)
                    runs.setdefault(name, []).append(result)
                    print(f"round {round_ + 1} {name}: {result['wall_s']:.2f} s", file=sys.stderr)
        finally:
            daemon.stop()
    shutil.rmtree(work, ignore_errors=True)
    floor = statistics.median(r["wall_s"] for r in runs["floor isal (1 thread)"])
    rows = [
        "| contender | wall (median) | x floor | CPU s | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        cpu = statistics.median(r["cpu_s"] for r in results)
        rss = max(r["peak_rss_mib"] for r in results)
        note = " (fell back to one thread)" if any(r.get("fell_back") for r in results) else ""
        rows.append(f"| {name}{note} | {wall:.2f} s | {wall / floor:.2f}x | {cpu:.2f} | {rss:.0f} MiB |")
    machine = f"{cores} usable cores, {os.uname().machine}, Python {sys.version.split()[0]}"
    print(f"Cold fetch of a {len(data) / 2**20:.0f} MiB archive ({args.mb} MiB of float32), {machine}:\n")
    print("\n".join(rows))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "archive_mib": len(data) / 2**20,
        "rounds": args.rounds,
        "fsync": args.fsync,
        "runs": runs,
        "bench_seconds": time.perf_counter() - started,
    }
    (out / "cold.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
