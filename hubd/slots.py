"""Download slots with two priorities: someone waiting at a prompt (interactive) before a prefetch.

A pool has `total` slots. Prefetches may hold at most `prefetch_cap` of them (a quarter is kept back, at least
one), take a slot only when no interactive fetch waits for one, and wait in line. An interactive fetch takes any
free slot, goes before every waiting prefetch, and when prefetches fill the pool while no interactive fetch of
the pool runs it takes one more: a resolve someone waits for is never queued behind a prefetch.

A waiting fetch's priority is read when slots are handed out, so a queued prefetch that someone now resolves
interactively moves ahead at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass
class _Waiter:
    future: asyncio.Future[bool]
    interactive: Callable[[], bool]


class FetchSlots:
    def __init__(self, total: int) -> None:
        self.total = total
        self.prefetch_cap = max(1, total - max(1, total // 4))
        self.running = {True: 0, False: 0}
        """Slots held by interactive (True) and prefetch (False) fetches."""
        self._waiters: list[_Waiter] = []

    def busy(self, interactive: bool) -> bool:
        """Whether a fetch of this kind would wait now."""
        ahead = [w for w in self._waiters if w.interactive()] if interactive else self._waiters
        return bool(ahead) or not self._may(interactive)

    def _may(self, interactive: bool) -> bool:
        used = self.running[True] + self.running[False]
        if interactive:
            return used < self.total or self.running[True] == 0
        return used < self.total and self.running[False] < self.prefetch_cap

    @asynccontextmanager
    async def slot(self, interactive: Callable[[], bool]) -> AsyncIterator[None]:
        kind = await self._acquire(interactive)
        try:
            yield
        finally:
            self.running[kind] -= 1
            self.wake()

    async def _acquire(self, interactive: Callable[[], bool]) -> bool:
        kind = interactive()
        ahead = [w for w in self._waiters if w.interactive()] if kind else self._waiters
        if not ahead and self._may(kind):
            self.running[kind] += 1
            return kind
        waiter = _Waiter(asyncio.get_running_loop().create_future(), interactive)
        self._waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():  # granted as we were cancelled
                self.running[waiter.future.result()] -= 1
                self.wake()
            raise

    def wake(self) -> None:
        """Hand free slots out: interactive waiters first, each kind in arrival order. Call it when a waiter's
        priority may have changed."""
        for waiter in sorted(self._waiters, key=lambda w: not w.interactive()):
            kind = waiter.interactive()
            if not self._may(kind):
                if kind:
                    continue
                break
            self._waiters.remove(waiter)
            self.running[kind] += 1
            waiter.future.set_result(kind)
