"""Watchers: manifests the daemon prefetches (watchdog), and published entries someone tampers with (inotify).

Entries are watched within a bounded number of inotify watches (HUBD_MAX_WATCHES, default 8192; the kernel's
fs.inotify.max_user_watches is shared by every program of the user): objects/ itself, for entries published by
any process, and the directories of each entry published or used since the daemon started. No entry may take
more than its share of the budget (`entry_cap`): one with more directories is left to the scrub, so a model of
thousands of folders, which anyone may have fetched, cannot take the watches of everyone else's. Once the budget
is used up (one log line), the entries watched longest ago give their watches to the next one used; once the
kernel says no more, new entries are left to the scrub. The periodic scrub quick-checks (sizes and types, as a
cache hit does) every entry not watched, a batch each HUBD_SCRUB_INTERVAL seconds. A change found either way gets
the entry re-hashed, quarantined and re-fetched (`Engine.verify`).

The inotify descriptor is read on the event loop (no thread); observer threads of watchdog only hand paths to
the loop; all work happens there, one check per entry at a time.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from hubd.config import Settings
from hubd.engine import Engine
from hubd.errors import BadRequest, HubdError
from hubd.manifest import load_manifest
from hubd.prefetch import pin_name
from hubd.verify import quick_problems

log = logging.getLogger("hubd.watch")

_CHANGES = (
    FileModifiedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileCreatedEvent,
    FileClosedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    DirCreatedEvent,
    DirModifiedEvent,
)


class _Forward(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, callback: object) -> None:
        self.loop = loop
        self.callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, _CHANGES):
            paths = [event.src_path, getattr(event, "dest_path", "")]
            for path in paths:
                if path:
                    self.loop.call_soon_threadsafe(self.callback, str(path))  # type: ignore[arg-type]


ENTRY_SHARE = 16
"""One entry may hold at most 1/ENTRY_SHARE of the budget's watches (but 8 at least, within the budget)."""

SCRUB_BATCH = 256
"""Entries quick-checked per scrub batch: 100,000 unwatched entries take 6.5 hours at the default interval."""

_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_IGNORED, _IN_ONLYDIR = 0x400, 0x800, 0x8000, 0x1000000
_ENTRY_EVENTS = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
) | (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
_EVENT = struct.Struct("iIII")


class Inotify:
    """inotify(7) through libc: one non-blocking descriptor the event loop reads. watchdog's recursive observer
    places a watch on every directory below objects/ (about three per model) and fails at the kernel's limit;
    this one places only the watches it is asked for and says when the kernel refuses one."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd: int = fd

    def add(self, path: str, mask: int) -> int:
        """A watch descriptor; OSError(ENOSPC) when the kernel's fs.inotify.max_user_watches is reached."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{os.strerror(code)}: {path}")
        return int(wd)

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # fails only for a watch the kernel dropped already

    def read(self) -> list[tuple[int, int, str]]:
        """The events waiting: (watch descriptor, mask, name within the watched directory)."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        events, at = [], 0
        while at + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, at)
            name = data[at + _EVENT.size : at + _EVENT.size + length].rstrip(b"\0")
            events.append((wd, mask, os.fsdecode(name)))
            at += _EVENT.size + length
        return events

    def close(self) -> None:
        os.close(self.fd)


class CacheWatch:
    """Watches what matters of the cache within `budget` inotify watches, and scrubs the rest periodically."""

    def __init__(
        self, engine: Engine, on_change: Callable[[str], None], budget: int, scrub_interval: float
    ) -> None:
        """`budget`: inotify watches placed at most (HUBD_MAX_WATCHES), objects/ and the directories of entries;
        `scrub_interval`: seconds between two scrub batches (HUBD_SCRUB_INTERVAL)."""
        self.engine = engine
        self.on_change = on_change
        self.budget = budget
        self.scrub_interval = scrub_interval
        self.inotify: Inotify | None = None
        self.watched: dict[str, list[int]] = {}
        """digest -> its directories' watch descriptors."""
        self._owner: dict[int, tuple[str, bool]] = {}
        """watch descriptor -> (digest, whether it watches the entry's top directory)."""
        self._objects_wd = -1
        self.full: str | None = None
        """Why no more watches are placed (None while they are)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._asked: set[str] = set()
        self._too_large: set[str] = set()
        """Entries of more directories than `entry_cap`: left to the scrub (and never walked again)."""
        self._recycling = False
        """Whether the budget has been used up once (said in the log once)."""

    @property
    def entry_cap(self) -> int:
        """The most watches (directories) one entry may hold."""
        return max(1, min(self.budget - 1, max(8, self.budget // ENTRY_SHARE)))

    @property
    def count(self) -> int:
        return len(self._owner) + (self._objects_wd >= 0)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        try:
            self.inotify = Inotify()
            self._objects_wd = self.inotify.add(str(self.engine.store.objects), _IN_MOVED_TO | _IN_ONLYDIR)
        except OSError as exc:
            self._fall_back(f"inotify is not available ({exc.strerror})")
            return
        loop.add_reader(self.inotify.fd, self._readable)
        self.engine.index.on_touch = self._touched

    def stop(self) -> None:
        if self.inotify is not None and self._loop is not None:
            self.engine.index.on_touch = None
            self._loop.remove_reader(self.inotify.fd)
            self.inotify.close()
            self.inotify = None

    def _touched(self, digest: str) -> None:
        """An entry was used (any thread): watch it, on the loop."""
        if (
            digest not in self.watched
            and digest not in self._asked
            and digest not in self._too_large
            and self.full is None
            and self._loop
        ):
            self._asked.add(digest)
            self._loop.call_soon_threadsafe(self.watch, digest)

    def watch(self, digest: str) -> None:
        """Place watches on every directory of the entry: none when it has more than `entry_cap`, and, when the
        budget is used up, in place of those of the entries watched longest ago."""
        self._asked.discard(digest)
        inotify = self.inotify
        if (
            inotify is None
            or digest in self.watched
            or digest in self._too_large
            or self.full is not None
            or len(digest) != 64
        ):
            return
        folders = _folders(self.engine.store.objects / digest, self.entry_cap)
        if folders is None:
            self._too_large.add(digest)
            log.info("entry %s has more than %d directories: left to the scrub", digest[:12], self.entry_cap)
            return
        self._make_room(len(folders))
        placed: list[int] = []
        try:
            for folder in folders:
                placed.append(inotify.add(folder, _ENTRY_EVENTS))
        except OSError as exc:
            for wd in placed:
                inotify.remove(wd)
            if exc.errno == errno.ENOENT:
                return  # removed meanwhile
            self._fall_back("the kernel refuses more (fs.inotify.max_user_watches)")
            return
        self.watched[digest] = placed
        for at, wd in enumerate(placed):
            self._owner[wd] = (digest, at == 0)

    def _make_room(self, needed: int) -> None:
        """Unwatch the entries watched longest ago until `needed` more watches fit the budget (the scrub covers
        them; each is watched again when next used)."""
        while self.watched and self.count + needed > self.budget:
            if not self._recycling:
                self._recycling = True
                log.warning(
                    "inotify watches: HUBD_MAX_WATCHES=%d reached; the entries watched longest ago give their "
                    "watches to the ones used now, every other entry is left to the periodic scrub (%d entries "
                    "every %g s)",
                    self.budget,
                    SCRUB_BATCH,
                    self.scrub_interval,
                )
            self._unwatch(next(iter(self.watched)))

    def _fall_back(self, why: str) -> None:
        self.full = why
        log.warning(
            "inotify watches: %s; %d entries stay watched (%d watches), every other entry is left to the periodic "
            "scrub (%d entries every %g s)",
            why,
            len(self.watched),
            self.count,
            SCRUB_BATCH,
            self.scrub_interval,
        )

    def _readable(self) -> None:
        if self.inotify is None:
            return
        for wd, mask, name in self.inotify.read():
            if wd == self._objects_wd:
                if name and mask & _IN_MOVED_TO:
                    self.watch(name)  # published by some process: in use soon
                continue
            owner = self._owner.get(wd)
            if owner is None:
                continue
            digest, top = owner
            if mask & _IN_IGNORED or (top and mask & (_IN_MOVE_SELF | _IN_DELETE_SELF)):
                self._unwatch(digest)  # removed, quarantined or evicted: renamed away whole
            elif name or not top:
                self.on_change(digest)
            # events on the entry's top directory itself (publish, chmod before a removal) are hubd's own

    def _unwatch(self, digest: str) -> None:
        for wd in self.watched.pop(digest, []):
            self._owner.pop(wd, None)
            if self.inotify is not None:
                self.inotify.remove(wd)

    async def scrub(self) -> None:
        """Quick-check the entries no watch covers, SCRUB_BATCH every `scrub_interval` seconds, round the cache."""
        after = ""
        while True:
            await asyncio.sleep(self.scrub_interval)
            after = await asyncio.to_thread(self._scrub_batch, after)

    def _scrub_batch(self, after: str) -> str:
        store = self.engine.store
        digests = store.meta_digests()
        start = bisect.bisect_right(digests, after)
        batch = [d for d in digests[start : start + SCRUB_BATCH] if d not in self.watched]
        for digest in batch:
            meta = store.read_meta(digest)
            tree = store.objects / digest
            if meta is not None and tree.is_dir() and quick_problems(tree, meta.listing):
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self.on_change, digest)
        end = start + SCRUB_BATCH
        return digests[end - 1] if end < len(digests) else ""


def _folders(top: Path, cap: int) -> list[str] | None:
    """The entry's directories, its top one first; None as soon as there are more than `cap` (not walked on)."""
    folders = [str(top)]
    for folder, names, _files in os.walk(top):
        folders.extend(os.path.join(folder, name) for name in names)
        if len(folders) > cap:
            return None
    return folders


class Watchers:
    """Starts and stops both observers; `checked` and `prefetched` let callers (and tests) see their work."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._manifests = {p.resolve() for p in settings.manifests}
        self.events_seen = 0
        self.cache = CacheWatch(engine, self._entry_changed, settings.max_watches, settings.scrub_interval)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        observer = Observer()
        if self.settings.watch_cache:
            self.cache.start(loop)
            self._tasks.append(loop.create_task(self.cache.scrub()))
        for folder in {p.parent for p in self._manifests}:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BadRequest(
                    f"cannot watch manifests in {folder}: {exc.strerror}",
                    "create that directory for the daemon's user, or fix --manifest / HUBD_MANIFESTS",
                ) from None
            observer.schedule(_Forward(loop, self._manifest_changed), str(folder), recursive=False)
        observer.start()
        self._observer = observer
        self._tasks.append(loop.create_task(self._check_loop()))
        for manifest in self._manifests:
            self._tasks.append(loop.create_task(self._prefetch(manifest)))

    def stop(self) -> None:
        self.cache.stop()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
        for task in self._tasks:
            task.cancel()

    # -- tampering ----------------------------------------------------------------------------------

    def _entry_changed(self, digest: str) -> None:
        """Something inside objects/<digest>/ changed (or the scrub found it changed): re-verify that entry."""
        self.events_seen += 1
        self._pending.add(digest)
        self._wake.set()

    async def _check_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                digest = self._pending.pop()
                if len(digest) != 64 or not self.engine.store.object_path(digest).is_dir():
                    continue
                try:
                    reports = await self.engine.verify(digest, heal=True)
                except HubdError as exc:
                    log.warning("re-verifying %s failed: %s", digest[:12], exc)
                    continue
                for report in reports:
                    if report.problems:
                        state = "re-fetched" if report.healed else "quarantined until the network allows"
                        log.warning(
                            "entry %s changed on disk (%s); %s", digest[:12], "; ".join(report.problems), state
                        )

    # -- manifests ----------------------------------------------------------------------------------

    def _manifest_changed(self, path: str) -> None:
        resolved = Path(path).resolve()
        if resolved in self._manifests:
            self._tasks.append(asyncio.get_running_loop().create_task(self._prefetch(resolved)))

    async def _prefetch(self, path: Path) -> None:
        try:
            manifest = load_manifest(path)
        except HubdError as exc:
            log.warning("manifest %s ignored: %s", path, exc)
            return
        try:
            self.engine.claim_aliases(
                str(path), [(item.name, item.handle, item.sha256) for item in manifest.model]
            )
        except HubdError as exc:  # the models are still fetched; its names wait until the conflict is fixed
            log.error("the names in manifest %s are not used: %s (%s)", path, exc.message, exc.hint)
        for item in manifest.model:
            try:
                entry = await self.engine.resolve(item.handle, sha256=item.sha256, interactive=False)
                if item.pin:
                    self.engine.pin(entry.id, pin_name(item, str(path)))
            except HubdError as exc:
                log.warning("prefetch of %s from %s failed: %s", item.handle, path, exc)
