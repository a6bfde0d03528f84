"""The on-disk cache: private staging, atomic publish, content-addressed objects, refs, quarantine.

Layout under the cache root (see docs/cache-layout.md)::

    CACHEDIR.TAG            marks the tree as a cache for backup tools
    layout-version          the layout's version (hubd/layout.py): newer is refused, older migrated at start
    objects/<digest>/       published SavedModel trees, read-only, named by their tree digest
    meta/<digest>.json      per object: tree manifest, archive sha256, size, fetch time, names
    refs/<key>.json         per canonical handle: which object it points at
    pins/<digest>.json      objects a manifest pinned (never evicted), with the names that pinned them
    staging/<token>/        private work dirs, each held by a flock on staging/<token>.lock
    quarantine/             trees that failed verification, kept for inspection
    locks/<key>.lock        cross-process single-flight locks
    index/                  diskcache index (derived; rebuilt from the files above when lost)

The filesystem is the source of truth. Every visible change is a rename of a complete, fsynced file or
directory, so a crash at any instant leaves either the old state or the new one, plus staging leftovers that
the next start removes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubd.tree import TreeManifest

_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by hubd.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)
_DIGEST_CHARS = set("0123456789abcdef")


@dataclass
class ObjectMeta:
    """What is recorded about a published tree at publish time."""

    digest: str
    archive_sha256: str
    size_bytes: int
    fetched_at: float
    manifest: TreeManifest
    names: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "archive_sha256": self.archive_sha256,
            "size_bytes": self.size_bytes,
            "fetched_at": self.fetched_at,
            "names": self.names,
            "manifest": self.manifest.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectMeta:
        return cls(
            digest=str(data["digest"]),
            archive_sha256=str(data["archive_sha256"]),
            size_bytes=int(data["size_bytes"]),
            fetched_at=float(data["fetched_at"]),
            names=list(data.get("names", [])),
            manifest=TreeManifest.from_json(data["manifest"]),
        )


@dataclass
class Ref:
    canonical: str
    handle: str
    """The handle as first given (with its scheme), so the entry can be fetched again to heal it."""
    digest: str
    archive_sha256: str
    updated_at: float


class StagingDir:
    """A private directory to extract into, held by a flock so a crashed owner's leftovers can be recognised."""

    def __init__(self, root: Path) -> None:
        token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.path = root / token
        self.tree = self.path / "tree"
        self._lock_path = root / f"{token}.lock"
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.path.mkdir(mode=0o700)

    def cleanup(self) -> None:
        remove_tree(self.path)
        with suppress(FileNotFoundError):
            self._lock_path.unlink()
        os.close(self._lock_fd)


class Store:
    """Reads and writes the cache layout; every method is safe to call from several processes at once."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.objects = root / "objects"
        self.meta_dir = root / "meta"
        self.refs = root / "refs"
        self.staging = root / "staging"
        self.quarantine_dir = root / "quarantine"
        self.locks = root / "locks"
        self.pins = root / "pins"

    def ensure_layout(self) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        for public in (self.objects, self.meta_dir, self.refs, self.pins):
            public.mkdir(mode=0o755, exist_ok=True)
        for private in (self.staging, self.quarantine_dir, self.locks):
            private.mkdir(mode=0o700, exist_ok=True)
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            self._write_atomic(tag, _CACHEDIR_TAG.encode())
        from hubd.layout import open_layout  # imports the index and view modules, which import this one

        open_layout(self)

    # -- staging -------------------------------------------------------------------------------------

    def new_staging(self) -> StagingDir:
        return StagingDir(self.staging)

    def clean_stale_staging(self) -> int:
        """Remove staging dirs whose owner died (its flock is free). Returns how many were removed."""
        removed = 0
        for lock_path in self.staging.glob("*.lock"):
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                remove_tree(self.staging / lock_path.stem)
                lock_path.unlink(missing_ok=True)
                removed += 1
            finally:
                os.close(fd)
        for orphan in self.staging.iterdir():  # a dir whose lock file never got created
            if orphan.is_dir() and not (self.staging / f"{orphan.name}.lock").exists():
                remove_tree(orphan)
                removed += 1
        return removed

    # -- objects -------------------------------------------------------------------------------------

    def object_path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.objects / digest

    def publish(self, tree: Path, meta: ObjectMeta) -> Path:
        """Make `tree` the read-only object `meta.digest`, atomically. An existing equal object wins."""
        target = self.object_path(meta.digest)
        existing = self.read_meta(meta.digest)
        if existing is not None and target.is_dir():
            self._add_names(existing, meta.names)
            remove_tree(tree)
            return target
        _seal_tree(tree, self.fsync)
        self.write_meta(meta)
        try:
            os.rename(tree, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_tree(tree)  # another process published the same content first
            return target
        os.chmod(target, 0o555)
        self._fsync_dir(self.objects)
        return target

    def write_meta(self, meta: ObjectMeta) -> None:
        _check_digest(meta.digest)
        self._write_json(self.meta_dir / f"{meta.digest}.json", meta.to_json())

    def read_meta(self, digest: str) -> ObjectMeta | None:
        try:
            data = json.loads((self.meta_dir / f"{digest}.json").read_text())
            return ObjectMeta.from_json(data)
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def _add_names(self, meta: ObjectMeta, names: list[str]) -> None:
        new = [n for n in names if n not in meta.names]
        if new:
            meta.names = [*meta.names, *new]
            self._write_json(self.meta_dir / f"{meta.digest}.json", meta.to_json())

    def iter_meta(self) -> Iterator[ObjectMeta]:
        for path in sorted(self.meta_dir.glob("*.json")):
            meta = self.read_meta(path.stem)
            if meta is not None:
                yield meta

    def quarantine(self, digest: str, reason: str) -> Path | None:
        """Move a broken object aside so it is never handed out again; its meta stays for re-verification."""
        source = self.object_path(digest)
        if not source.is_dir():
            return None
        dest = self.quarantine_dir / f"{digest}.{int(time.time() * 1000)}"
        with suppress(OSError):
            os.chmod(source, 0o755)  # moving a directory to another parent rewrites its '..' entry
        try:
            os.rename(source, dest)
        except FileNotFoundError:
            return None
        (self.quarantine_dir / f"{dest.name}.reason").write_text(reason + "\n")
        self._fsync_dir(self.objects)
        return dest

    def remove_object(self, digest: str) -> None:
        """Delete an object and its meta: first the meta (so it stops counting), then the tree."""
        source = self.object_path(digest)
        doomed = self.staging / f"deleted-{digest}-{secrets.token_hex(4)}"
        with suppress(FileNotFoundError):
            os.chmod(source, 0o755)
            os.rename(source, doomed)  # vanishes atomically, then is removed at leisure
        (self.meta_dir / f"{digest}.json").unlink(missing_ok=True)
        self.unpin(digest)
        remove_tree(doomed)

    # -- refs ----------------------------------------------------------------------------------------

    def read_ref(self, key: str) -> Ref | None:
        try:
            data = json.loads((self.refs / f"{key}.json").read_text())
            return Ref(
                canonical=str(data["canonical"]),
                handle=str(data["handle"]),
                digest=str(data["digest"]),
                archive_sha256=str(data["archive_sha256"]),
                updated_at=float(data["updated_at"]),
            )
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def write_ref(self, key: str, ref: Ref) -> None:
        self._write_json(self.refs / f"{key}.json", ref.__dict__)

    def remove_ref(self, key: str) -> None:
        (self.refs / f"{key}.json").unlink(missing_ok=True)

    def iter_refs(self) -> Iterator[Ref]:
        for path in sorted(self.refs.glob("*.json")):
            ref = self.read_ref(path.stem)
            if ref is not None:
                yield ref

    # -- pins --------------------------------------------------------------------------------------------

    def pin(self, digest: str, name: str) -> None:
        names = self.pin_names(digest)
        if name not in names:
            self._write_json(self.pins / f"{digest}.json", {"names": [*names, name]})

    def unpin(self, digest: str) -> None:
        (self.pins / f"{digest}.json").unlink(missing_ok=True)

    def is_pinned(self, digest: str) -> bool:
        return os.path.exists(f"{self.pins}/{digest}.json")

    def pin_names(self, digest: str) -> list[str]:
        try:
            return list(json.loads((self.pins / f"{digest}.json").read_text())["names"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []

    def lock_path(self, key: str) -> Path:
        return self.locks / f"{key}.lock"

    # -- atomic files --------------------------------------------------------------------------------

    def write_file(self, path: Path, payload: bytes) -> None:
        """Write `path` atomically (temp file, fsync, rename, fsync of the directory)."""
        self._write_atomic(path, payload)

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        self._write_atomic(path, json.dumps(data, sort_keys=True).encode())

    def _write_atomic(self, path: Path, payload: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, payload)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_dir(path.parent)

    def _fsync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_digest(digest: str) -> None:
    if len(digest) != 64 or not set(digest) <= _DIGEST_CHARS:
        raise ValueError(f"not a tree digest: {digest!r}")


def _seal_tree(tree: Path, fsync: bool) -> None:
    """Make every file 0444 and every directory below the top 0555, and flush the directory entries."""
    for dirpath, _dirnames, filenames in os.walk(tree, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o444)
        if fsync:
            fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if dirpath != str(tree):
            os.chmod(dirpath, 0o555)


def remove_tree(path: Path) -> None:
    """Remove a tree even when it was sealed read-only."""
    if not os.path.lexists(path):
        return

    def _make_writable_and_retry(func: Any, failed: str, _exc: Any) -> None:
        parent = os.path.dirname(failed)
        with suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with suppress(OSError):
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, stat.S_IRWXU)
        with suppress(FileNotFoundError):
            func(failed)

    for dirpath, _dirnames, _files in os.walk(path):
        with suppress(OSError):
            os.chmod(dirpath, stat.S_IRWXU)
    shutil.rmtree(path, onerror=_make_writable_and_retry)
