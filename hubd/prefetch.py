"""Resolve many models at once and report as a stream of events: shared by the API and `hubd prefetch`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable

from pydantic import BaseModel

from hubd.engine import Engine
from hubd.errors import HubdError
from hubd.events import DoneEvent, ErrorDetail, ErrorEvent, ProgressEvent, SummaryEvent
from hubd.manifest import ManifestEntry
from hubd.prefetch_gate import PrefetchGate

log = logging.getLogger("hubd.prefetch")


async def resolve_many(
    engine: Engine,
    wanted: Iterable[ManifestEntry],
    summary: bool = True,
    uid: int | None = None,
    interactive: bool = False,
    source: str = "a manifest",
    offline: bool = False,
) -> AsyncIterator[BaseModel]:
    """Yield progress, then a done or error event per model, then (optionally) a summary.

    The fetches run in their own tasks. A consumer that stops iterating (and closes the generator) withdraws
    from its fetches; a fetch stops only when nobody else waits for it (see `Engine.resolve`). A prefetch is not
    `interactive`: its fetches yield download slots to people waiting for a model. Pins name `source` (the
    manifest), so `hubd rm` can say which manifest wants a model.
    """
    events = _Events()
    concurrency = engine.settings.prefetch_concurrency
    # A prefetch starts its second and later fetches only with a core to spare; a pull someone waits for, at once.
    limit = asyncio.Semaphore(concurrency) if interactive else PrefetchGate(concurrency)
    failures: list[ErrorEvent] = []
    done = 0

    async def one(item: ManifestEntry) -> None:
        nonlocal done

        def progress(phase: str, completed: int, total: int | None) -> None:
            events.progress(
                ProgressEvent(event="progress", handle=item.handle, phase=phase, done=completed, total=total)
            )

        async with limit:
            try:
                entry = await engine.resolve(
                    item.handle,
                    sha256=item.sha256,
                    on_progress=progress,
                    uid=uid,
                    interactive=interactive,
                    offline=offline,
                )
                if item.pin:
                    engine.pin(entry.id, pin_name(item, source), uid)
                events.put_nowait(DoneEvent(event="done", handle=item.handle, entry=entry))
                done += 1
            except HubdError as exc:
                failure = ErrorEvent(event="error", handle=item.handle, error=ErrorDetail(**exc.as_dict()))
                failures.append(failure)
                events.put_nowait(failure)
            except Exception as exc:  # a bug: the stream still ends with an error event, never hangs its client
                log.exception("unexpected error resolving %s", item.handle)
                detail = ErrorDetail(
                    code="internal_error",
                    message=f"hubd failed unexpectedly resolving {item.handle}: {type(exc).__name__}",
                    hint="see the daemon's log, and report it; trying again may work",
                )
                failure = ErrorEvent(event="error", handle=item.handle, error=detail)
                failures.append(failure)
                events.put_nowait(failure)

    async def run_all() -> None:
        try:
            await asyncio.gather(*(one(item) for item in wanted))
            if summary:
                events.put_nowait(SummaryEvent(event="summary", ok=done, failed=len(failures), failures=failures))
        finally:
            events.put_nowait(None)

    worker = asyncio.create_task(run_all())
    try:
        while (event := await events.get()) is not None:
            yield event
        await worker
    finally:
        # The consumer left (a client disconnected): its fetches lose a waiter, and stop if it was the last.
        worker.cancel()


class _Events:
    """The events one `resolve_many` has for its consumer: done, error and summary events (and the end, None) in
    order, never dropped; progress coalesced per handle and phase, only the latest kept (so each phase still
    shows, in order). A consumer that reads slowly, or not at all, holds at most one progress event per model
    and phase however long the fetches run (an unbounded queue grew a daemon with 60 unread prefetch streams by
    230 MiB in 160 s).
    """

    def __init__(self) -> None:
        self._order: deque[BaseModel | tuple[str, str] | None] = deque()  # (handle, phase): its latest progress
        self._progress: dict[tuple[str, str], ProgressEvent] = {}
        self._ready = asyncio.Event()

    def progress(self, event: ProgressEvent) -> None:
        key = (event.handle, event.phase)
        if key not in self._progress:
            self._order.append(key)
        self._progress[key] = event
        self._ready.set()

    def put_nowait(self, event: BaseModel | None) -> None:
        self._order.append(event)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._order)

    async def get(self) -> BaseModel | None:
        while not self._order:
            self._ready.clear()
            await self._ready.wait()
        item = self._order.popleft()
        return self._progress.pop(item) if isinstance(item, tuple) else item


def pin_name(item: ManifestEntry, source: str) -> str:
    """What a pin records: the model's name in the manifest, and the manifest."""
    return f"{item.name or item.handle} in {source}"
