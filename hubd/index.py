"""A diskcache index of entries (names, digests, sizes, fetch and last-use times) for fast listing.

It is derived, never the source of truth: refs and meta files in the store are. When the index is lost, or
its database is corrupt, it is rebuilt from them; only `last_used` cannot be recovered and restarts at the
fetch time. diskcache is SQLite underneath, so several processes may update it at once.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator

import diskcache

from hubd.store import ObjectMeta, Store

_ENTRY = "entry:"
_NAME = "name:"
_USED = "used:"
_BUILT = "built"
_FLUSH_SECONDS = 5.0


class Index:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.root / "index"
        self._cache = self._open()
        self._used: dict[str, float] = {}
        self._flushed = time.monotonic()

    def _open(self) -> diskcache.Cache:
        try:
            cache = diskcache.Cache(str(self.path), eviction_policy="none", size_limit=2**50)
            cache.get(_BUILT)
            return cache
        except (sqlite3.DatabaseError, OSError):
            shutil.rmtree(self.path, ignore_errors=True)
            return diskcache.Cache(str(self.path), eviction_policy="none", size_limit=2**50)

    def rebuild_if_needed(self) -> bool:
        """Rebuild from the store when the index is new or was lost. Returns True if it did."""
        if self._cache.get(_BUILT):
            return False
        self.rebuild()
        return True

    def rebuild(self) -> None:
        self._cache.clear()
        for meta in self.store.iter_meta():
            self.record(meta)
            self._cache.set(_USED + meta.digest, meta.fetched_at)
        for ref in self.store.iter_refs():
            self._cache.set(_NAME + ref.canonical, ref.digest)
        self._cache.set(_BUILT, time.time())

    def migrate(self, renamed: dict[str, str]) -> None:
        """Rebuild after objects were renamed (old digest -> new), keeping their last-use times."""
        used = {new: self._cache.get(_USED + old) for old, new in renamed.items()}
        self.rebuild()
        for digest, when in used.items():
            if when is not None:
                self._cache.set(_USED + digest, when)

    def record(self, meta: ObjectMeta) -> None:
        summary = {
            "digest": meta.digest,
            "archive_sha256": meta.archive_sha256,
            "size_bytes": meta.size_bytes,
            "fetched_at": meta.fetched_at,
        }
        self._cache.set(_ENTRY + meta.digest, summary)
        self._cache.add(_USED + meta.digest, meta.fetched_at)

    def bind(self, canonical: str, digest: str) -> None:
        self._cache.set(_NAME + canonical, digest)

    def unbind(self, canonical: str) -> None:
        self._cache.delete(_NAME + canonical)

    def touch(self, digest: str) -> None:
        """Record a use. Kept in memory and written by `flush`: a SQLite write per cache hit would cap the
        daemon's resolve rate, and last-use times only need to be roughly right for eviction."""
        self._used[digest] = time.time()
        if time.monotonic() - self._flushed > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self._used = self._used, {}
        self._flushed = time.monotonic()
        for digest, when in pending.items():
            self._cache.set(_USED + digest, when)

    def last_used(self, digest: str) -> float | None:
        if digest in self._used:
            return self._used[digest]
        value = self._cache.get(_USED + digest)
        return float(value) if value is not None else None

    def forget(self, digest: str) -> None:
        self._used.pop(digest, None)
        self._cache.delete(_ENTRY + digest)
        self._cache.delete(_USED + digest)
        for canonical, bound in list(self.names()):
            if bound == digest:
                self.unbind(canonical)

    def names(self) -> Iterator[tuple[str, str]]:
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith(_NAME):
                value = self._cache.get(key)
                if value is not None:
                    yield key[len(_NAME) :], str(value)

    def close(self) -> None:
        self.flush()
        self._cache.close()
