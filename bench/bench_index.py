"""The diskcache index at scale (#14 item 5): names by digest through the tag index, writes in transactions,
against the index before it (every names-by-digest a scan of all keys, every write its own commit).

    .venv/bin/python bench/bench_index.py [--entries 100000] [--before COMMIT]

Fills an index of each kind with `--entries` entries (a summary, a last-use time and a name each), under the
system temp dir, then times on it: recording 1,000 new entries, 1,000 look-ups by name and by digest, the names
of a digest, forgetting entries, and a flush of 1,000 last-use times. The "before" index is hubd/index.py as of
`--before` (read with `git show`), run in this same process on the same machine; operations that scan are
timed over fewer calls, and every figure is per call. Prints a Markdown table; writes
bench/results/index.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "client")]

from hubd import index as after  # noqa: E402
from hubd.layout import open_cache  # noqa: E402
from hubd.store import ObjectMeta, Store  # noqa: E402
from hubd.tree import TreeListing  # noqa: E402

BEFORE = "1058318"
"""The last commit with the scanning index (format 2)."""
OPS = 1000


def load_before(commit: str) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{commit}:hubd/index.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="hubd-index-before-")) / "index_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("index_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def meta(i: int) -> ObjectMeta:
    return ObjectMeta(f"{i:064x}", f"{i:064x}", 1000 + i, 1_700_000_000.0 + i, TreeListing(), [name(i)])


def name(i: int) -> str:
    return f"tfhub.dev/bench/model-{i}/1"


def fill(index: Any, entries: int) -> float:
    """Record and bind `entries` entries, a thousand per transaction (setup, not measured as such)."""
    started = time.perf_counter()
    for first in range(0, entries, 1000):
        with index._cache.transact(retry=True):
            for i in range(first, min(entries, first + 1000)):
                index.record(meta(i))
                index.bind(name(i), meta(i).digest)
    return time.perf_counter() - started


def per_call(calls: int, op: Callable[[int], object]) -> float:
    """Mean seconds of `op(k)` over `calls` calls."""
    started = time.perf_counter()
    for k in range(calls):
        op(k)
    return (time.perf_counter() - started) / calls


def measure(module: ModuleType, root: Path, entries: int, scans: int) -> dict[str, float]:
    store = Store(root, fsync=False)
    open_cache(store)
    index = module.Index(store)
    figures = {"fill_s": fill(index, entries)}
    new = entries + 10_000_000
    figures["record"] = per_call(OPS, lambda k: index.record(meta(new + k)))
    figures["lookup_by_name"] = per_call(OPS, lambda k: index._cache.get("name:" + name(k * 7 % entries)))
    if hasattr(index, "summary"):
        figures["lookup_by_digest"] = per_call(OPS, lambda k: index.summary(meta(k * 7 % entries).digest))
        figures["names_of_digest"] = per_call(OPS, lambda k: index.names_of(meta(k * 7 % entries).digest))
        figures["forget"] = per_call(OPS, lambda k: index.forget(meta(k).digest))
    else:  # the scanning index: names of a digest and forget both scan every key
        figures["lookup_by_digest"] = per_call(
            OPS, lambda k: index._cache.get("entry:" + meta(k * 7 % entries).digest)
        )
        wanted = [meta(k).digest for k in range(scans)]
        figures["names_of_digest"] = per_call(scans, lambda k: [n for n, d in index._names() if d == wanted[k]])
        figures["forget"] = per_call(scans, lambda k: index.forget(meta(k).digest))
    for k in range(OPS):
        index.touch(meta(OPS + k).digest)
    started = time.perf_counter()
    index.flush()
    figures["flush_1000"] = time.perf_counter() - started
    index.close()
    return figures


ROWS = [
    ("record", "record a new entry"),
    ("lookup_by_name", "look up a name"),
    ("lookup_by_digest", "look up a digest"),
    ("names_of_digest", "names of a digest"),
    ("forget", "forget an entry"),
    ("flush_1000", "flush 1,000 last-use times"),
]


def show(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--before", default=BEFORE, help="commit of the scanning index to compare with")
    parser.add_argument("--scans", type=int, default=3, help="calls of the scanning operations, before")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="hubd-bench-index-") as tmp:
        results["before"] = measure(load_before(args.before), Path(tmp) / "before", args.entries, args.scans)
        results["after"] = measure(after, Path(tmp) / "after", args.entries, args.scans)
    print(f"\nIndex of {args.entries:,} entries (per call; before = {args.before}, scanning)\n")
    print("| operation | before | after |")
    print("|---|---|---|")
    for key, label in ROWS:
        print(f"| {label} | {show(results['before'][key])} | {show(results['after'][key])} |")
    print(f"| (fill, setup) | {results['before']['fill_s']:.1f} s | {results['after']['fill_s']:.1f} s |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").write_text(json.dumps({"entries": args.entries, **results}, indent=2))


if __name__ == "__main__":
    main()
