"""A diskcache index of entries (names, digests, sizes, fetch and last-use times) for fast listing.

It is derived, never the source of truth: refs and meta files in the store are. When the index is lost, or
its database is corrupt, it is rebuilt from them; only `last_used` cannot be recovered and restarts at the
fetch time. diskcache is SQLite underneath, so several processes may update it at once.

Nothing the index does can fail a request. Every operation is guarded: a database error (corrupt, deleted,
replaced, full disk) is logged once, the index is rebuilt from the files and the operation retried; if that
fails too, the operation is skipped (a write) or answers "unknown" (a read). SQLite keeps using a database file
that was deleted or overwritten under an open connection, so writes first check that the file on disk is
still the one opened and still an SQLite database.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TypeVar

import diskcache

from hubd.store import FAULT_INJECTION, ObjectMeta, Store, fault_point

_ENTRY = "entry:"
_NAME = "name:"
_USED = "used:"
_BUILT = "built"
_FORMAT = "format"
INDEX_FORMAT = 2
"""The index's own format: 2 stores JSON values (_DataDisk); 1 (no marker) stored pickles. Another format
than this one is thrown away and rebuilt from the files."""
_FLUSH_SECONDS = 5.0
_DB_FILE = "cache.db"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_BROKEN = (sqlite3.Error, OSError, diskcache.Timeout)  # UnsafeIndexRow is an sqlite3.Error
log = logging.getLogger("hubd.index")
T = TypeVar("T")


class IndexLost(OSError):
    """The database file was deleted, replaced or overwritten since it was opened."""


class UnsafeIndexRow(sqlite3.DatabaseError):
    """A row that is not plain data (a pickle, a value kept in a file): refused unread, the index is rebuilt."""


class _DataDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's storage with string keys and JSON values only: nothing in the database is ever unpickled.

    diskcache's own disks (JSONDisk too) unpickle any row whose mode says pickle, so a database someone else
    wrote would run their code in the daemon. This one writes every value as a JSON blob in the row and refuses
    to read anything else (`UnsafeIndexRow`, which rebuilds the index from the files)."""

    def put(self, key: object) -> tuple[object, bool]:
        if not isinstance(key, str):
            raise TypeError(f"index keys are strings, not {type(key).__name__}")
        return key, True

    def get(self, key: object, raw: bool) -> str:
        if not raw or not isinstance(key, str):
            raise UnsafeIndexRow("an index key that is not a plain string")
        return key

    def store(self, value: object, read: bool, key: object = diskcache.UNKNOWN) -> tuple[int, int, None, bytes]:
        if read:
            raise TypeError("the index stores JSON values, not files")
        return 0, diskcache.core.MODE_BINARY, None, json.dumps(value).encode()

    def fetch(self, mode: int, filename: object, value: object, read: bool) -> object:
        if read or mode != diskcache.core.MODE_BINARY or filename is not None or not isinstance(value, bytes):
            raise UnsafeIndexRow(f"an index value that is not inline JSON (mode {mode})")
        try:
            return json.loads(value)
        except ValueError:
            raise UnsafeIndexRow("an index value that is not JSON") from None


class Index:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.root / "index"
        self._repair_lock = threading.Lock()
        self._generation = 0
        self._cache, self._identity = self._open()
        self._used: dict[str, float] = {}
        self._flushed = time.monotonic()

    def _open(self) -> tuple[diskcache.Cache, tuple[int, int] | None]:
        """Open the database; one in another format (an older hubd's pickles), or broken, is started afresh.

        Deciding to start afresh happens under a flock: processes opening a new cache at once (eight `hubd pull`s)
        must not delete the database another of them has just created and is using."""
        opened = self._open_current()
        if opened is not None:
            return opened
        fd = os.open(self.store.lock_path("index-open"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            opened = self._open_current(claim_empty=True)
            if opened is not None:
                return opened
            shutil.rmtree(self.path, ignore_errors=True)
            cache = self._connect()
            cache.set(_FORMAT, INDEX_FORMAT)
            return cache, self._file_identity()
        finally:
            os.close(fd)  # releases the flock

    def _open_current(self, claim_empty: bool = False) -> tuple[diskcache.Cache, tuple[int, int] | None] | None:
        """The database if it is in this format (or, with `claim_empty`, empty: then marked as ours), else None."""
        try:
            cache = self._connect()
            marker = cache.get(_FORMAT)
            if marker == INDEX_FORMAT:
                cache.get(_BUILT)
                return cache, self._file_identity()
            if claim_empty and marker is None and len(cache) == 0:
                cache.set(_FORMAT, INDEX_FORMAT)
                return cache, self._file_identity()
            cache.close()
        except _BROKEN:
            pass
        return None

    def _connect(self) -> diskcache.Cache:
        return diskcache.Cache(str(self.path), disk=_DataDisk, eviction_policy="none", size_limit=2**50)

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path / _DB_FILE)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def _check_file(self) -> None:
        """Raise IndexLost when the database file is not the one this index opened, or not SQLite any more."""
        if self._file_identity() != self._identity:
            raise IndexLost(f"{self.path / _DB_FILE} was deleted or replaced")
        with open(self.path / _DB_FILE, "rb") as db:
            if db.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                raise IndexLost(f"{self.path / _DB_FILE} is no longer an SQLite database")

    def _guarded(self, what: str, op: Callable[[], T], default: T, write: bool = True) -> T:
        """Run `op`; on a database failure rebuild the index from the files once and retry, else give up."""
        generation = self._generation
        try:
            if write:
                self._check_file()
            return op()
        except _BROKEN as exc:
            self._repair(generation, what, exc)
        try:
            return op()
        except _BROKEN as exc:
            log.warning("the index at %s still fails after a rebuild (%s); %s skipped", self.path, exc, what)
            return default

    def _repair(self, generation: int, what: str, exc: BaseException) -> None:
        """Reopen the database (a fresh one if it is corrupt or gone) and rebuild it from meta/ and refs/."""
        with self._repair_lock:
            if generation != self._generation:
                return  # another thread repaired it meanwhile
            log.warning(
                "the index at %s failed while %s (%s: %s); rebuilding it from meta/ and refs/",
                self.path,
                what,
                type(exc).__name__,
                exc,
            )
            old = self._cache
            try:
                replaced = isinstance(exc, IndexLost) and _is_sqlite(self.path)  # by another process: keep theirs
                if not replaced:
                    shutil.rmtree(self.path, ignore_errors=True)
                self._cache, self._identity = self._open()  # a fresh object: every thread gets a new connection
                self._rebuild()
            except _BROKEN as again:
                log.warning("rebuilding the index at %s failed too (%s); it stays incomplete", self.path, again)
            finally:
                self._generation += 1
                old.close()

    def rebuild_if_needed(self) -> bool:
        """Rebuild from the store when the index is new or was lost, else add what a crash left out (entries
        published after the index was last written). Returns True if it rebuilt."""
        if self._guarded("reading", lambda: self._cache.get(_BUILT), None, write=False):
            self._guarded("reconciling", self._reconcile, None)
            return False
        self.rebuild()
        return True

    def rebuild(self) -> None:
        self._guarded("rebuilding", self._rebuild, None)

    def _rebuild(self) -> None:
        self._cache.clear()
        self._cache.set(_FORMAT, INDEX_FORMAT)
        for meta in self.store.iter_meta():
            self._record(meta)
            self._cache.set(_USED + meta.digest, meta.fetched_at)
        for ref in self.store.iter_refs():
            self._cache.set(_NAME + ref.canonical, ref.digest)
        self._cache.set(_BUILT, time.time())

    def _reconcile(self) -> None:
        """Entries the files have and the index lacks are added (a crash between a publish and its index
        update), entries whose meta is gone are dropped. One directory listing and one key scan."""
        on_disk = {p.stem for p in self.store.meta_dir.glob("*.json")}
        indexed = {k[len(_ENTRY) :] for k in self._cache.iterkeys() if isinstance(k, str) and k.startswith(_ENTRY)}
        for digest in on_disk - indexed:
            meta = self.store.read_meta(digest)
            if meta is not None:
                self._record(meta)
        for digest in indexed - on_disk:
            self._cache.delete(_ENTRY + digest)
        if on_disk - indexed:
            for ref in self.store.iter_refs():
                self._cache.set(_NAME + ref.canonical, ref.digest)

    def migrate(self, renamed: dict[str, str]) -> None:
        """Rebuild after objects were renamed (old digest -> new), keeping their last-use times."""
        used: dict[str, float] = {}

        def read() -> None:
            for old, new in renamed.items():
                when = self._cache.get(_USED + old)
                if when is not None:
                    used[new] = float(when)

        def write() -> None:
            for digest, when in used.items():
                self._cache.set(_USED + digest, when)

        self._guarded("migrating", read, None, write=False)
        self.rebuild()
        self._guarded("migrating", write, None)

    def record(self, meta: ObjectMeta) -> None:
        def op() -> None:
            if FAULT_INJECTION:
                fault_point("index", "before")
            self._record(meta)

        self._guarded("recording a published entry", op, None)
        if FAULT_INJECTION:
            fault_point("index", "after")

    def _record(self, meta: ObjectMeta) -> None:
        summary = {
            "digest": meta.digest,
            "archive_sha256": meta.archive_sha256,
            "size_bytes": meta.size_bytes,
            "fetched_at": meta.fetched_at,
        }
        self._cache.set(_ENTRY + meta.digest, summary)
        self._cache.add(_USED + meta.digest, meta.fetched_at)

    def bind(self, canonical: str, digest: str) -> None:
        self._guarded("binding a name", lambda: self._cache.set(_NAME + canonical, digest), None)

    def unbind(self, canonical: str) -> None:
        self._guarded("unbinding a name", lambda: self._cache.delete(_NAME + canonical), None)

    def touch(self, digest: str) -> None:
        """Record a use. Kept in memory and written by `flush`: a SQLite write per cache hit would cap the
        daemon's resolve rate, and last-use times only need to be roughly right for eviction."""
        self._used[digest] = time.time()
        if time.monotonic() - self._flushed > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self._used = self._used, {}
        self._flushed = time.monotonic()

        def op() -> None:
            for digest, when in pending.items():
                self._cache.set(_USED + digest, when)

        if pending:
            self._guarded("writing last-use times", op, None)

    def last_used(self, digest: str) -> float | None:
        if digest in self._used:
            return self._used[digest]
        value = self._guarded(
            "reading a last-use time", lambda: self._cache.get(_USED + digest), None, write=False
        )
        return float(value) if value is not None else None

    def forget(self, digest: str) -> None:
        self._used.pop(digest, None)

        def op() -> None:
            self._cache.delete(_ENTRY + digest)
            self._cache.delete(_USED + digest)
            for canonical, bound in self._names():
                if bound == digest:
                    self._cache.delete(_NAME + canonical)

        self._guarded("forgetting an entry", op, None)

    def forget_all(self, digests: Collection[str], names: Iterable[str] = ()) -> None:
        """`forget` many entries, and unbind `names` besides, in one transaction and one scan of the names."""
        doomed = set(digests)
        for digest in doomed:
            self._used.pop(digest, None)
        unbind = set(names)

        def op() -> None:
            with self._cache.transact():
                bound = {canonical for canonical, digest in self._names() if digest in doomed}
                for digest in doomed:
                    self._cache.delete(_ENTRY + digest)
                    self._cache.delete(_USED + digest)
                for canonical in unbind | bound:
                    self._cache.delete(_NAME + canonical)

        if doomed or unbind:
            self._guarded("forgetting entries", op, None)

    def names(self) -> Iterator[tuple[str, str]]:
        none: list[tuple[str, str]] = []
        yield from self._guarded("listing names", self._names, none, write=False)

    def _names(self) -> list[tuple[str, str]]:
        found = []
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith(_NAME):
                value = self._cache.get(key)
                if value is not None:
                    found.append((key[len(_NAME) :], str(value)))
        return found

    def close(self) -> None:
        self.flush()
        self._cache.close()


def _is_sqlite(path: os.PathLike[str]) -> bool:
    try:
        with open(os.path.join(path, _DB_FILE), "rb") as db:
            return db.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError:
        return False
