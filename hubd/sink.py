"""The bridge between an async download and a blocking extractor: extraction runs in a thread while bytes arrive.

The event loop hands chunks over through a small bounded queue, so a slow disk slows the download down instead
of filling memory (peak memory is a few chunks, whatever the model's size). If the extractor fails, the next
`feed` raises its error and the download stops at once.

Two ways through, chosen per download (hubd/parallel_inflate.py `choose_threads`): streaming, where one
thread inflates (ISA-L) as bytes arrive and another unpacks (`ReadAhead` between them); or, on a machine with
cores to spare and an archive of announced size, spool then parallel: the chunks go to a file in the staging
directory and, once all are in, rapidgzip inflates it on many threads into the same safe extractor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from hubd.extract import SafeExtractor
from hubd.inflate import (
    INFLATE_BACKEND,
    MAX_INFLATE_RATIO,
    TRAILING_ALLOWANCE,
    GzipReader,
    check_magic,
    check_trailing,
    inflate_cap,
)
from hubd.parallel_inflate import ParallelInflate, ParallelInflateFailed, choose_threads
from hubd.tree import TreeListing

QUEUE_CHUNKS = 8
_EOF = b""
log = logging.getLogger(__name__)


class _Aborted(Exception):
    """Raised inside the extractor thread when the download side gives up."""


class ReadAhead:
    """Calls `produce` (the inflater, or the read of the parallel inflater's pipe) in a thread of its own, so
    producing overlaps with hashing and writing files (all release the GIL). `next_chunk` hands the chunks over
    as they are, not copied.

    On a 2-core machine this takes a 400 MB model's extraction from inflate + write in series to about the
    slower of the two (bench/bench_cold.py). Errors raised by `produce` are re-raised to the reader.
    """

    def __init__(self, produce: Callable[[], bytes], depth: int = 8) -> None:
        self._produce = produce
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._eof = False
        self._thread = threading.Thread(target=self._pump, name="hubd-inflate", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while not self._closed.is_set():
                chunk = self._produce()
                self._put(chunk or b"")
                if not chunk:
                    return
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_chunk(self) -> bytes:
        """The next chunk produced (b"" at the end); the producer's error, if it failed."""
        if self._eof:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        self._eof = not item
        return item

    def close(self) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


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
        inflate_threads: str = "auto",
    ) -> None:
        """`hold_back`, when given, runs in the extractor thread before each chunk and may block a while: a
        prefetch's chunks already queued would otherwise take the CPU that someone waiting for a model needs.
        `inflate_threads` is Settings.inflate_threads (HUBD_INFLATE_THREADS): "auto", "0" (stream) or N."""
        self.dest = dest
        self._hold_back = hold_back
        self._limits = (max_bytes, max_members, fsync)
        self._max_ratio = max_ratio
        self._inflate_threads = inflate_threads
        self._loop = asyncio.get_running_loop()
        self._spool = dest.with_name(dest.name + ".tar.gz")
        self._start()

    def _start(self) -> None:
        self.dest.mkdir(mode=0o700, parents=True, exist_ok=False)
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._saw_eof = False
        self._stopped = False
        self._slots = asyncio.Semaphore(QUEUE_CHUNKS)
        self._done: asyncio.Future[TreeListing] = self._loop.create_future()
        self._threads = 0  # set by `expect` before the first chunk: 0 streams
        self.inflated_by = ""
        """What inflated the archive: ISA-L (or zlib) streaming, rapidgzip, or ISA-L after rapidgzip failed."""
        self._thread = threading.Thread(target=self._run, name="hubd-extract", daemon=True)
        self._started = False

    def _begin(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def expect(self, total: int | None) -> None:
        """The archive's announced size, before its first byte: it picks streaming or spool then parallel."""
        if not self._started:
            self._threads = choose_threads(self._inflate_threads, total)

    def _run(self) -> None:
        try:
            listing = self._spool_then_inflate() if self._threads else self._stream()
        except _Aborted:
            self._loop.call_soon_threadsafe(self._settle, None, None)
        except BaseException as exc:  # handed to the event loop, re-raised by feed()/finish()
            self._loop.call_soon_threadsafe(self._settle, None, exc)
        else:
            self._loop.call_soon_threadsafe(self._settle, listing, None)

    def _stream(self) -> TreeListing:
        """Inflate and unpack as the chunks arrive; then take the padding after the tar's end, up to its cap."""
        self.inflated_by = INFLATE_BACKEND
        listing = self._extract(GzipReader(self._next_chunk, inflate_cap(self._limits[0]), self._max_ratio))
        trailing = 0
        while not self._saw_eof and trailing <= TRAILING_ALLOWANCE:
            trailing += len(self._next_chunk())
        return listing

    def _extract(self, source: Any) -> TreeListing:
        max_bytes, max_members, fsync = self._limits
        reader = ReadAhead(source.read_chunk)
        try:
            return SafeExtractor(self.dest, max_bytes, max_members, fsync).extract_chunks(reader.next_chunk)
        finally:
            reader.close()

    def _spool_then_inflate(self) -> TreeListing:
        """Write every chunk to the spool (refusing a non-gzip start at once), then inflate it on many threads;
        on no clean answer from rapidgzip, inflate the spool again with the streaming reader, which decides."""
        fd = os.open(self._spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            first = True
            while chunk := self._next_chunk():
                if first:
                    check_magic(chunk)  # an HTML page is refused now, not after the whole download
                    first = False
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        cap = inflate_cap(self._limits[0])
        inflater = ParallelInflate(self._spool, self._threads, cap, self._max_ratio)
        try:
            listing = self._extract(inflater)
            inflater.drain()
            self.inflated_by = f"rapidgzip ({self._threads} threads)"
            return listing
        except ParallelInflateFailed as exc:
            log.warning("parallel inflate gave no verdict (%s); inflating %s again on one thread", exc, self.dest)
        finally:
            inflater.close()
        self.inflated_by = f"{INFLATE_BACKEND} (after rapidgzip gave no verdict)"
        shutil.rmtree(self.dest)
        self.dest.mkdir(mode=0o700)
        with open(self._spool, "rb", buffering=0) as spool:
            return self._extract(GzipReader(lambda: spool.read(1 << 20), cap, self._max_ratio))

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

    def _settle(self, listing: TreeListing | None, error: BaseException | None) -> None:
        if not self._done.done():
            if error is not None:
                self._done.set_exception(error)
            elif listing is not None:
                self._done.set_result(listing)
            else:
                self._done.cancel()
        # Wake a feed() waiting for a slot that will never be freed by the (now finished) thread.
        for _ in range(QUEUE_CHUNKS):
            self._slots.release()

    async def feed(self, chunk: bytes) -> bool:
        """Hand a chunk to the extractor. False once the archive has ended and the padding allowed after it is
        used up: the caller stops reading (the archive is complete) and feeding more is refused."""
        if self._stopped:
            check_trailing(TRAILING_ALLOWANCE + len(chunk))  # told to stop, yet more came: refused
        if not chunk:
            return True
        self._begin()
        await self._slots.acquire()
        if self._done.done():
            self._done.result()  # raises the extractor's error
            self._stopped = True
            return False
        self._queue.put_nowait(chunk)
        return True

    async def finish(self) -> TreeListing:
        """Signal the end of the archive and wait for the extractor's listing."""
        self._queue.put_nowait(_EOF)
        self._begin()
        try:
            return await self._done
        finally:
            await asyncio.to_thread(self._thread.join)
            await asyncio.to_thread(self._drop_spool)

    async def restart(self) -> None:
        """Throw away everything extracted so far and begin again (the server could not resume)."""
        await self.abort()
        self._start()

    async def abort(self) -> None:
        self._queue.put_nowait(None)
        if self._started:
            await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self._drop_spool)
        if not self._done.done():
            self._done.cancel()
        elif not self._done.cancelled():
            self._done.exception()  # retrieved, so asyncio does not log it as never retrieved
        shutil.rmtree(self.dest, ignore_errors=True)

    def _drop_spool(self) -> None:
        with suppress(FileNotFoundError):
            self._spool.unlink()
