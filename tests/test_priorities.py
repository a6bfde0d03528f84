"""Priorities (#13 item 6): an interactive resolve is never queued behind a prefetch; prefetches yield slots.

The upstream holds each prefetched archive part-way (`pause_after`) until the test releases it, so which fetch
holds a slot, and which waits, is decided by the daemon alone; the figures are in bench/bench_priority.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from hubd.config import Settings
from hubd.slots import FetchSlots
from tests.conftest import Upstream
from tests.daemon import start_daemon
from tests.hosting import Behaviour


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def test_an_interactive_resolve_goes_before_a_prefetch_holding_every_slot(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    held = [upstream.publish("large_4mb", Behaviour(pause_after=4096)) for _ in range(3)]
    small = upstream.publish("reusable")
    env = {"HUBD_MAX_FETCHES": "1", "HUBD_MAX_FETCHES_PER_USER": "1"}
    d = start_daemon(settings, tmp_path, env_extra=env)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            manifest = {"model": [{"handle": tfhub(p)} for p in held]}
            prefetch = pool.submit(d.request, "POST", "/v1/prefetch", manifest)
            running = upstream.server.wait_any_sent(held, 4096)  # one prefetch holds the only slot, paused
            assert running is not None

            reply = d.request("POST", "/v1/resolve", {"handle": tfhub(small)})
            assert reply.status == 200, reply.body  # served while the prefetch still holds its slot
            assert sum(upstream.requests(p) for p in held) == 1  # the queued prefetches still wait

            for path in held:
                upstream.server.release(path)
            events = prefetch.result(timeout=120).ndjson()
            assert events[-1]["ok"] == 3, events
    finally:
        d.stop()


def test_a_queued_prefetch_someone_asks_for_moves_ahead(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    held = [upstream.publish("large_4mb", Behaviour(pause_after=4096)) for _ in range(3)]
    d = start_daemon(settings, tmp_path, env_extra={"HUBD_MAX_FETCHES": "1"})
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            manifest = {"model": [{"handle": tfhub(p)} for p in held]}
            prefetch = pool.submit(d.request, "POST", "/v1/prefetch", manifest)
            running = upstream.server.wait_any_sent(held, 4096)
            assert running is not None
            other, wanted = [p for p in held if p != running]  # both queued behind the running one

            upstream.server.release(wanted)
            reply = d.request("POST", "/v1/resolve", {"handle": tfhub(wanted)})
            assert reply.status == 200, reply.body
            assert upstream.requests(other) == 0  # the one someone waits for went first
            assert upstream.requests(running) == 1

            for path in held:
                upstream.server.release(path)
            assert prefetch.result(timeout=120).ndjson()[-1]["ok"] == 3
    finally:
        d.stop()


def test_prefetches_hold_only_a_share_of_the_slots() -> None:
    async def scenario() -> tuple[int, int, bool]:
        slots = FetchSlots(8)
        release = asyncio.Event()
        started: list[str] = []

        async def fetch(name: str, interactive: bool) -> None:
            async with slots.slot(lambda: interactive):
                started.append(name)
                await release.wait()

        prefetches = [asyncio.create_task(fetch(f"p{n}", False)) for n in range(10)]
        for _ in range(20):  # let every task that can take a slot take it
            await asyncio.sleep(0)
        running_prefetches = len(started)
        interactive = [asyncio.create_task(fetch(f"i{n}", True)) for n in range(2)]
        for _ in range(20):
            await asyncio.sleep(0)
        queued_first = "i0" in started and "i1" in started and len(started) == running_prefetches + 2
        release.set()
        await asyncio.gather(*prefetches, *interactive)
        return running_prefetches, slots.total, queued_first

    running, total, interactive_went_first = asyncio.run(scenario())
    assert running == 6 and total == 8  # two of eight slots stay free for people waiting
    assert interactive_went_first
