"""resolve(handle) -> Entry: the whole flow, without HTTP serving.

handle -> Source -> (cache hit? quick check) -> single flight -> stream fetch + safe extract -> verify ->
publish -> refs + index -> Entry. The CLI, the daemon and the tests all drive this one class.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import logging
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from hubd_client.handles import AnyHost, Source, origin, origin_allowed, parse_handle, twin_name
from hubd_client.kinds import KINDS
from hubd_client.layout import object_relpath, ref_key

from hubd import inventory, maintenance
from hubd.audit import AuditLog
from hubd.catalog import Catalog, claims_of
from hubd.config import Settings
from hubd.entry import Entry
from hubd.errors import (
    BadHandle,
    BadRequest,
    ChecksumMismatch,
    DisallowedHost,
    DiskFull,
    HubdError,
    MirrorUnsigned,
    NotCached,
    QuotaExceeded,
    RefConflict,
    UpstreamError,
    VerificationFailed,
)
from hubd.eviction import GcReport, collect, fits_without_eviction, unevictable_bytes
from hubd.executors import HIT_CHECKS, WAITS, coalesced, run_in
from hubd.fetch import (
    READ_CHUNK,
    SPOOLS_PER_UID,
    Download,
    FetchResult,
    ProgressCallback,
    ResumeSpool,
    list_spools,
    make_session,
    trim_spools,
)
from hubd.index import Index
from hubd.inventory import CacheCounts
from hubd.layout import open_cache
from hubd.maintenance import VerifyReport as VerifyReport  # routes.py imports it from here
from hubd.objectstore import open_object_store
from hubd.progress import human_bytes
from hubd.sink import StreamingExtraction
from hubd.slots import FetchSlots
from hubd.stats import FetchedFrom, ResolveStats
from hubd.store import ObjectMeta, Ref, Store, gc_lock
from hubd.tfhub_view import TfhubView
from hubd.verify import quick_problems, structural_problems

log = logging.getLogger("hubd.engine")


@dataclass
class _Flight:
    """One fetch in progress, shared by every caller of the same handle in this process."""

    task: asyncio.Task[Entry] | None = None
    listeners: list[ProgressCallback] = field(default_factory=list)
    waiters: int = 0
    """Callers still awaiting the result: when the last one leaves (a client disconnected), the fetch stops."""
    cancellable: bool = True
    """Until the archive is whole: then verifying and publishing finish anyway (cheap, and a publish cut
    half-way would race the staging clean-up)."""
    uid: int | None = None
    """Who started it: the import is recorded in their name."""
    interactive: bool = False
    """Someone waits for it at a prompt (not only a prefetch): it goes before prefetches for a slot."""
    abandoned: bool = False
    """Its last waiter left and it was cancelled: it only winds down now, and nobody may join it."""

    def emit(self, phase: str, done: int, total: int | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(phase, done, total)
            except Exception:  # a broken listener loses its own progress, not everyone's fetch
                logging.getLogger("hubd").exception("a progress listener failed; it gets no more events")
                self.listeners.remove(listener)


class _MetaCache(OrderedDict[str, ObjectMeta]):
    """The metas read last, at most MAX_ENTRIES (one of a 150,000-file model is 17 MB of JSON): least recently
    used out first. Written on the event loop; `recent` tolerates a key another thread just dropped."""

    MAX_ENTRIES = 1024

    def recent(self, digest: str) -> ObjectMeta | None:
        meta = self.get(digest)
        if meta is not None:
            with contextlib.suppress(KeyError):
                self.move_to_end(digest)
        return meta

    def __setitem__(self, digest: str, meta: ObjectMeta) -> None:
        super().__setitem__(digest, meta)
        self.move_to_end(digest)
        while len(self) > self.MAX_ENTRIES:
            self.popitem(last=False)


class Engine:
    """Owns one cache root. Methods are coroutines; call `start` first and `close` at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.cache_dir, fsync=settings.fsync)
        self.http_hosts = frozenset(settings.http_hosts) | _mirror_http_entry(settings.mirror)
        self.mirror_key = _read_mirror_key(settings.mirror_key_file)
        """The shared key a hubd LAN mirror signs (archive sha256, tree digest) with; None when not configured."""
        self._index: Index | None = None
        self._session: aiohttp.ClientSession | None = None
        self._flights: dict[str, _Flight] = {}
        self._fetch_slots = FetchSlots(settings.max_fetches)
        self._user_slots: dict[int | None, FetchSlots] = {}
        """Per uid (None: callers without one, e.g. over TCP, share a bucket); bounded by the machine's users."""
        self._interactive_fetches = 0
        self._no_interactive_fetch = asyncio.Event()
        self._no_interactive_fetch.set()
        self._nobody_waits = threading.Event()  # the same, for extractor threads
        self._nobody_waits.set()
        self.catalog = Catalog(settings.cache_dir, fsync=settings.fsync)
        """Who asked for each model, and the aliases manifests give models."""
        self.audit = AuditLog(settings.cache_dir, fsync=settings.fsync)
        self._meta_cache = _MetaCache()
        self.view = TfhubView(self.store) if settings.tfhub_view else None
        self.stats = ResolveStats()
        self.fetch_observers: list[Callable[[float], None]] = []
        """Called with each published fetch's seconds (the daemon keeps a histogram of them)."""
        self.objectstore = open_object_store(settings.object_store)
        """The shared S3 tier (HUBD_OBJECT_STORE): looked in before upstream, uploaded to after a fetch."""

    async def start(self) -> None:
        open_cache(self.store)
        self.catalog.load()
        self.store.clean_stale_staging()
        await asyncio.to_thread(self._drop_stale_spools)
        self._index = Index(self.store, users_of=self.catalog.users)
        self._index.rebuild_if_needed()
        self.catalog.on_attribute = self._index.attribute
        started = time.time()
        await asyncio.to_thread(self._forget_credentials, self._index.last_run(_CREDENTIALS_CHECK))
        self._index.ran(_CREDENTIALS_CHECK, started)

    @property
    def spool_dir(self) -> Path:
        """Private (0700) home of resume spools: the compressed bytes of interrupted downloads, per handle."""
        return self.store.layout.partial

    def _drop_stale_spools(self) -> None:
        """A spool nobody resumed within SPOOL_MAX_AGE is only taking disk space (at start, on each gc and
        each new spool)."""
        trim_spools(self.spool_dir, max_age=SPOOL_MAX_AGE)

    @property
    def max_spool_bytes(self) -> int:
        """HUBD_MAX_SPOOL_BYTES, else a tenth of the quota, else SPOOL_DEFAULT_CAP."""
        if self.settings.max_spool_bytes is not None:
            return self.settings.max_spool_bytes
        quota = self.settings.max_size
        return quota // 10 if quota is not None else SPOOL_DEFAULT_CAP

    def spool_bytes(self) -> int:
        """Bytes in partial/ (resume spools): they count against the quota and the free disk."""
        return sum(spool.size for spool in list_spools(self.spool_dir))

    def free_spools(self, need: int) -> int:
        """Drop idle spools, oldest first, until `need` bytes are freed (or none are left); returns the bytes."""
        return sum(spool.size for spool in trim_spools(self.spool_dir, free=need))

    def _forget_credentials(self, since: float | None) -> None:
        """Drop what an older hubd stored from handles with credentials or tokens in them (user:pw@, ?token=).

        Such handles are refused now; refs and names are readable by every user, so an entry named with one is
        removed (it is fetched again on its next use) and a ref whose handle alone carries one is dropped.
        Only refs written since the last check (`since`) are read: with none new it costs one stat of refs/."""
        for ref in list(self.store.refs_since(since)):
            if "@" in ref.canonical:
                if self.store.read_meta(ref.digest) is not None:
                    maintenance.remove_digest(self, ref.digest)
            else:
                try:
                    parse_handle(ref.handle, AnyHost())
                    continue
                except BadHandle:
                    pass
            self.store.remove_ref(_ref_key(ref.canonical))
            self.index.unbind(ref.canonical)
            if self.view is not None:  # the links named after the spelling that carried it, and their descriptors
                self.view.unlink_spelling(ref.handle)

    async def rebuild_view(self) -> None:
        """Re-link the whole tensorflow_hub view when it may be behind: publishes link incrementally, so only a
        crash (the index noticed entries it lacked), a new index, or a view that was off calls for it.

        The daemon runs it in the background after start-up. With 100,000 entries it takes minutes of CPU that
        every resolve would compete with, so it does not run at each start."""
        if self.view is None:
            self.index.forget_run(_VIEW_BUILT)  # links are not kept up while it is off: relink when it is back
            return
        if self.index.caught_up or self.index.last_run(_VIEW_BUILT) is None or not self.view.root.is_dir():
            started = time.time()
            await asyncio.to_thread(self.view.rebuild)
            self.index.ran(_VIEW_BUILT, started)

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            if flight.task is not None:
                flight.task.cancel()
        if self.objectstore is not None:
            await self.objectstore.close()  # uploads in flight finish (or are cancelled) before the drain ends
        if self._session is not None:
            await self._session.close()
        if self._index is not None:
            self._index.close()

    @property
    def started(self) -> bool:
        """Whether `start` has opened the cache (its index, its directories)."""
        return self._index is not None

    @property
    def index(self) -> Index:
        if self._index is None:
            raise RuntimeError("Engine.start() was not awaited")
        return self._index

    def parse(self, handle: str) -> Source:
        """Parse a handle and refuse servers that are not allowed upstreams (no probing of other machines)."""
        source = parse_handle(handle, self.http_hosts)  # plain http is checked there, on host and port
        if KINDS[source.kind].needs_allowed_host:
            where = origin(source.url)
            mirror = origin(self.settings.mirror) if self.settings.mirror else None
            if where[0] == "https" and where != mirror and not origin_allowed(where, self.settings.allowed_hosts):
                raise DisallowedHost(
                    f"{where[1]}:{where[2]} is not an allowed model server: {handle!r}",
                    "add the host to HUBD_ALLOWED_HOSTS (HOST for port 443, HOST:PORT otherwise) if you trust it",
                )
        return source

    # -- resolve ------------------------------------------------------------------------------------

    async def resolve(
        self,
        handle: str,
        sha256: str | None = None,
        on_progress: ProgressCallback | None = None,
        uid: int | None = None,
        interactive: bool = True,
        offline: bool = False,
    ) -> Entry:
        """The published entry for `handle` (or for the handle a manifest names so), fetching it once if needed.

        `uid` is the caller's (SO_PEERCRED): it is recorded as one of the entry's users, and a new fetch waits its
        turn under HUBD_MAX_FETCHES_PER_USER for that uid and HUBD_MAX_FETCHES for everyone; joining a fetch
        already running costs no slot. A prefetch (`interactive=False`) yields slots to interactive resolves."""
        alias = self.catalog.alias(handle)
        if alias is not None:  # a manifest's name: the handle (and archive sha256) the manifest gives it
            handle, sha256 = alias.handle, sha256 or alias.sha256
        source = self.parse(handle)
        if not KINDS[source.kind].fetched:
            return _local_entry(source)
        async with self._waited_for(interactive):
            return await self._resolve(source, sha256, on_progress, uid, offline, interactive)

    async def _resolve(
        self,
        source: Source,
        sha256: str | None,
        on_progress: ProgressCallback | None,
        uid: int | None,
        offline: bool,
        interactive: bool,
    ) -> Entry:
        sha256 = sha256.lower() if sha256 else None
        started = time.monotonic()
        cached = await coalesced(
            HIT_CHECKS, (self.store.root, source.ref_key, sha256), self.cached_entry, source, sha256
        )
        if cached is not None:
            self.stats.hits += 1
            log.info("fetch handle=%s cache=hit bytes=0 seconds=%.3f", source.handle, time.monotonic() - started)
            return await self._attributed(cached, uid)
        if self.settings.offline or offline:
            raise self._not_cached(source, "hubd is offline" if self.settings.offline else "offline was asked for")
        self.stats.misses += 1
        return await self._attributed(await self._join_flight(source, sha256, on_progress, uid, interactive), uid)

    async def _attributed(self, entry: Entry, uid: int | None) -> Entry:
        if not self.catalog.knows(entry.id, uid):  # a uid's first ask writes its record under a shared flock
            await run_in(WAITS, self.catalog.attribute, entry.id, uid)
        entry.users = self.catalog.users(entry.id)
        return entry

    def cached_entry(self, source: Source, sha256: str | None = None) -> Entry | None:
        """A verified entry for `source` without touching the network, or None. Broken trees are quarantined."""
        ref = self.store.read_ref(source.ref_key)
        if ref is None or (sha256 and ref.archive_sha256 != sha256):
            return None
        meta = self._meta(ref.digest)
        if meta is None:
            return None
        tree = self.store.object_path(ref.digest)
        problems = quick_problems(tree, meta.listing)
        if problems:
            if tree.is_dir():
                self.quarantine(ref.digest, problems)
            return None
        self.index.touch(ref.digest)
        return self.entry_for(meta, last_used=time.time())

    async def _join_flight(
        self,
        source: Source,
        sha256: str | None,
        on_progress: ProgressCallback | None,
        uid: int | None,
        interactive: bool = True,
    ) -> Entry:
        key = f"{source.ref_key}:{sha256 or ''}"
        flight = self._flights.get(key)
        if flight is not None and flight.abandoned:
            # Joining a fetch that is winding down after its cancel would hand this caller its CancelledError
            # (the client saw its connection closed without an answer). A new fetch starts instead; it waits for
            # the old one's cross-process lock and resumes from the spool the old one kept.
            flight = None
        if flight is not None and interactive and not flight.interactive:
            flight.interactive = True  # a queued prefetch someone now waits for moves ahead
            self._fetch_slots.wake()
            for slots in self._user_slots.values():
                slots.wake()
        if flight is None:
            flight = _Flight(uid=uid, interactive=interactive)
            self._flights[key] = flight
            flight.task = asyncio.create_task(self._fetch_limited(source, sha256, flight, uid))
            flight.task.add_done_callback(functools.partial(self._flight_ended, key, flight))
        if on_progress is not None:
            flight.listeners.append(on_progress)
        assert flight.task is not None
        flight.waiters += 1
        try:
            # shield: one caller giving up must not cancel a fetch that others are waiting on...
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if on_progress is not None and on_progress in flight.listeners:
                flight.listeners.remove(on_progress)
            if flight.waiters == 0 and flight.cancellable and not flight.task.done():
                flight.abandoned = True
                flight.task.cancel()  # ...but when the last one has gone, nobody wants the bytes any more

    def _flight_ended(self, key: str, flight: _Flight, _task: asyncio.Task[Entry]) -> None:
        if self._flights.get(key) is flight:  # not a newer flight that replaced an abandoned one
            del self._flights[key]

    async def _fetch_limited(self, source: Source, sha256: str | None, flight: _Flight, uid: int | None) -> Entry:
        """Wait for a slot of the caller's uid, then a global one (in that order, so one user's queue never
        holds global slots), then fetch. Waiting fetches are reported as phase "queued". Interactive fetches go
        first and prefetches hold only a share of the slots (see hubd.slots)."""
        user = self._user_slots.setdefault(uid, FetchSlots(self.settings.max_fetches_per_user))
        if user.busy(flight.interactive) or self._fetch_slots.busy(flight.interactive):
            flight.emit("queued", 0, None)

        def interactive() -> bool:
            return flight.interactive

        started = time.monotonic()
        try:
            async with user.slot(interactive), self._fetch_slots.slot(interactive):
                return await self._fetch_locked(source, sha256, flight)
        except HubdError as exc:
            log.warning(
                "fetch handle=%s cache=miss failed after %.2f s: %s: %s",
                source.handle,
                time.monotonic() - started,
                exc.code,
                exc.message,
            )
            raise

    @asynccontextmanager
    async def _waited_for(self, interactive: bool) -> AsyncIterator[None]:
        """Count the interactive resolves under way, for prefetches to yield to (see `_yield_to_interactive`).
        The whole resolve counts, not only its download: on a machine of few cores the hit check, the slot,
        the lock and the reply all run on the loop and threads that a prefetch's chunks would otherwise fill."""
        if interactive:
            self._interactive_fetches += 1
            self._no_interactive_fetch.clear()
            self._nobody_waits.clear()
        try:
            yield
        finally:
            if interactive:
                self._interactive_fetches -= 1
                if self._interactive_fetches == 0:
                    self._no_interactive_fetch.set()
                    self._nobody_waits.set()

    async def _yield_to_interactive(self) -> None:
        """Before each chunk of a prefetch: while someone waits for a model, hold back (up to PREFETCH_YIELD
        seconds a chunk, so a prefetch still moves, well above HUBD_MIN_RATE, during a long interactive fetch).
        On a machine of few cores the bandwidth and the CPU that inflating and hashing take go to the fetch
        someone is waiting for."""
        if self._interactive_fetches:
            with suppress(TimeoutError):
                async with asyncio.timeout(PREFETCH_YIELD):
                    await self._no_interactive_fetch.wait()

    def _hold_back_extraction(self, flight: _Flight) -> None:
        """In a prefetch's extractor thread, before each chunk: the chunks it has queued wait too (up to
        PREFETCH_YIELD seconds each) while someone waits for a model."""
        if not flight.interactive and not self._nobody_waits.is_set():
            self._nobody_waits.wait(PREFETCH_YIELD)

    async def _fetch_locked(self, source: Source, sha256: str | None, flight: _Flight) -> Entry:
        flight.emit("waiting", 0, None)
        async with self._cross_process_lock(source.ref_key):
            cached = await run_in(HIT_CHECKS, self.cached_entry, source, sha256)  # fetched meanwhile elsewhere?
            if cached is not None:
                return cached
            if self.objectstore is not None:
                shared = await self.objectstore.fetch(self, source, sha256, flight)  # verified, or None
                if shared is not None:
                    return shared
            return await self._fetch(source, sha256, flight)

    @asynccontextmanager
    async def _cross_process_lock(self, key: str) -> AsyncIterator[None]:
        fd = os.open(self.store.lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await run_in(WAITS, fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    async def _fetch(self, source: Source, sha256: str | None, flight: _Flight) -> Entry:
        url = source.download_url(self.settings.mirror)
        started = time.monotonic()
        staging = self.store.new_staging()
        room = _Room(self)
        spool = ResumeSpool(
            self.spool_dir,
            source.ref_key,
            url,
            uid=flight.uid,
            max_bytes=self.max_spool_bytes,
            per_uid=SPOOLS_PER_UID,
            max_age=SPOOL_MAX_AGE,
        )
        try:
            sink = StreamingExtraction(
                staging.tree,
                self.settings.max_extract_bytes,
                self.settings.max_members,
                self.settings.fsync,
                hold_back=lambda: self._hold_back_extraction(flight),
                inflate_threads=self.settings.inflate_threads,
            )
            try:
                download = Download(
                    self._http(),
                    url,
                    sink,
                    self.settings,
                    self.http_hosts,
                    flight.emit,
                    room.check,
                    lambda received: self._before_chunk(flight, room, received),
                    spool,
                    chunk_size=READ_CHUNK if flight.interactive else PREFETCH_CHUNK,
                )
                result = await download.run()
                listing = await sink.finish()
                flight.cancellable = False
            except BaseException as exc:
                spool.close()
                if not isinstance(exc, UpstreamError | asyncio.CancelledError):  # kept only to be resumed
                    await asyncio.to_thread(spool.discard)
                await sink.abort()
                raise
            await asyncio.to_thread(spool.discard)  # the archive is whole: what follows never needs it again
            self.stats.fetches += 1
            self.stats.fetched(self._fetched_from(url), result.size, result.replayed)
            flight.emit("verify", 0, None)
            archive_sha256 = self._archive_sha256(source, url, result, listing.digest())
            if sha256 and archive_sha256 != sha256:
                raise self._pin_mismatch(source, result, archive_sha256, sha256)
            problems = structural_problems(staging.tree)
            if problems:
                raise VerificationFailed(
                    f"{source.handle} is not a usable SavedModel: {'; '.join(problems)}",
                    "the archive is incomplete or not a SavedModel; report it to the model's publisher",
                )
            names = [source.canonical]
            twin = twin_name(source, result.redirects, self.settings.mirror)  # tfhub.dev redirects to Kaggle
            if twin:
                names.append(twin)
            meta = ObjectMeta(
                digest=listing.digest(),
                archive_sha256=archive_sha256,
                size_bytes=listing.total_bytes,
                fetched_at=time.time(),
                listing=listing,
                names=names,
            )
            await room.admit(meta.size_bytes)  # every check passed: only now may the quota cost others models
            if not flight.interactive:  # a publish's fsyncs would queue the disk writes of someone waiting
                await self._yield_to_interactive()
            flight.emit("publish", 0, None)
            await asyncio.to_thread(self.publish, staging.tree, meta, source.handle)
            if self.objectstore is not None:
                self.objectstore.upload_later(self, meta, source)
            seconds = time.monotonic() - started
            self.stats.fetch_seconds += seconds
            for observe in self.fetch_observers:
                observe(seconds)
            where = self._where_from(url, result)
            log.info(
                "fetch handle=%s cache=miss bytes=%d seconds=%.2f from=%s",
                source.handle,
                result.size,
                seconds,
                where,
            )
            await asyncio.to_thread(
                self.audit.record,
                "import",
                flight.uid,
                meta.digest,
                source.handle,
                "ok",
                f"{result.size} bytes from {where}",
            )
            if self.settings.max_size is not None:  # resume spools (partial/) count against the quota too
                models = max(0, self.settings.max_size - await asyncio.to_thread(self.spool_bytes))
                if not await asyncio.to_thread(fits_without_eviction, self, models):  # else nothing to evict
                    await asyncio.to_thread(collect, self, models, False, frozenset({meta.digest}))
            return self.entry_for(meta, last_used=time.time())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    "the disk holding the cache is full; nothing cached was touched",
                    "free space (`hubd rm` unused models) or move HUBD_CACHE_DIR",
                ) from exc
            raise
        finally:
            await asyncio.to_thread(staging.cleanup)

    def publish(self, tree: Path, meta: ObjectMeta, handle: str) -> None:
        """Publish the tree and point the names at it, all under the shared gc lock (no eviction in between).

        A ref never silently changes the model it names. The handle's own fetch may replace its ref only when
        the entry it named is gone or failed verification; otherwise it is refused (`RefConflict`) and the old
        ref kept. A Kaggle twin learnt from a redirect is only ever added, never replaces a ref."""
        with gc_lock(self.store, shared=True):
            refs: list[tuple[str, Ref]] = []
            for position, canonical in enumerate(meta.names):
                given = handle if position == 0 else KINDS.for_canonical(canonical).handle_for(canonical)
                key = parse_handle(given, AnyHost()).ref_key
                existing = self.store.read_ref(key)
                if existing is not None and existing.digest != meta.digest and self._healthy(existing.digest):
                    if position > 0:
                        continue
                    raise RefConflict(
                        f"{canonical} is cached as model {existing.digest[:12]} (archive sha256 "
                        f"{existing.archive_sha256}), but its upstream now serves another model, "
                        f"{meta.digest[:12]} (archive sha256 {meta.archive_sha256}); the cached one was kept",
                        "a cached handle never changes silently: if the new model is right, an admin removes the "
                        f"old entry (`hubd rm {existing.digest[:12]}`) and pulls again",
                    )
                refs.append((key, Ref(canonical, given, meta.digest, meta.archive_sha256, time.time())))
            self.publish_refs(tree, meta, refs)

    def publish_refs(self, tree: Path, meta: ObjectMeta, refs: list[tuple[str, Ref]]) -> None:
        """Publish the tree, point `refs` (checked by the caller: none may silently change) at it, then index and
        link it. Call with the gc lock held shared; `publish` and bundle imports (hubd/bundle.py) share it."""
        meta.names = [ref.canonical for _key, ref in refs]
        previous = [self.store.read_ref(key) for key, _ref in refs]  # what the view linked for them so far
        # Object, meta, refs in that order, crash-safe; a full disk undoes it all (then 507 disk_full).
        meta.names = self.store.publish_entry(tree, meta, refs).names
        # The index and the view are derived from those files: their failures are logged, never a 500.
        self.index.record(meta)
        for _key, ref in refs:
            self.index.bind(ref.canonical, meta.digest)
        self.index.touch(meta.digest)
        if self.view is not None:
            try:
                for (_key, ref), before in zip(refs, previous, strict=True):
                    self.view.link(ref)
                    if before is not None:
                        self.view.unlink_dropped(before, ref)
            except OSError as exc:
                logging.getLogger("hubd").warning("tfhub_modules/ not linked (%s); relinked at start", exc)
        self._meta_cache[meta.digest] = meta

    async def _before_chunk(self, flight: _Flight, room: _Room, received: int) -> None:
        if not flight.interactive:
            await self._yield_to_interactive()
        await room.need(received)

    def _where_from(self, url: str, result: FetchResult) -> str:
        """upstream or mirror, with "spool+" in front when part of the archive came from a resume spool."""
        where = self._fetched_from(url)
        return f"spool+{where}" if result.replayed else where

    def _fetched_from(self, url: str) -> FetchedFrom:
        return "mirror" if self.settings.mirror and self._from_mirror(url) else "upstream"

    def _healthy(self, digest: str) -> bool:
        """Whether a published object is present and passes the quick check (a cache hit's test)."""
        meta = self._meta(digest)
        tree = self.store.object_path(digest)
        return meta is not None and tree.is_dir() and not quick_problems(tree, meta.listing)

    def _archive_sha256(self, source: Source, url: str, result: FetchResult, tree_digest: str) -> str:
        """The upstream archive's sha256: the bytes hubd hashed itself, unless a trusted mirror vouches otherwise.

        A hubd LAN mirror re-packs trees, so its bytes hash differently; it states which archive the tree came
        from. That statement is believed only from the configured mirror's own origin, only when the tree that
        arrived is exactly the tree it named, and only when it cannot have been forged on the way: the mirror
        is reached over https, or it signed the statement with the shared mirror key.

        With a shared key every answer from the mirror must be signed, over the handle it is for too: unsigned,
        or signed for another handle or tree, it is refused (`MirrorUnsigned`) and nothing of it is kept. A hubd
        that is itself a LAN mirror (--mirror-listen) signs with the key; its own HUBD_MIRROR may be a plain
        hosting server, which signs nothing, so there a signature is believed but not required."""
        claim = result.hubd_claim
        if self.mirror_key is not None and not self.settings.mirror_listen and self._from_mirror(url):
            return self._signed_claim(source, result, tree_digest)
        if claim is None or claim[1] != tree_digest or not self._from_mirror(result.final_url):
            return result.sha256
        assert self.settings.mirror is not None
        if self.settings.mirror.startswith("https://"):
            return claim[0]
        if self.mirror_key is not None and signature_matches(
            self.mirror_key, source.canonical, *claim, result.hubd_claim_signature
        ):
            return claim[0]
        return result.sha256

    def _signed_claim(self, source: Source, result: FetchResult, tree_digest: str) -> str:
        assert self.mirror_key is not None
        claim = result.hubd_claim
        why = ""
        if claim is None or not result.hubd_claim_signature:
            why = "carries no signed statement (X-Hubd-Claim-Signature)"
        elif not self._from_mirror(result.final_url):
            why = f"redirected to {result.final_url}"
        elif not signature_matches(self.mirror_key, source.canonical, *claim, result.hubd_claim_signature):
            why = "carries a signature that is not the shared key's for this handle and archive"
        elif claim[1] != tree_digest:
            why = f"is signed for tree {claim[1][:12]}, but tree {tree_digest[:12]} arrived"
        if why:
            raise MirrorUnsigned(
                f"the mirror's answer for {source.handle} {why}, so anyone on the network could have made it; "
                "nothing of it was kept",
                "both hubds need the same HUBD_MIRROR_KEY_FILE; if they have it, something between them is "
                "rewriting the mirror's answers",
            )
        assert claim is not None
        return claim[0]

    def _from_mirror(self, url: str) -> bool:
        mirror = self.settings.mirror
        if not mirror:
            return False
        try:
            return origin(url) == origin(mirror) and urlsplit(url).path.startswith(urlsplit(mirror).path + "/")
        except DisallowedHost:
            return False

    def _pin_mismatch(self, source: Source, result: FetchResult, got: str, expected: str) -> ChecksumMismatch:
        claim = result.hubd_claim
        if claim is not None and claim[0] == expected and got == result.sha256:
            return ChecksumMismatch(
                f"the archive of {source.handle} came re-packed from the mirror {self.settings.mirror}, which "
                f"says it is the archive with sha256 {expected}, but over plain http and unsigned nothing proves "
                "it; a sha256 pin is only checked against bytes hubd hashed itself or a trusted mirror's word",
                "give both hubds the same key with HUBD_MIRROR_KEY_FILE (or serve the mirror over https), "
                "fetch without the mirror, or drop the sha256 pin",
            )
        return ChecksumMismatch(
            f"archive of {source.handle} has sha256 {got}, expected {expected}",
            "the upstream file changed or the checksum is wrong; the cached copy (if any) was kept",
        )

    def quarantine(self, digest: str, problems: list[str]) -> None:
        """Set a tree that failed a check aside (a re-fetch replaces it), unlinked from the view, audited."""
        if self.view is not None:
            self.view.unlink_digest(digest)
        if self.store.quarantine(digest, "; ".join(problems)) is not None:
            self.audit.record("quarantine", None, digest, self.first_name(digest), detail="; ".join(problems))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = make_session(self.settings)
        return self._session

    def _not_cached(self, source: Source, why: str) -> NotCached:
        broken = self.store.read_ref(source.ref_key) is not None
        state = "its cached copy is broken" if broken else "it is not cached"
        return NotCached(
            f"{why} and {state}: {source.handle}",
            f"connect to the network and run `hubd pull {source.handle}` (or add it to a prefetch manifest)",
        )

    # -- published entries: remembered metas, the API's view of them, names and the upstream check ----------

    def _meta(self, digest: str) -> ObjectMeta | None:
        meta = self._meta_cache.recent(digest)
        if meta is None:
            meta = self.store.read_meta(digest)
            if meta is not None:
                self._meta_cache[digest] = meta
        return meta

    def claim_aliases(self, source: str, items: Iterable[tuple[str | None, str, str | None]]) -> None:
        """Point the names a manifest (`source`) gives, as (name, handle, sha256), at their models. When another
        manifest gives a name to another model: an `AliasConflict` naming both manifests, and no change."""
        self.catalog.claim(source, claims_of(items, lambda handle: self.parse(handle).canonical))

    def first_name(self, digest: str) -> str | None:
        meta = self._meta(digest)
        return meta.names[0] if meta is not None and meta.names else None

    def forget_meta(self, digest: str) -> None:
        """Drop the remembered meta of an object that was removed (eviction calls it)."""
        self._meta_cache.pop(digest, None)

    def entry_for(
        self, meta: ObjectMeta, last_used: float | None = None, problems: list[str] | None = None
    ) -> Entry:
        """The API's view of a published object (last used from the index unless given)."""
        relpath = object_relpath(meta.digest)  # plain strings: this runs on every cache hit
        path = f"{self.store.root}/{relpath}"
        present = os.path.isdir(path)
        return Entry(
            id=meta.digest,
            path=path,
            relpath=relpath,
            handles=list(meta.names),
            size_bytes=meta.size_bytes,
            archive_sha256=meta.archive_sha256,
            tree_digest=meta.digest,
            fetched_at=meta.fetched_at,
            last_used=last_used if last_used is not None else self.index.last_used(meta.digest),
            state="broken" if problems or not present else "ok",
            pinned=self.store.is_pinned(meta.digest),
            problems=problems or ([] if present else ["quarantined: failed verification"]),
            users=self.catalog.users(meta.digest),
            aliases=self.catalog.aliases_for(meta.names),
        )

    async def check_upstream(self) -> tuple[str, bool, str]:
        """(url, reachable, detail) of the upstream handles are fetched from: the mirror, else tfhub.dev."""
        url = self.settings.mirror or "https://tfhub.dev"
        if self.settings.offline:
            return url, False, "offline mode: the network is not used"
        try:
            async with self._http().head(url, timeout=aiohttp.ClientTimeout(total=5), allow_redirects=False) as r:
                return url, True, f"HTTP {r.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return url, False, f"{type(exc).__name__}: {exc}"

    # -- inspection and maintenance: hubd.inventory and hubd.maintenance ------------------------------------
    # Thin delegates for the server, the CLI, the watcher and the tests.

    def find(self, handle_or_id: str) -> ObjectMeta:
        return inventory.find(self, handle_or_id)

    def list_entries(self) -> list[Entry]:
        return inventory.list_page(self)[0]

    def list_page(self, limit: int | None = None, after: str | None = None) -> tuple[list[Entry], str | None]:
        return inventory.list_page(self, limit, after)

    def counts(self) -> CacheCounts:
        return inventory.counts(self)

    def pin(self, digest: str, name: str, uid: int | None = None) -> None:
        maintenance.pin(self, digest, name, uid)

    def unpin(self, digest: str, uid: int | None = None) -> list[str]:
        return maintenance.unpin(self, digest, uid)

    def remove(self, handle_or_id: str, uid: int | None = None, force: bool = False) -> Entry:
        return maintenance.remove(self, handle_or_id, uid, force)

    async def verify(self, handle_or_id: str | None = None, heal: bool = True) -> list[VerifyReport]:
        return await maintenance.verify(self, handle_or_id, heal)

    async def gc(self, dry_run: bool = False, max_size: int | None = None) -> GcReport:
        return await maintenance.gc(self, dry_run, max_size)


_CREDENTIALS_CHECK = "forget-credentials"
"""The index's record of when refs were last checked for credentials (`Engine._forget_credentials`)."""
_VIEW_BUILT = "tfhub-view"
"""The index's record of when the tensorflow_hub view was last relinked in full."""

SPOOL_MAX_AGE = 7 * 86400
"""Seconds an interrupted download's spool is kept for a resume."""

SPOOL_DEFAULT_CAP = 8 << 30
"""Bytes resume spools may hold in all when neither HUBD_MAX_SPOOL_BYTES nor a quota is set."""

PREFETCH_YIELD = 0.5
"""Seconds a prefetch holds back before each chunk while an interactive fetch runs."""
PREFETCH_CHUNK = 1 << 17
"""A prefetch reads, inflates and writes in 128 KiB steps (an interactive fetch in 1 MiB): it pauses between
steps, so when someone starts waiting, the prefetch work already under way is an eighth as long."""


class _Room:
    """Quota room for one download. Nothing is evicted while a download runs: its bytes may yet fail a check
    (checksum, structure, links, a ref conflict), and a failed request must cost nobody a model. A download that
    cannot fit even once every evictable entry is gone is refused before its first byte, or stopped as soon as
    its bytes show it; staging may exceed the quota meanwhile (bounded by that and by the free-disk check).
    Entries are evicted only after the model passed every check and was published (`admit`, then `collect`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.floor: int | None = None
        """Bytes of pinned and recently used models, which no eviction may remove."""
        self._published: tuple[int | None] | None = None
        """(bytes of every published model by the index, None when it cannot tell), read once; None until then."""

    async def _published_bytes(self) -> int | None:
        if self._published is None:
            self._published = (await asyncio.to_thread(self.engine.index.size_bytes),)
        return self._published[0]

    async def check(self, announced: int) -> None:
        """Refuse, before its first byte, a download that cannot fit. Resume spools (partial/) count against
        the quota and the disk, but idle ones are dropped, oldest first, before anything is refused."""
        engine, quota = self.engine, self.engine.settings.max_size
        if quota is not None:
            spools = await asyncio.to_thread(engine.spool_bytes)
            published = await self._published_bytes()
            if published is not None and published + spools + announced <= quota:
                floor = 0  # it fits beside everything published: what may not be evicted does not matter
            else:
                floor = await asyncio.to_thread(unevictable_bytes, engine)
            if floor + spools + announced > quota:
                spools -= await asyncio.to_thread(engine.free_spools, floor + spools + announced - quota)
            if floor + spools + announced > quota:
                raise QuotaExceeded(
                    f"the archive alone is {human_bytes(announced)}, and the quota of {human_bytes(quota)} holds "
                    f"{human_bytes(floor)} of pinned or recently used models and {human_bytes(spools)} of "
                    "downloads in progress; nothing was evicted",
                    "an admin can raise the quota (--max-size / HUBD_MAX_SIZE) or unpin models",
                )
        free = shutil.disk_usage(engine.store.staging).free
        wanted = 2 * announced  # its staging, and its own spool beside it
        if free < wanted and await asyncio.to_thread(engine.free_spools, wanted - free) > 0:
            free = shutil.disk_usage(engine.store.staging).free
        if free < announced:
            raise DiskFull(
                f"the disk holding the cache is full: {human_bytes(free)} free, and the archive alone is "
                f"{human_bytes(announced)}; nothing was written",
                "free space (`hubd gc`, or `hubd rm` unused models), set a quota with --max-size, "
                "or move HUBD_CACHE_DIR",
            )

    async def need(self, received: int) -> None:
        """Stop a download whose bytes alone no longer fit besides what may not be evicted; evict nothing."""
        await self._fits(received, "the download has reached")

    async def admit(self, size: int) -> None:
        """Before publishing a model that passed every check: refuse it (evicting nothing) if it cannot fit."""
        await self._fits(size, "the model unpacks to")

    async def _fits(self, size: int, what: str) -> None:
        quota = self.engine.settings.max_size
        if quota is None:
            return
        published = await self._published_bytes()
        if published is not None and published + size <= quota:
            return  # fits beside everything published: no need to know what may not be evicted
        if self.floor is None or self.floor + size > quota:  # re-read only when it matters
            self.floor = await asyncio.to_thread(unevictable_bytes, self.engine)
        if self.floor + size > quota:
            raise QuotaExceeded(
                f"{what} {human_bytes(size)}, more than the quota of {human_bytes(quota)} can hold besides "
                f"{human_bytes(self.floor)} of pinned and recently used models; nothing was evicted",
                "an admin can raise the quota (--max-size / HUBD_MAX_SIZE) or unpin models",
            )


def claim_signature(key: bytes, canonical: str, archive_sha256: str, tree_digest: str) -> str:
    """The HMAC a hubd LAN mirror sends (X-Hubd-Claim-Signature) for "for this handle, this tree came from that
    archive": bound to the handle's canonical name, so one model's signed answer cannot be replayed for another."""
    statement = f"hubd-claim-v2\n{canonical}\n{archive_sha256}\n{tree_digest}"
    return hmac.new(key, statement.encode(), hashlib.sha256).hexdigest()


def signature_matches(key: bytes, canonical: str, archive_sha256: str, tree_digest: str, signature: str) -> bool:
    expected = claim_signature(key, canonical, archive_sha256, tree_digest).encode()
    return hmac.compare_digest(expected, signature.encode("utf-8", "surrogateescape"))


def _read_mirror_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        info = os.stat(path)
        key = path.read_bytes().strip()
    except OSError as exc:
        raise BadRequest(
            f"cannot read the mirror key file {path}: {exc.strerror}", "check HUBD_MIRROR_KEY_FILE"
        ) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BadRequest(
            f"the mirror key file {path} is readable or writable by others",
            f"chmod 600 {path}: anyone who can read it can vouch for archives",
        )
    if len(key) < 16:
        raise BadRequest(
            f"the mirror key in {path} is too short", "use at least 16 random bytes, e.g. `openssl rand -hex 32`"
        )
    return key


def _ref_key(canonical: str) -> str:
    """The ref key of a canonical name, for refs read back from the store (their handle may no longer parse)."""
    return ref_key(canonical)


def _mirror_http_entry(mirror: str | None) -> frozenset[str]:
    """Plain http is allowed to the configured mirror's exact origin (host and port), and to nothing else."""
    if not mirror or not mirror.startswith("http://"):
        return frozenset()
    _scheme, host, port = origin(mirror)
    return frozenset({f"[{host}]:{port}" if ":" in host else f"{host}:{port}"})


def _local_entry(source: Source) -> Entry:
    return Entry(
        id="local",
        path=source.local_path,
        relpath="",
        handles=[source.local_path],
        size_bytes=0,
        archive_sha256="",
        tree_digest="",
        fetched_at=0.0,
    )
