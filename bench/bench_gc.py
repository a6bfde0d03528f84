"""`hubd gc` on a large cache (#12 item 2): evicting 1,000 of 10,000 entries is one pass over the cache.

    .venv/bin/python bench/bench_gc.py [--entries 10000] [--evict 1000]

Builds a synthetic cache under the system temp dir (never in the repository): `--entries` small published
objects, each with its meta, a ref, tensorflow_hub view links and an index record, 1% of them pinned, all used
long ago. The quota is set so that exactly `--evict` entries must go, least recently used first. Prints the
time to plan (`collect(..., dry_run=True)`: read the state and plan, under the gc lock) and to plan and execute
(`collect(...)`), and checks that what was evicted is what the dry run said. Runs against any hubd with
`collect(engine, max_size, dry_run)` (so before #12 too).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "client")]

from hubd_client.handles import AnyHost, parse_handle  # noqa: E402

from hubd import eviction  # noqa: E402
from hubd.config import Settings  # noqa: E402
from hubd.engine import Engine  # noqa: E402
from hubd.layout import open_cache  # noqa: E402
from hubd.store import ObjectMeta, Ref, Store  # noqa: E402
from hubd.tfhub_view import TfhubView  # noqa: E402
from hubd.tree import FileRecord, TreeListing  # noqa: E402

SIZE = 64
"""Bytes of each entry's one file."""


def build(root: Path, entries: int) -> None:
    store = Store(root, fsync=False)
    open_cache(store)
    view = TfhubView(store)
    long_ago = time.time() - 86400
    for i in range(entries):
        payload = f"model {i}".encode().ljust(SIZE, b".")
        listing = TreeListing(files={"saved_model.pb": FileRecord(SIZE, hashlib.sha256(payload).hexdigest())})
        digest = listing.digest()
        tree = store.objects / digest
        tree.mkdir()
        (tree / "saved_model.pb").write_bytes(payload)
        source = parse_handle(f"https://tfhub.dev/bench/model-{i}/1", AnyHost())
        store.write_meta(ObjectMeta(digest, f"{i:064x}", SIZE, long_ago + i, listing, [source.canonical]))
        ref = Ref(source.canonical, source.handle, digest, f"{i:064x}", long_ago + i)
        store.write_ref(source.ref_key, ref)
        view.link(ref)
        if i % 100 == 50:
            store.pin(digest, "bench manifest")


async def measure(root: Path, entries: int, evict: int) -> dict[str, float]:
    settings = Settings(cache_dir=root, fsync=False, gc_grace=0.0, tfhub_view=True, offline=True)
    engine = Engine(settings)
    started = time.perf_counter()
    await engine.start()  # the index is built from the files (last use = fetch time)
    figures = {"start_s": time.perf_counter() - started}
    quota = (entries - evict) * SIZE
    started = time.perf_counter()
    dry = await asyncio.to_thread(eviction.collect, engine, quota, True)
    figures["plan_s"] = time.perf_counter() - started
    if hasattr(eviction, "plan"):  # the pure planner alone, on state gathered beforehand
        state, _found = eviction.gather(engine, quarantine=True)
        started = time.perf_counter()
        eviction.plan(state, quota, now=time.time(), grace=0.0)
        figures["plan_pure_s"] = time.perf_counter() - started
    started = time.perf_counter()
    real = await asyncio.to_thread(eviction.collect, engine, quota, False)
    figures["plan_and_execute_s"] = time.perf_counter() - started
    figures["execute_s"] = figures["plan_and_execute_s"] - figures["plan_s"]
    await engine.close()
    assert [e.id for e in real.removed] == [e.id for e in dry.removed], "the dry run said otherwise"
    assert len(real.removed) == evict, f"{len(real.removed)} evicted, not {evict}"
    left = len(os.listdir(root / "objects"))
    assert left == entries - evict, f"{left} objects left"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--evict", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hubd-bench-gc-") as tmp:
        root = Path(tmp) / "cache"
        started = time.perf_counter()
        build(root, args.entries)
        print(f"built {args.entries} entries in {time.perf_counter() - started:.1f} s under {tmp}")
        figures = asyncio.run(measure(root, args.entries, args.evict))
    print(f"gc evicting {args.evict} of {args.entries} entries:")
    for name, seconds in figures.items():
        print(f"  {name:<20} {seconds:8.3f} s")


if __name__ == "__main__":
    main()
