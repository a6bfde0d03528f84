"""A diskcache index of entries (summaries, names, last-use times, totals) for listing and status without
scanning the store.

It is derived, never the source of truth: refs and meta files in the store are. When the index is lost, or
its database is corrupt, it is rebuilt from them; only `last_used` cannot be recovered and restarts at the
fetch time. diskcache is SQLite underneath, so several processes may update it at once.

Every row of an entry is tagged with its digest (diskcache's tag index), so everything about one entry (its
summary, its last use, the names bound to it) is found and dropped with one indexed `evict(digest)`, never a
scan of the keys; updates that touch several rows (a forget and the totals, a batch of last-use times) run in
one transaction. Totals (entries, bytes, per-user usage) are kept in one row updated in those transactions, so
`status` reads one row instead of every entry.

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
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import TypedDict, TypeVar

import diskcache

from hubd.store import FAULT_INJECTION, ObjectMeta, Store, fault_point

_ENTRY = "entry:"
"""entry:<digest> -> its Summary; tagged <digest>."""
_NAME = "name:"
"""name:<canonical> -> the digest it is bound to; tagged with that digest."""
_USED = "used:"
"""used:<digest> -> epoch seconds of its last use; tagged <digest>."""
_TOTALS = "totals"
"""{"entries": n, "size_bytes": s, "users": {"<uid>": [entries, size_bytes]}} over every summary."""
_DONE = "done:"
"""done:<job> -> when a one-off job (see `last_run`) last ran on this index; gone when the index is rebuilt."""
_BUILT = "built"
_FORMAT = "format"
INDEX_FORMAT = 3
"""The index's own format: 3 tags rows with their digest and keeps summaries with names and users, and totals;
2 stored JSON values (_DataDisk) untagged; 1 (no marker) stored pickles. Another format than this one is thrown
away and rebuilt from the files."""
_BATCH = 1000
"""Rows written per transaction while rebuilding: other processes' writes wait for at most one batch."""
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


class Summary(TypedDict):
    """What listing and status need of an entry, without reading its meta file (which holds the whole tree)."""

    digest: str
    archive_sha256: str
    size_bytes: int
    fetched_at: float
    names: list[str]
    users: list[int]


class Totals(TypedDict):
    entries: int
    size_bytes: int
    users: dict[str, list[int]]
    """uid (as a string: JSON keys) -> [entries, size_bytes] of the entries that uid asked for."""


def _no_totals() -> Totals:
    return {"entries": 0, "size_bytes": 0, "users": {}}


class Index:
    def __init__(self, store: Store, users_of: Callable[[str], Iterable[int]] | None = None) -> None:
        """`users_of(digest)`: who asked for an entry (the catalog's record), read when rebuilding."""
        self.store = store
        self.path = store.layout.index
        self.users_of = users_of
        self._repair_lock = threading.Lock()
        self._fd_lock = threading.Lock()
        self._db_fd: int | None = None
        self._generation = 0
        self._cache, self._identity = self._open()
        self._used: dict[str, float] = {}
        self._flushed = time.monotonic()
        self.on_touch: Callable[[str], None] | None = None
        """Called with the digest of each use (from any thread): the watcher watches what is in use."""
        self.caught_up = False
        """Whether opening it had to bring it up to date with the files (a rebuild, or a reconcile after a
        crash): derived views (tfhub_modules/) may be behind too."""

    def _open(self) -> tuple[diskcache.Cache, tuple[int, int] | None]:
        """Open the database; one in another format (an older hubd's), or broken, is started afresh.

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
        return diskcache.Cache(
            str(self.path), disk=_DataDisk, eviction_policy="none", size_limit=2**50, tag_index=True
        )

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path / _DB_FILE)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def _check_file(self) -> None:
        """Raise IndexLost when the database file is not the one this index opened, or not SQLite any more.

        The header is read through one descriptor kept open for the database's life, never one opened and closed
        per check: closing any descriptor of a file drops every POSIX lock this process holds on it, SQLite's
        included, and another process (an in-process `hubd pull` beside the daemon) then took itself for the
        last connection and reset the WAL under the daemon, whose next read failed with "disk I/O error" and
        rebuilt the whole index (2 runs in 5 of tests/test_redteam_today.py's crashed pull; none in 8 after)."""
        if self._file_identity() != self._identity:
            raise IndexLost(f"{self.path / _DB_FILE} was deleted or replaced")
        if os.pread(self._header_fd(), len(_SQLITE_MAGIC), 0) != _SQLITE_MAGIC:
            raise IndexLost(f"{self.path / _DB_FILE} is no longer an SQLite database")

    def _header_fd(self) -> int:
        """A descriptor of the database file this index opened, opened once (see `_check_file`)."""
        with self._fd_lock:
            if self._db_fd is None:
                fd = os.open(self.path / _DB_FILE, os.O_RDONLY | os.O_CLOEXEC)
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) != self._identity:
                    os.close(fd)  # another file than ours: closing it drops none of our locks
                    raise IndexLost(f"{self.path / _DB_FILE} was deleted or replaced")
                self._db_fd = fd
            return self._db_fd

    def _forget_header_fd(self) -> None:
        """Close the header descriptor: only with this index's connections to that file closed or abandoned."""
        with self._fd_lock:
            if self._db_fd is not None:
                os.close(self._db_fd)
                self._db_fd = None

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
            self._forget_header_fd()  # the old file's: the next check opens the new one's
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

    # -- keeping up with the files ----------------------------------------------------------------------

    def rebuild_if_needed(self) -> bool:
        """Rebuild from the store when the index is new or was lost, else check it against the files and add
        what a crash left out. Returns True if it rebuilt.

        The check costs one listing of meta/ and one row: the totals count every entry recorded, so a crash
        between a publish (or a removal) and its index update shows as a count that differs from the files'.
        Only then are the entries looked up one by one (`_reconcile`)."""
        if self._guarded("reading", lambda: self._cache.get(_BUILT), None, write=False):
            on_disk = self.store.meta_digests()
            if self.totals()["entries"] != len(on_disk):
                self.caught_up = True
                self._guarded("reconciling", lambda: self._reconcile(on_disk), None)
            return False
        self.rebuild()
        return True

    def rebuild(self) -> None:
        self.caught_up = True
        self._guarded("rebuilding", self._rebuild, None)

    def _rebuild(self) -> None:
        self._cache.clear()
        self._cache.set(_FORMAT, INDEX_FORMAT)
        bound: dict[str, list[str]] = {}
        names = [(ref.canonical, ref.digest) for ref in self.store.iter_refs()]
        for canonical, digest in names:
            bound.setdefault(digest, []).append(canonical)
        totals = _no_totals()
        for batch in _batches(self.store.iter_meta(), _BATCH):
            with self._cache.transact(retry=True):
                for meta in batch:
                    summary = self._summary(meta, bound.get(meta.digest, ()))
                    self._cache.set(_ENTRY + meta.digest, summary, tag=meta.digest)
                    self._cache.set(_USED + meta.digest, meta.fetched_at, tag=meta.digest)
                    _count(totals, summary, 1)
        for pairs in _batches(iter(names), _BATCH):
            with self._cache.transact(retry=True):
                for canonical, digest in pairs:
                    self._cache.set(_NAME + canonical, digest, tag=digest)
        self._cache.set(_TOTALS, totals)
        self._cache.set(_BUILT, time.time())

    def _reconcile(self, on_disk: Sequence[str]) -> None:
        """Entries the files have and the index lacks are added (a crash between a publish and its index
        update), entries the index has and the files lack are dropped (a crash between a removal and its index
        update), and the totals are counted again over the entries on disk.

        Dropping needs one pass over the keys (this runs only when the counts disagree): a row left behind would
        make a later publish of the same digest look like a re-publish, never counted in the totals, and the
        quota would then read every file on each fetch (`size_bytes` no longer agreeing with meta/)."""
        present = set(on_disk)
        stale = [
            key[len(_ENTRY) :]
            for key in self._cache.iterkeys()
            if isinstance(key, str) and key.startswith(_ENTRY) and key[len(_ENTRY) :] not in present
        ]
        for batch in _batches(iter(stale), _BATCH):
            with self._cache.transact(retry=True):
                for digest in batch:
                    if not self.store.layout.meta(digest).exists():  # else published since the listing
                        self._cache.evict(digest, retry=True)
        totals = _no_totals()
        for batch in _batches(iter(on_disk), _BATCH):
            with self._cache.transact(retry=True):
                for digest in batch:
                    summary = self._cache.get(_ENTRY + digest)
                    if summary is None:
                        meta = self.store.read_meta(digest)
                        if meta is None:
                            continue
                        summary = self._summary(meta, meta.names)
                        self._cache.set(_ENTRY + digest, summary, tag=digest)
                        self._cache.add(_USED + digest, meta.fetched_at, tag=digest)
                        for canonical in meta.names:
                            self._cache.add(_NAME + canonical, digest, tag=digest)
                    _count(totals, summary, 1)
        self._cache.set(_TOTALS, totals)

    def _summary(self, meta: ObjectMeta, names: Iterable[str]) -> Summary:
        users = sorted(set(self.users_of(meta.digest))) if self.users_of is not None else []
        return {
            "digest": meta.digest,
            "archive_sha256": meta.archive_sha256,
            "size_bytes": meta.size_bytes,
            "fetched_at": meta.fetched_at,
            "names": list(dict.fromkeys([*meta.names, *names])),
            "users": users,
        }

    def migrate(self, renamed: dict[str, str]) -> None:
        """Rebuild after objects were renamed (old digest -> new), keeping their last-use times."""
        used: dict[str, float] = {}

        def read() -> None:
            for old, new in renamed.items():
                when = self._cache.get(_USED + old)
                if when is not None:
                    used[new] = float(when)

        def write() -> None:
            with self._cache.transact(retry=True):
                for digest, when in used.items():
                    self._cache.set(_USED + digest, when, tag=digest)

        self._guarded("migrating", read, None, write=False)
        self.rebuild()
        self._guarded("migrating", write, None)

    def last_run(self, job: str) -> float | None:
        """When the one-off `job` (a clean-up of what an older hubd left, a catch-up of a derived view) last ran on
        this index, or None: then it has to run in full (as after a rebuild, when the files may hold anything)."""
        when = self._guarded("reading", lambda: self._cache.get(_DONE + job), None, write=False)
        return float(when) if when is not None else None

    def forget_run(self, job: str) -> None:
        """Make `job` run in full next time (what it keeps up was not kept up meanwhile)."""
        self._guarded("recording a job", lambda: self._cache.delete(_DONE + job), None)

    def ran(self, job: str, started: float) -> None:
        """Record that `job` ran, having started at `started` (what it saw is what was there by then)."""
        self._guarded("recording a job", lambda: self._cache.set(_DONE + job, started), None)

    # -- writes -----------------------------------------------------------------------------------------

    def record(self, meta: ObjectMeta) -> None:
        def op() -> None:
            if FAULT_INJECTION:
                fault_point("index", "before")
            with self._cache.transact(retry=True):
                previous: Summary | None = self._cache.get(_ENTRY + meta.digest)
                summary = self._summary(meta, previous["names"] if previous else ())
                if previous is not None:
                    summary["users"] = previous["users"]
                self._cache.set(_ENTRY + meta.digest, summary, tag=meta.digest)
                self._cache.add(_USED + meta.digest, meta.fetched_at, tag=meta.digest)
                if previous is None:
                    self._change_totals(lambda totals: _count(totals, summary, 1))

        self._guarded("recording a published entry", op, None)
        if FAULT_INJECTION:
            fault_point("index", "after")

    def bind(self, canonical: str, digest: str) -> None:
        def op() -> None:
            with self._cache.transact(retry=True):
                self._cache.set(_NAME + canonical, digest, tag=digest)
                summary: Summary | None = self._cache.get(_ENTRY + digest)
                if summary is not None and canonical not in summary["names"]:
                    summary["names"].append(canonical)
                    self._cache.set(_ENTRY + digest, summary, tag=digest)

        self._guarded("binding a name", op, None)

    def unbind(self, canonical: str) -> None:
        self._guarded("unbinding a name", lambda: self._cache.delete(_NAME + canonical), None)

    def attribute(self, digest: str, uid: int) -> None:
        """Record that `uid` asked for the entry, in its summary and in that uid's totals."""

        def op() -> None:
            with self._cache.transact(retry=True):
                summary: Summary | None = self._cache.get(_ENTRY + digest)
                if summary is None or uid in summary["users"]:
                    return
                summary["users"] = sorted([*summary["users"], uid])
                self._cache.set(_ENTRY + digest, summary, tag=digest)

                def add(totals: Totals) -> None:
                    row = totals["users"].setdefault(str(uid), [0, 0])
                    row[0] += 1
                    row[1] += summary["size_bytes"]

                self._change_totals(add)

        self._guarded("recording a user", op, None)

    def touch(self, digest: str) -> None:
        """Record a use. Kept in memory and written by `flush`: a SQLite write per cache hit would cap the
        daemon's resolve rate, and last-use times only need to be roughly right for eviction."""
        self._used[digest] = time.time()
        if self.on_touch is not None:
            self.on_touch(digest)
        if time.monotonic() - self._flushed > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the last-use times kept in memory, all in one transaction (one commit, not one per entry)."""
        pending, self._used = self._used, {}
        self._flushed = time.monotonic()

        def op() -> None:
            with self._cache.transact(retry=True):
                for digest, when in pending.items():
                    self._cache.set(_USED + digest, when, tag=digest)

        if pending:
            self._guarded("writing last-use times", op, None)

    def forget(self, digest: str) -> None:
        self.forget_all([digest])

    def forget_all(self, digests: Collection[str], names: Iterable[str] = ()) -> None:
        """Drop every row of each entry (summary, last use, the names bound to it: one indexed `evict` by its
        tag), and unbind `names` besides, in one transaction."""
        doomed = set(digests)
        for digest in doomed:
            self._used.pop(digest, None)
        unbind = set(names)

        def op() -> None:
            with self._cache.transact(retry=True):
                gone: list[Summary] = []
                for digest in doomed:
                    summary: Summary | None = self._cache.get(_ENTRY + digest)
                    self._cache.evict(digest, retry=True)
                    if summary is not None:
                        gone.append(summary)
                for canonical in unbind:
                    self._cache.delete(_NAME + canonical)
                if gone:

                    def drop(totals: Totals) -> None:
                        for summary in gone:
                            _count(totals, summary, -1)

                    self._change_totals(drop)

        if doomed or unbind:
            self._guarded("forgetting entries", op, None)

    def _change_totals(self, change: Callable[[Totals], None]) -> None:
        """Read, change and write the totals row: call inside a transaction, so no other writer interleaves."""
        totals: Totals = self._cache.get(_TOTALS) or _no_totals()
        change(totals)
        self._cache.set(_TOTALS, totals)

    # -- reads --------------------------------------------------------------------------------------------

    def last_used(self, digest: str) -> float | None:
        if digest in self._used:
            return self._used[digest]
        value = self._guarded(
            "reading a last-use time", lambda: self._cache.get(_USED + digest), None, write=False
        )
        return float(value) if value is not None else None

    def summary(self, digest: str) -> Summary | None:
        """The entry's summary, or None when the index does not know it (then read its meta)."""
        found: Summary | None = self._guarded(
            "reading an entry", lambda: self._cache.get(_ENTRY + digest), None, write=False
        )
        return found

    def digest_of(self, canonical: str) -> str | None:
        """The digest a canonical name is bound to."""
        found = self._guarded("reading a name", lambda: self._cache.get(_NAME + canonical), None, write=False)
        return str(found) if found is not None else None

    def names_of(self, digest: str) -> list[str]:
        """The names bound to an entry now: its summary's names that still point at it (a few look-ups)."""

        def op() -> list[str]:
            summary: Summary | None = self._cache.get(_ENTRY + digest)
            names = summary["names"] if summary is not None else []
            return [name for name in names if self._cache.get(_NAME + name) == digest]

        none: list[str] = []
        return self._guarded("reading names", op, none, write=False)

    def size_bytes(self) -> int | None:
        """Bytes of every entry recorded, from the totals row, if that row counts as many entries as meta/ holds
        files; None when the index cannot tell, so a caller falls back to the files.

        It cannot tell without a totals row, on a database error, or when the count disagrees: a model another
        process published beside the daemon and died before indexing (`hubd pull` in its own process on the
        daemon's cache), a publish a rebuild's final totals overwrote, an index write that was skipped. Such a row
        under-reports, and a quota trusting it would let the cache grow past it unnoticed. The check is one
        listing of meta/ (`Store.meta_digests`, reused while meta/ is unchanged), not a read of every meta."""
        totals = self.totals()
        return totals["size_bytes"] if totals["entries"] == len(self.store.meta_digests()) else None

    def totals(self) -> Totals:
        """Entries, bytes and per-uid usage of every entry recorded (one row)."""
        found: Totals | None = self._guarded("reading totals", lambda: self._cache.get(_TOTALS), None, write=False)
        return found if found is not None else _no_totals()

    def close(self) -> None:
        self.flush()
        self._cache.close()
        self._forget_header_fd()


def _count(totals: Totals, summary: Summary, sign: int) -> None:
    totals["entries"] += sign
    totals["size_bytes"] += sign * summary["size_bytes"]
    for uid in summary["users"]:
        row = totals["users"].setdefault(str(uid), [0, 0])
        row[0] += sign
        row[1] += sign * summary["size_bytes"]
        if row[0] <= 0:
            del totals["users"][str(uid)]


def _batches(items: Iterator[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _is_sqlite(path: os.PathLike[str]) -> bool:
    try:
        with open(os.path.join(path, _DB_FILE), "rb") as db:
            return db.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError:
        return False
