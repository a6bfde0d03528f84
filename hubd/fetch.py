"""Streaming HTTP download with redirects checked hop by hop, retries with backoff, and Range resume.

It knows nothing of tar: bytes go to a `ChunkSink` as they arrive, the sha256 of the archive is computed on
the way, and progress is reported through a callback. Every download is bounded: a byte budget, a minimum rate,
and no reading past the archive's end once the sink says it has all it needs. A `ResumeSpool` keeps the bytes
received so far on disk, so a download cut by a restart continues with Range + If-Range instead of from zero.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import queue
import random
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urljoin

import aiohttp
from hubd_client.handles import check_redirect

from hubd.config import Settings
from hubd.errors import ArchiveTooLarge, NotFoundUpstream, TooManyRedirects, UpstreamError, UpstreamTooSlow
from hubd.progress import human_bytes

READ_CHUNK = 1 << 20
_MAX_REDIRECTS = 10
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_SPOOL_QUEUE = 8
_BUDGET_SLACK = 2 << 20
"""Compressed bytes beyond the extraction cap's own allowance: the gzip trailer and padding after the tar."""

ProgressCallback = Callable[[str, int, int | None], None]


class ChunkSink(Protocol):
    async def feed(self, chunk: bytes) -> bool:
        """Take a chunk; False once the archive is complete and no more bytes are wanted."""
        ...

    async def restart(self) -> None: ...

    def expect(self, total: int | None) -> None:
        """The archive's announced size (None: unknown), before its first byte is fed."""
        ...


@dataclass
class FetchResult:
    sha256: str
    size: int
    final_url: str
    redirects: list[str] = field(default_factory=list)
    """Every URL the download went through, the first one included."""
    resumes: int = 0
    restarts: int = 0
    replayed: int = 0
    """Bytes taken from a resume spool left by an earlier, interrupted download, not from the network."""
    cut_after_end: bool = False
    """The upstream kept sending after the archive's end and its allowance; the connection was dropped."""
    hubd_claim: tuple[str, str] | None = None
    """(archive sha256, tree digest) a hubd LAN mirror states for the tree it re-packed."""
    hubd_claim_signature: str = ""
    """The mirror's HMAC of `hubd_claim` under the shared mirror key, when it has one."""


class _Retryable(Exception):
    """A failure worth another try; carries the reason for the final error message."""


def make_session(settings: Settings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        auto_decompress=False,
        headers={"User-Agent": "hubd"},
        trust_env=True,
    )


def byte_budget(settings: Settings, announced: int | None) -> int:
    """The most compressed bytes one download may take: what the server announced, and never more than an
    archive that unpacks within HUBD_MAX_EXTRACT_BYTES can be (incompressible data grows by well under 1/8)."""
    cap = settings.max_extract_bytes + settings.max_extract_bytes // 8 + _BUDGET_SLACK
    return min(announced, cap) if announced is not None else cap


@dataclass
class SpoolState:
    """What a resume spool's sidecar records: enough to ask the same server for the rest of the same file."""

    url: str
    resume_url: str
    validator: str
    total: int | None
    length: int = 0


class _SpoolWriter:
    """Writes a spool's chunks in a thread of its own, so the copy (about 2 ms per MiB of kernel time) stays off
    the event loop. A few chunks may wait; a failed write stops the spool there, and what it holds is still a
    prefix of the body."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(_SPOOL_QUEUE)
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="hubd-spool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if not self._failed:
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self._fd, view) :]
                except OSError:
                    self._failed = True  # the spool is a convenience: the download goes on without it
            self._loop.call_soon_threadsafe(self._slots.release)

    async def put(self, chunk: bytes) -> None:
        await self._slots.acquire()
        self._queue.put_nowait(chunk)

    def close(self) -> None:
        """Write what is queued, then close (at most a few chunks: bounded by the queue)."""
        self._queue.put_nowait(None)
        self._thread.join()
        os.close(self._fd)


SPOOLS_PER_UID = 2
"""Resume spools one uid's abandoned downloads may keep: a new one drops that uid's oldest beyond it."""

_SPOOL_SUFFIXES = (".part", ".json", ".tmp")
_SIDECAR_ROOM = 4096
"""Bytes counted for a spool's sidecar (and its temp file) against the cap."""
_spool_lock = threading.Lock()
_active: dict[Path, dict[str, tuple[int | None, int]]] = {}
"""Spools being written or replayed in this process: directory -> key -> (uid, the most bytes it may hold).
Trimming never drops them, and their allowance counts against the cap before they reach it."""


@dataclass(frozen=True)
class SpoolFile:
    """One resume spool on disk (its part, sidecar and any leftover temp file)."""

    key: str
    uid: int | None
    size: int
    mtime: float


def list_spools(directory: Path) -> list[SpoolFile]:
    """Every spool under `directory`, oldest (by mtime) first; stray files count as spools of their own."""
    groups: dict[str, list[os.stat_result]] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        key = name.rsplit(".", 1)[0] if name.endswith(_SPOOL_SUFFIXES) else name
        try:
            stat = (directory / name).lstat()
        except FileNotFoundError:  # removed since the listing (a spool dropped or published meanwhile)
            continue
        groups.setdefault(key, []).append(stat)
    spools = []
    for key, stats in groups.items():
        uid: int | None = None
        with suppress(OSError, ValueError, TypeError, AttributeError):
            raw = json.loads((directory / f"{key}.json").read_text()).get("uid")
            uid = raw if isinstance(raw, int) else None
        spools.append(SpoolFile(key, uid, sum(st.st_size for st in stats), max(st.st_mtime for st in stats)))
    return sorted(spools, key=lambda spool: (spool.mtime, spool.key))


def _remove_spool(directory: Path, key: str) -> None:
    for name in (key, *(f"{key}{suffix}" for suffix in _SPOOL_SUFFIXES)):
        with suppress(FileNotFoundError, IsADirectoryError):
            (directory / name).unlink()


def trim_spools(
    directory: Path,
    *,
    max_age: float | None = None,
    max_bytes: int | None = None,
    want: int = 0,
    uid: int | None = None,
    per_uid: int | None = None,
    free: int = 0,
    everything: bool = False,
    dry_run: bool = False,
) -> list[SpoolFile]:
    """Drop spools no download of this process is using, oldest first: those older than `max_age`; `uid`'s
    beyond `per_uid` - 1 (room for one more); enough that the rest, what running spools may still write and
    `want` more bytes fit in `max_bytes`; enough to free `free` bytes; or, with `everything`, all of them.
    Returns what was (or, with `dry_run`, would be) dropped."""
    with _spool_lock:
        return _trim(directory, max_age, max_bytes, want, uid, per_uid, everything, dry_run, None, free)


def _trim(
    directory: Path,
    max_age: float | None,
    max_bytes: int | None,
    want: int,
    uid: int | None,
    per_uid: int | None,
    everything: bool,
    dry_run: bool,
    exclude: str | None,
    free: int = 0,
) -> list[SpoolFile]:
    active = _active.get(directory, {})
    idle = [spool for spool in list_spools(directory) if spool.key not in active and spool.key != exclude]
    cutoff = time.time() - max_age if max_age is not None else None
    drop = [s for s in idle if everything or (cutoff is not None and s.mtime < cutoff)]
    keep = [s for s in idle if s not in drop]
    if per_uid is not None:
        busy = sum(1 for owner, _limit in active.values() if owner == uid)
        mine = [s for s in keep if s.uid == uid]
        excess = len(mine) + busy + 1 - per_uid
        for spool in mine[: max(0, excess)]:
            drop.append(spool)
            keep.remove(spool)
    if max_bytes is not None:
        reserved = sum(limit for _owner, limit in active.values()) + want
        total = sum(s.size for s in keep)
        while keep and total + reserved > max_bytes:
            spool = keep.pop(0)
            drop.append(spool)
            total -= spool.size
    freed = sum(s.size for s in drop)
    while keep and freed < free:
        spool = keep.pop(0)
        drop.append(spool)
        freed += spool.size
    if not dry_run:
        for spool in drop:
            _remove_spool(directory, spool.key)
    return drop


def _room_left(directory: Path, max_bytes: int, exclude: str) -> int:
    """Bytes the cap leaves for spool `exclude`, besides the others on disk and what running spools may write."""
    active = _active.get(directory, {})
    others = sum(s.size for s in list_spools(directory) if s.key not in active and s.key != exclude)
    return max_bytes - others - sum(limit for key, (_o, limit) in active.items() if key != exclude)


class ResumeSpool:
    """The compressed bytes of one handle's download so far, written beside the streaming extraction.

    A download cut by a restart leaves `<key>.part` and its `<key>.json` sidecar (url, the URL to resume from,
    ETag or Last-Modified, announced size). The next download of that handle replays the part through a fresh
    extraction at disk speed (hash states cannot be saved, so the bytes are hashed again) and asks only for the
    rest, with If-Range so a changed upstream answers with the whole new file. Only one download of a handle runs
    at a time (the engine's per-handle flock), so the files need no lock of their own. Only servers that accept
    ranges and give a validator are spooled: nothing could be resumed from the others.

    Spools are bounded (`max_bytes` in all, `per_uid` per uid, `max_age`): starting or reopening one first drops
    the oldest idle ones beyond those caps, and a spool never writes past what the cap leaves it (what it holds
    then is still a prefix of the body, resumable)."""

    def __init__(
        self,
        directory: Path,
        key: str,
        url: str,
        uid: int | None = None,
        max_bytes: int | None = None,
        per_uid: int | None = None,
        max_age: float | None = None,
    ) -> None:
        self.directory = directory
        self.key = key
        self.data = directory / f"{key}.part"
        self.sidecar = directory / f"{key}.json"
        self.url = url
        self.uid = uid
        self.max_bytes = max_bytes
        self.per_uid = per_uid
        self.max_age = max_age
        self._writer: _SpoolWriter | None = None
        self._limit: int | None = None
        self._written = 0

    def _claim(self, length: int, total: int | None) -> bool:
        """Under the lock: drop idle spools beyond the caps and register this one as running, allowed up to the
        cap's room (False: no room for it, or its uid already runs `per_uid` spools)."""
        active = _active.setdefault(self.directory, {})
        active.pop(self.key, None)
        want = max(total or 0, length) + _SIDECAR_ROOM
        _trim(self.directory, self.max_age, self.max_bytes, want, self.uid, self.per_uid, False, False, self.key)
        if self.per_uid is not None and sum(1 for o, _l in active.values() if o == self.uid) >= self.per_uid:
            return False
        if self.max_bytes is None:
            active[self.key] = (self.uid, 0)
            self._limit = None
            return True
        room = self._room() if total is None else min(want, self._room())
        limit = room - _SIDECAR_ROOM  # the part's own bytes: the sidecar is counted too
        if limit <= 0 or limit < length:
            return False
        active[self.key] = (self.uid, room)
        self._limit = limit
        return True

    def _room(self) -> int:
        assert self.max_bytes is not None
        return _room_left(self.directory, self.max_bytes, self.key)

    def _release(self) -> None:
        with _spool_lock:
            active = _active.get(self.directory, {})
            active.pop(self.key, None)

    def load(self) -> SpoolState | None:
        """The spool an earlier download of the same URL left, or None (and whatever else was there is dropped)."""
        try:
            raw = json.loads(self.sidecar.read_text())
            state = SpoolState(str(raw["url"]), str(raw["resume_url"]), str(raw["validator"]), raw.get("total"), 0)
            state.length = self.data.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            self.discard()
            return None
        if state.url != self.url or not state.length or (state.total is not None and state.length > state.total):
            self.discard()
            return None
        with _spool_lock:  # being replayed: no trim may drop it meanwhile
            _active.setdefault(self.directory, {})[self.key] = (self.uid, state.length)
        return state

    def begin(self, state: SpoolState) -> None:
        """Start a new spool for a fresh (HTTP 200) body, if the caps leave room for one."""
        self.discard()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _spool_lock:
            if not self._claim(0, state.total):
                return  # the download goes on without a spool
            payload = {"url": state.url, "resume_url": state.resume_url, "validator": state.validator}
            temp = self.sidecar.with_suffix(".tmp")
            temp.write_text(json.dumps({**payload, "total": state.total, "uid": self.uid}))
            os.replace(temp, self.sidecar)
            fd = os.open(self.data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._written = 0
        self._writer = _SpoolWriter(fd)

    def reopen(self, length: int, total: int | None = None) -> None:
        """Append to an existing spool from `length` on (what was replayed into the extraction)."""
        self.close()
        with _spool_lock:
            claimed = self._claim(length, total)
            try:
                fd = os.open(self.data, os.O_WRONLY | os.O_CLOEXEC) if claimed else -1
            except FileNotFoundError:
                fd = -1
        if fd < 0:
            self.discard()  # no room left for it (or it is gone): the download goes on without a spool
            return
        os.ftruncate(fd, length)
        os.lseek(fd, length, os.SEEK_SET)
        self._written = length
        self._writer = _SpoolWriter(fd)

    async def write(self, chunk: bytes) -> None:
        if self._writer is None:
            return
        if self._limit is not None:
            chunk = chunk[: max(0, self._limit - self._written)]  # never past the cap: a prefix still resumes
            if not chunk:
                return
        self._written += len(chunk)
        await self._writer.put(chunk)

    def open_part(self) -> BinaryIO:
        return open(self.data, "rb")

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
        self._release()

    def discard(self) -> None:
        self.close()
        for path in (self.data, self.sidecar):
            with suppress(FileNotFoundError):
                path.unlink()


class _RateGuard:
    """Fails a download whose bytes over the last full window fall below the minimum rate (HUBD_MIN_RATE)."""

    def __init__(self, min_rate: int, window: float) -> None:
        self.min_rate = min_rate
        self.window = window
        self._start = time.monotonic()
        self._start_bytes = 0

    def restart(self, received: int) -> None:
        self._start, self._start_bytes = time.monotonic(), received

    def timeout(self) -> float | None:
        """Seconds until the current window must be judged (None: no minimum rate)."""
        if self.min_rate <= 0:
            return None
        return max(0.0, self._start + self.window - time.monotonic())

    def judge(self, received: int, url: str) -> None:
        """At the end of a window: refuse if too slow, else open the next window."""
        if self.min_rate <= 0 or time.monotonic() - self._start < self.window:
            return
        got = received - self._start_bytes
        if got < self.min_rate * self.window:
            raise UpstreamTooSlow(
                f"{url} sent {human_bytes(got)} in the last {self.window:g} s, below the minimum of "
                f"{human_bytes(self.min_rate)}/s; the download was stopped (what arrived is kept for a resume)",
                "try again later or from a faster network; an admin can lower HUBD_MIN_RATE or lengthen "
                "HUBD_MIN_RATE_WINDOW",
            )
        self.restart(received)


class Download:
    """One archive download, resumable across dropped connections and, with a spool, across restarts."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        sink: ChunkSink,
        settings: Settings,
        http_hosts: frozenset[str],
        on_progress: ProgressCallback | None = None,
        on_size: Callable[[int], Awaitable[None]] | None = None,
        on_bytes: Callable[[int], Awaitable[None]] | None = None,
        spool: ResumeSpool | None = None,
        chunk_size: int = READ_CHUNK,
    ) -> None:
        self.session = session
        self.chunk_size = chunk_size
        """The most bytes read, hashed and handed to the sink at once: the grain at which a fetch can pause."""
        self.on_size = on_size
        """Awaited with the archive's size as soon as the server states it, before the body is read: the
        engine refuses there, before any byte or eviction, a download that cannot fit."""
        self.on_bytes = on_bytes
        """Awaited with the bytes received so far (this chunk included) before a chunk is used: the engine
        makes room for bytes that really arrived, never for a size a server merely announced."""
        self.url = url
        self.sink = sink
        self.settings = settings
        self.http_hosts = http_hosts
        self.on_progress = on_progress or (lambda phase, done, total: None)
        self.spool = spool
        self._hash = hashlib.sha256()
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hubd-sha256")
        """The archive's sha256 runs here, beside the loop (hashlib releases the GIL), while the chunk is fed:
        on the loop it held up receiving for about 0.8 ms per MiB."""
        self._received = 0
        self._total: int | None = None
        self._validator: str | None = None
        self._resume_url: str | None = None
        self._complete = False
        self._rate = _RateGuard(settings.min_rate, settings.min_rate_window)
        self._result = FetchResult("", 0, url)

    async def run(self) -> FetchResult:
        try:
            return await self._run()
        finally:
            self._hasher.shutdown(wait=False)  # no hash is pending: each chunk's is awaited before the next

    async def _run(self) -> FetchResult:
        if self.spool is not None:
            await self._replay(self.spool)
        attempt = 0
        while not self._complete:
            try:
                await self._attempt()
                break
            except _Retryable as exc:
                attempt += 1
                if attempt > self.settings.retries:
                    raise UpstreamError(
                        f"download of {self.url} failed after {attempt} attempts: {exc}",
                        "check the network or the upstream server and try again; cached models still work",
                    ) from None
                delay = self.settings.backoff_base * (2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random()))  # jitter spreads a herd of retries
        if self.spool is not None:
            self.spool.close()
        self._result.sha256 = self._hash.hexdigest()
        self._result.size = self._received
        return self._result

    async def _replay(self, spool: ResumeSpool) -> None:
        """Feed what an interrupted download left on disk, then continue from its end."""
        state = await asyncio.to_thread(spool.load)
        if state is None:
            return
        self._validator, self._resume_url, self._total = state.validator, state.resume_url, state.total
        self.sink.expect(self._total)
        if self._total is not None and self.on_size is not None:
            await self.on_size(self._total)
        self.on_progress("resume", 0, state.length)
        with spool.open_part() as part:
            while self._received < state.length:
                chunk = await asyncio.to_thread(part.read, min(READ_CHUNK, state.length - self._received))
                if not chunk:
                    break
                await self._take(chunk)
                if self._complete:
                    break
        self._result.replayed = self._received
        spool.reopen(self._received, self._total)
        if self._total is not None and self._received >= self._total:
            self._complete = True  # cut after the last byte arrived: nothing left to ask for

    async def _attempt(self) -> None:
        resuming = self._received > 0 and self._resume_url is not None
        headers: dict[str, str] = {}
        if resuming:
            headers["Range"] = f"bytes={self._received}-"
            if self._validator:
                headers["If-Range"] = self._validator
        url = self._resume_url if resuming and self._resume_url else self.url
        try:
            async with await self._open(url, headers) as response:
                if resuming and response.status == 206 and self._range_matches(response):
                    self._result.resumes += 1
                elif response.status == 200:
                    if self._received:
                        await self._start_over()
                    self._remember(response)
                    if self._total is not None:
                        self._check_budget(self._total, announced=True)
                        if self.on_size is not None:
                            await self.on_size(self._total)
                else:
                    if resuming:  # the resume URL went stale or the server dislikes our Range: go again
                        await self._start_over()
                        raise _Retryable(f"resume refused with HTTP {response.status}")
                    self._raise_for_status(response)
                await self._copy_body(response)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None

    async def _open(self, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """GET `url`, following redirects one hop at a time so each target is checked before it is contacted."""
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self.session.get(url, headers=headers, allow_redirects=False)
            if self._result.redirects[-1:] != [url]:
                self._result.redirects.append(url)
            if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                target = urljoin(url, response.headers["Location"])
                response.release()
                check_redirect(target, self.url, self.settings.allowed_hosts, self.http_hosts)
                url = target
                continue
            self._result.final_url = url
            return response
        raise TooManyRedirects(
            f"{self.url} redirected more than {_MAX_REDIRECTS} times (last to {url})",
            "the upstream server is misconfigured (a redirect loop?); try again later or use a mirror",
        )

    def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if status in (404, 410):
            raise NotFoundUpstream(
                f"no such model upstream: {self.url} (HTTP {status})",
                "check the handle's spelling and version number",
            )
        if status in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {status}")
        if status in (401, 403):
            raise UpstreamError(
                f"upstream refused access to {self.url} (HTTP {status})",
                "the model may be private or gated; download it where you have access and use a mirror",
            )
        raise UpstreamError(f"unexpected HTTP {status} from {self.url}", "the upstream server may be down")

    def _remember(self, response: aiohttp.ClientResponse) -> None:
        length = response.headers.get("Content-Length")
        self._total = int(length) if length and length.isdigit() else None
        ranges = response.headers.get("Accept-Ranges", "").lower() == "bytes"
        self._validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        self._resume_url = self._result.final_url if ranges else None
        archive, tree = response.headers.get("X-Hubd-Archive-Sha256"), response.headers.get("X-Hubd-Tree-Digest")
        self._result.hubd_claim = (archive, tree) if archive and tree else None
        self._result.hubd_claim_signature = response.headers.get("X-Hubd-Claim-Signature", "")
        self.sink.expect(self._total)
        if self.spool is not None:
            if self._resume_url and self._validator:
                state = SpoolState(self.url, self._resume_url, self._validator, self._total)
                self.spool.begin(state)
            else:
                self.spool.discard()  # nothing could resume it: do not write it at all

    def _range_matches(self, response: aiohttp.ClientResponse) -> bool:
        content_range = response.headers.get("Content-Range", "")
        return content_range.startswith(f"bytes {self._received}-")

    def _check_budget(self, size: int, announced: bool = False) -> None:
        budget = byte_budget(self.settings, None if announced else self._total)
        if size > budget:
            what = "announces" if announced else "has sent"
            raise ArchiveTooLarge(
                f"{self.url} {what} {human_bytes(size)}, more than an archive that unpacks within the cap of "
                f"{human_bytes(self.settings.max_extract_bytes)} can be; the download was stopped",
                "raise HUBD_MAX_EXTRACT_BYTES if this model really is that large",
            )

    async def _start_over(self) -> None:
        self._hash = hashlib.sha256()
        self._received = 0
        self._result.restarts += 1
        if self.spool is not None:
            self.spool.discard()
        await self.sink.restart()

    async def _take(self, chunk: bytes) -> None:
        """Account for, hash and hand over one chunk; sets `_complete` when the sink wants no more."""
        if self.on_bytes is not None:
            await self.on_bytes(self._received + len(chunk))
        self._check_budget(self._received + len(chunk))
        hashing = asyncio.get_running_loop().run_in_executor(self._hasher, self._hash.update, chunk)
        self._received += len(chunk)
        try:
            if not await self.sink.feed(chunk):
                self._complete = True
        finally:
            await hashing  # in order: the next chunk is hashed only after this one

    async def _copy_body(self, response: aiohttp.ClientResponse) -> None:
        last_report = 0.0
        self.on_progress("download", self._received, self._total)
        self._rate.restart(self._received)
        while True:
            deadline = asyncio.timeout(self._rate.timeout())
            try:
                async with deadline:
                    chunk = await response.content.read(self.chunk_size)
            except TimeoutError:
                if not deadline.expired():
                    raise  # aiohttp's own read timeout: retried
                self._rate.judge(self._received, self.url)  # raises when too slow
                continue
            if not chunk:
                break
            if self.spool is not None:
                await self.spool.write(chunk)
            await self._take(chunk)
            if self._complete:  # the archive ended long ago and the upstream keeps sending: drop it
                self._result.cut_after_end = True
                response.close()
                break
            self._rate.judge(self._received, self.url)
            now = time.monotonic()
            if now - last_report > 0.1:
                last_report = now
                self.on_progress("download", self._received, self._total)
        if not self._complete and self._total is not None and self._received < self._total:
            raise _Retryable(f"connection closed after {self._received} of {self._total} bytes")
        self._complete = True
        self.on_progress("download", self._received, self._total)
