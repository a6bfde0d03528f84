"""How many models of a prefetch are fetched at once: up to HUBD_PREFETCH_CONCURRENCY, but a second and later
fetch only while the daemon leaves a core free.

Parallel streams help when each is held back by the network (a far upstream gives each connection tens of
MB/s); they only compete when the upstream is fast (a LAN mirror, loopback) and each stream already keeps a core
busy inflating, hashing and writing. On the 2-core development box (bench/bench_priority.py, 10 x 20 MiB from
loopback) four streams finished the prefetch no sooner than one (1.5-1.6 s either way) but their sixteen worker
threads, cycling the GIL, held the event loop back for 8-12 ms at a time: a small model someone asked for
meanwhile took 2.2x its time alone, against 1.3-1.4x with one stream. So each fetch beyond the first waits until
the daemon's CPU use, measured over the last quarter second, leaves at least one core idle for interactive work.

Or until the fetches running have neither ended nor let another start for `STALLED_SECONDS`: an upstream may
send a byte every `read_timeout` and keep a fetch alive indefinitely, and while the daemon is busy with other
users' work the rest of the manifest would otherwise wait behind it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType

from hubd.parallel_inflate import usable_cores

__all__ = ["SAMPLE_SECONDS", "STALLED_SECONDS", "CpuMeter", "PrefetchGate"]

SAMPLE_SECONDS = 0.25
"""The window the daemon's CPU use is judged over: a few of a stream's chunks, short next to a model's fetch."""

SPARE_CORES = 1.0
"""Cores a prefetch leaves to the people who are waiting for a model."""

STALLED_SECONDS = 30.0
"""How long the running fetches may go without one ending or another starting before the next starts anyway
(CPU or not): the most a prefetch waits behind a fetch stuck on a slow upstream, per further stream."""


class CpuMeter:
    """The process's CPU use, in cores, over the last `SAMPLE_SECONDS` or so (every thread counted)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        cpu_seconds: Callable[[], float] = time.process_time,
    ) -> None:
        self._clock, self._cpu = clock, cpu_seconds
        self._mark = (clock(), cpu_seconds())

    def cores_busy(self) -> float | None:
        """Cores used since the last judged mark, or None while that mark is younger than the window."""
        now, cpu = self._clock(), self._cpu()
        wall = now - self._mark[0]
        if wall < SAMPLE_SECONDS:
            return None
        busy = (cpu - self._mark[1]) / wall
        self._mark = (now, cpu)
        return busy


class PrefetchGate:
    """An async context manager, like a semaphore of `limit`, that admits a fetch beyond the first only while
    `cores_busy()` leaves `spare` of `cores` idle, or once nothing has started or ended for `stalled_after`
    seconds. Fetches that finish always make room again."""

    def __init__(
        self,
        limit: int,
        cores: int | None = None,
        meter: CpuMeter | None = None,
        spare: float = SPARE_CORES,
        poll: float = SAMPLE_SECONDS,
        stalled_after: float = STALLED_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._budget = (cores if cores is not None else usable_cores()) - spare
        self._meter = meter or CpuMeter()
        self._poll = poll
        self._stalled_after, self._clock = stalled_after, clock
        self._moved = clock()
        """When a fetch last started or ended."""
        self._running = 0
        self._changed = asyncio.Event()
        self.peak = 0
        """The most fetches that ran at once (what a test or a debugger looks at; nothing else reads it)."""

    def _may_start(self) -> bool:
        if self._running == 0:
            return True  # one always runs: a prefetch always moves
        if self._running >= self._limit:
            return False
        if self._clock() - self._moved >= self._stalled_after:
            return True  # what runs may be stuck on a slow upstream: it must not hold the rest back forever
        busy = self._meter.cores_busy()
        return busy is not None and busy < self._budget

    async def __aenter__(self) -> None:
        while not self._may_start():
            self._changed.clear()
            try:
                async with asyncio.timeout(self._poll):
                    await self._changed.wait()  # a fetch ended, or look at the CPU again
            except TimeoutError:
                pass
        self._running += 1
        self._moved = self._clock()
        self.peak = max(self.peak, self._running)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._running -= 1
        self._moved = self._clock()
        self._changed.set()
