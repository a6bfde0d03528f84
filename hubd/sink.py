"""The bridge between an async download and a blocking extractor: extraction runs in a thread while bytes arrive.

The event loop hands chunks over through a small bounded queue, so a slow disk slows the download down instead
of filling memory (peak memory is a few chunks, whatever the model's size). If the extractor fails, the next
`feed` raises its error and the download stops at once.
"""

from __future__ import annotations

import asyncio
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from hubd.extract import MAX_INFLATE_RATIO, TRAILING_ALLOWANCE, GzipReader, SafeExtractor, check_trailing
from hubd.tree import TreeManifest

_QUEUE_CHUNKS = 8
_EOF = b""


class _Aborted(Exception):
    """Raised inside the extractor thread when the download side gives up."""


class StreamingExtraction:
    """Accepts archive chunks with `feed`, unpacks them into `dest` in a worker thread."""

    def __init__(
        self,
        dest: Path,
        max_bytes: int,
        max_members: int,
        fsync: bool,
        max_ratio: int = MAX_INFLATE_RATIO,
        hold_back: Callable[[], None] | None = None,
    ) -> None:
        """`hold_back`, when given, runs in the extractor thread before each chunk and may block a while: a
        prefetch's chunks already queued would otherwise take the CPU that someone waiting for a model needs."""
        self.dest = dest
        self._hold_back = hold_back
        self._limits = (max_bytes, max_members, fsync)
        self._max_ratio = max_ratio
        self._loop = asyncio.get_running_loop()
        self._start()

    def _start(self) -> None:
        self.dest.mkdir(mode=0o700, parents=True, exist_ok=False)
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._saw_eof = False
        self._stopped = False
        self._slots = asyncio.Semaphore(_QUEUE_CHUNKS)
        self._done: asyncio.Future[TreeManifest] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="hubd-extract", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        max_bytes, max_members, fsync = self._limits
        extractor = SafeExtractor(self.dest, max_bytes, max_members, fsync)
        stream = GzipReader(self._next_chunk, max_bytes + max_bytes // 8 + (1 << 20), self._max_ratio)
        try:
            manifest = extractor.extract_stream(stream)
            trailing = 0
            while not self._saw_eof and trailing <= TRAILING_ALLOWANCE:  # padding after the tar's end
                trailing += len(self._next_chunk())
        except _Aborted:
            self._loop.call_soon_threadsafe(self._settle, None, None)
        except BaseException as exc:  # handed to the event loop, re-raised by feed()/finish()
            self._loop.call_soon_threadsafe(self._settle, None, exc)
        else:
            self._loop.call_soon_threadsafe(self._settle, manifest, None)

    def _next_chunk(self) -> bytes:
        if self._hold_back is not None:
            self._hold_back()
        chunk = self._queue.get()
        if chunk is None or chunk is _EOF:
            self._queue.put_nowait(chunk)  # sentinels stay put, so every reader thread sees them
            if chunk is None:
                raise _Aborted()
            self._saw_eof = True
            return chunk
        self._loop.call_soon_threadsafe(self._slots.release)
        return chunk

    def _settle(self, manifest: TreeManifest | None, error: BaseException | None) -> None:
        if not self._done.done():
            if error is not None:
                self._done.set_exception(error)
            elif manifest is not None:
                self._done.set_result(manifest)
            else:
                self._done.cancel()
        # Wake a feed() waiting for a slot that will never be freed by the (now finished) thread.
        for _ in range(_QUEUE_CHUNKS):
            self._slots.release()

    async def feed(self, chunk: bytes) -> bool:
        """Hand a chunk to the extractor. False once the archive has ended and the padding allowed after it is
        used up: the caller stops reading (the archive is complete) and feeding more is refused."""
        if self._stopped:
            check_trailing(TRAILING_ALLOWANCE + len(chunk))  # told to stop, yet more came: refused
        if not chunk:
            return True
        await self._slots.acquire()
        if self._done.done():
            self._done.result()  # raises the extractor's error
            self._stopped = True
            return False
        self._queue.put_nowait(chunk)
        return True

    async def finish(self) -> TreeManifest:
        """Signal the end of the archive and wait for the extractor's manifest."""
        self._queue.put_nowait(_EOF)
        try:
            return await self._done
        finally:
            await asyncio.to_thread(self._thread.join)

    async def restart(self) -> None:
        """Throw away everything extracted so far and begin again (the server could not resume)."""
        await self.abort()
        self._start()

    async def abort(self) -> None:
        self._queue.put_nowait(None)
        await asyncio.to_thread(self._thread.join)
        if not self._done.done():
            self._done.cancel()
        elif not self._done.cancelled():
            self._done.exception()  # retrieved, so asyncio does not log it as never retrieved
        shutil.rmtree(self.dest, ignore_errors=True)
