"""Bounded thread pools for blocking work, one per kind, off the event loop and off asyncio's default pool.

Every `asyncio.to_thread` shares the default pool (min(32, cores + 4) threads), so a dozen re-hashes of a large
model or a few waits for another process's flock used to starve everything else that runs there (listing models,
publishing). Each kind of work here has its own pool, sized for it:

- `HIT_CHECKS`: a cache hit's quick check (one lstat per file: 0.1 s for a 20,000-file model), coalesced, so
  many clients resolving one model at once share one check;
- `HASHING`: full re-hashes (verify), CPU-bound: as many as there are cores, the rest queue;
- `WAITS`: waits that can last (a flock another process holds, the gc lock) and the work done under them;
- `EXPORTS`: writing bundles for `GET /v1/export`, paced by clients that may never read (at most 2 per uid,
  see routes.py): they never take the `WAITS` threads that lock waits and DELETE need;
- `PARSING`: parsing and validating request bodies (up to 4 MB of JSON or TOML: seconds of CPU), one at a time:
  tomllib is pure Python and holds the GIL in 5 ms slices, so two parsing threads left the event loop too few
  (/v1/health took 0.5-0.8 s); with one it stays well under that and other bodies queue.
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

HIT_CHECKS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hubd-hit")
HASHING = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="hubd-hash")
WAITS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="hubd-wait")
EXPORTS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hubd-export")
PARSING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubd-parse")

_running: dict[Hashable, asyncio.Future[Any]] = {}


async def run_in(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in `pool`; a cancelled caller stops waiting, the call itself runs to its end."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def coalesced(pool: ThreadPoolExecutor, key: Hashable, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in `pool`, shared with every caller that asks for the same `key` while it runs.

    Each caller gets its own (shallow) copy of the result, so one caller setting a field changes no other's.
    """
    future = _running.get(key)
    if future is None:
        future = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        _running[key] = future
        future.add_done_callback(lambda _f: _running.pop(key, None))
    result: T = await asyncio.shield(future)  # one caller giving up does not cancel the others' answer
    return copy.copy(result)
