"""Per-member cost of hubd's extractor against tar(1), on an archive of many empty files (#10).

    .venv/bin/python bench/bench_members.py [MEMBERS]   (default 60,000)

Builds a .tar.gz of MEMBERS empty files plus a saved_model.pb (as GNU tar would: one 512-byte header each),
then extracts it with `tar -xzf` and with hubd's streaming extractor (the same path a download takes: inflate
thread, safe tar reader, per-file sha256, no fsync, as with --no-fsync), each into a fresh directory on the same
disk, and prints both times (median of 3) and the ratio. Before #10 the extractor re-summed every earlier size
per member, so 60,000 members took minutes; the target is at most 3x tar.
"""

from __future__ import annotations

import gzip
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hubd.extract import SafeExtractor
from hubd.inflate import GzipReader

CHUNK = 64 * 1024


def build(members: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        graph = b"\x08\x01graph"
        info = tarfile.TarInfo("saved_model.pb")
        info.size = len(graph)
        tar.addfile(info, io.BytesIO(graph))
        for i in range(members):
            tar.addfile(tarfile.TarInfo(f"assets/f{i:07d}"))
    return gzip.compress(raw.getvalue(), compresslevel=6)


def with_tar(archive: Path, dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest)], check=True)
    return time.perf_counter() - start


def with_hubd(archive: Path, dest: Path, members: int) -> float:
    data = archive.read_bytes()
    start = time.perf_counter()
    chunks: Iterator[bytes] = (data[i : i + CHUNK] for i in range(0, len(data), CHUNK))
    reader = GzipReader(lambda: next(chunks, b""), 2**40)
    manifest = SafeExtractor(dest, 2**40, members + 10, fsync=False).extract_stream(reader)
    elapsed = time.perf_counter() - start
    assert len(manifest.files) == members + 1, len(manifest.files)
    return elapsed


def main() -> None:
    members = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
    with tempfile.TemporaryDirectory(prefix="bench-members-", dir=Path(__file__).parent) as work:
        root = Path(work)
        archive = root / "members.tar.gz"
        archive.write_bytes(build(members))
        times: dict[str, list[float]] = {"tar -xzf": [], "hubd": []}
        for run in range(3):
            for name in times:
                dest = root / f"{name.split()[0]}-{run}"
                dest.mkdir()
                elapsed = with_tar(archive, dest) if name == "tar -xzf" else with_hubd(archive, dest, members)
                times[name].append(elapsed)
                shutil.rmtree(dest)
        tar_s, hubd_s = (statistics.median(times[name]) for name in times)
        size_kb = archive.stat().st_size / 1000
        print(f"{members} empty files, archive {size_kb:.0f} KB")
        print(f"tar -xzf: {tar_s:.2f} s   hubd: {hubd_s:.2f} s   ratio: {hubd_s / tar_s:.2f}x")


if __name__ == "__main__":
    main()
