"""The on-disk cache: private staging, atomic publish, content-addressed objects, refs, quarantine.

Layout under the cache root (see docs/cache-layout.md); every path is built by `hubd_client.layout.CacheLayout`,
which the client's offline reader shares::

    CACHEDIR.TAG            marks the tree as a cache for backup tools
    layout-version          the layout's version (hubd/layout.py): newer is refused, older migrated at start
    objects/<digest>/       published SavedModel trees, read-only, named by their tree digest
    meta/<digest>.json      per object: tree listing (key "manifest"), archive sha256, size, fetch time, names
    refs/<key>.json         per canonical handle: which object it points at
    pins/<digest>.json      objects a manifest pinned (never evicted), with the names that pinned them
    staging/<token>/        private work dirs, each held by a flock on staging/<token>.lock
    pending/<key>.json      a publish in progress for ref <key>: the refs it will write (and <key>.meta.json)
    quarantine/             trees that failed verification, kept for inspection
    locks/<key>.lock        cross-process single-flight locks
    index/                  diskcache index (derived; rebuilt from the files above when lost)

The filesystem is the source of truth. Every visible change is a rename of a complete, fsynced file or
directory, so a crash at any instant leaves either the old state or the new one, plus staging leftovers that
the next start removes. Publishing writes, in order: a pending record (what the refs will be, and the meta),
the object, its meta, its refs, then drops the pending record; `recover_pending` finishes (or forgets) a
publish that a crash interrupted, so an object that reached `objects/` is never downloaded again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubd_client.layout import CacheLayout, is_digest
from hubd_client.paths import cache_dir_problem, system_uids

from hubd.errors import CollectorBusy, UntrustedCache
from hubd.tree import TreeListing

_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by hubd.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)
log = logging.getLogger("hubd.store")
LISTING_SETTLE_NS = 2_000_000_000
"""How old meta/'s mtime must be before a listing of it is reused (see `Store.meta_digests`)."""

FAULT_INJECTION = os.environ.get("HUBD_TEST_FAULT", "")
"""Fault injection, for tests only; read once, empty outside tests, and then every hook is one falsy check.
`kill:<step>` SIGKILLs this process right after publish step <step> completes; `enospc:<step>` makes that
step's write fail with ENOSPC. Steps, in order: pending, object, meta, ref, done (pending record dropped),
index (hubd/index.py)."""


def fault_point(step: str, when: str) -> None:
    """Act on HUBD_TEST_FAULT at `step`: `when` is "before" (ENOSPC) or "after" (SIGKILL) the step's write."""
    action, _, at = FAULT_INJECTION.partition(":")
    if at != step:
        return
    if action == "enospc" and when == "before":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (HUBD_TEST_FAULT at {step})")
    if action == "kill" and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ObjectMeta:
    """What is recorded about a published tree at publish time."""

    digest: str
    archive_sha256: str
    size_bytes: int
    fetched_at: float
    listing: TreeListing
    """Its files and links (stored under the JSON key "manifest", the name it had first)."""
    names: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "archive_sha256": self.archive_sha256,
            "size_bytes": self.size_bytes,
            "fetched_at": self.fetched_at,
            "names": self.names,
            "manifest": self.listing.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectMeta:
        return cls(
            digest=str(data["digest"]),
            archive_sha256=str(data["archive_sha256"]),
            size_bytes=int(data["size_bytes"]),
            fetched_at=float(data["fetched_at"]),
            names=list(data.get("names", [])),
            listing=TreeListing.from_json(data["manifest"]),
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

    def __init__(self, layout: CacheLayout) -> None:
        token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.path = layout.staging_dir(token)
        self.tree = self.path / "tree"
        self._lock_path = layout.staging_lock(token)
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.path.mkdir(mode=0o700)

    def cleanup(self) -> None:
        remove_tree(self.path)
        with suppress(FileNotFoundError):
            self._lock_path.unlink()
        os.close(self._lock_fd)


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created 0600 if missing): the processes that share a cache take turns."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextmanager
def gc_lock(store: Store, shared: bool, wait: bool = True) -> Iterator[None]:
    """The flock that keeps collection (exclusive) and publishing (shared) apart: a directory being published
    is never removed."""
    fd = os.open(store.layout.lock("gc"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise CollectorBusy(
                "a model is being published right now", "run `hubd gc` again in a moment"
            ) from None
        yield
    finally:
        os.close(fd)


class Store:
    """Reads and writes the cache layout; every method is safe to call from several processes at once.

    Every path comes from `layout` (`hubd_client.layout.CacheLayout`), the one definition the client's offline
    reader shares."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.layout = CacheLayout(root)
        self.objects = self.layout.objects
        self.meta_dir = self.layout.meta_dir
        self.refs = self.layout.refs
        self.staging = self.layout.staging
        self.quarantine_dir = self.layout.quarantine
        self.locks = self.layout.locks
        self.pins = self.layout.pins
        self.pending = self.layout.pending
        self._meta_listing: tuple[int, tuple[str, ...]] | None = None

    def prepare_directories(self) -> None:
        """Create the cache's directories (after checking who could change them). Callers open a cache with
        `hubd.layout.open_cache`, which also checks the layout version and finishes interrupted publishes."""
        self.check_trusted()  # before anything is created or read: whoever made the directory owns its models
        try:
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise UntrustedCache(
                f"cannot create the cache directory {self.root}: {exc.strerror}",
                "create it for the daemon's user, or choose another place with HUBD_CACHE_DIR",
            ) from None
        self.check_trusted()
        for public in (self.objects, self.meta_dir, self.refs, self.pins):
            public.mkdir(mode=0o755, exist_ok=True)
        for private in (self.staging, self.quarantine_dir, self.locks, self.pending):
            private.mkdir(mode=0o700, exist_ok=True)
        _make_private(self.layout.index)
        tag = self.layout.cachedir_tag
        if not tag.exists():
            self._write_atomic(tag, _CACHEDIR_TAG.encode())

    def check_trusted(self) -> None:
        """Refuse a cache that anyone but this process's user, root or `hubd` could change (`cache_dir_problem`).

        A SavedModel is a program and the index is a database this process reads: whoever could create the
        cache directory first, write to it or to a directory above it, could choose what every user loads."""
        try:
            problem = cache_dir_problem(self.root, {os.geteuid(), *system_uids()})
        except OSError as exc:
            raise UntrustedCache(
                f"cannot check the cache directory {self.root}: {exc.strerror}",
                "make it and every directory above it searchable by the daemon's user, or set HUBD_CACHE_DIR",
            ) from None
        if problem is not None:
            raise UntrustedCache(
                f"refusing the cache directory {self.root}: {problem}, so another user could choose the models "
                "hubd serves",
                f"if you did not make it that way, someone may be trying to plant models: have root remove "
                f"{self.root}, or set HUBD_CACHE_DIR to a directory only the daemon's user (or root) can write",
            )

    # -- staging -------------------------------------------------------------------------------------

    def new_staging(self) -> StagingDir:
        return StagingDir(self.layout)

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
                remove_tree(self.layout.staging_dir(lock_path.stem))
                lock_path.unlink(missing_ok=True)
                removed += 1
            finally:
                os.close(fd)
        for orphan in self.staging.iterdir():  # a dir whose lock file never got created
            if orphan.is_dir() and not self.layout.staging_lock(orphan.name).exists():
                remove_tree(orphan)
                removed += 1
        return removed

    # -- objects -------------------------------------------------------------------------------------

    def object_path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.layout.object(digest)

    def publish(self, tree: Path, meta: ObjectMeta) -> Path:
        """Make `tree` the read-only object `meta.digest`, with no refs (see `publish_entry`)."""
        self.publish_entry(tree, meta, [])
        return self.object_path(meta.digest)

    def publish_entry(self, tree: Path, meta: ObjectMeta, refs: list[tuple[str, Ref]]) -> ObjectMeta:
        """Publish `tree` as the object `meta.digest` and point `refs` (key, ref) at it; returns the meta as
        published (an earlier publisher's names come first). Call with the gc lock held shared.

        Crash-safe in every order: pending record, object, meta, refs, then the pending record is dropped, so a
        crash leaves an object only beside a record of the refs it was for (`recover_pending` completes them).
        An OSError (a full disk) undoes every step this call made, so it leaves nothing behind."""
        _check_digest(meta.digest)
        _seal_tree(tree, self.fsync)
        key = refs[0][0] if refs else None
        with self._object_lock(meta.digest):
            undo: list[tuple[str, Any]] = []
            try:
                if key is not None:
                    undo.append(("pending", key))
                    self._write_pending(key, meta, refs)
                if FAULT_INJECTION:
                    fault_point("object", "before")
                if self._place_object(tree, meta):
                    undo.append(("object", meta.digest))
                if FAULT_INJECTION:
                    fault_point("object", "after")
                published, previous = self._merge_meta(meta, self.pending_meta_path(key) if key else None)
                if previous is None or previous.names != published.names:
                    undo.append(("meta", previous or meta.digest))
                if FAULT_INJECTION:
                    fault_point("meta", "after")
                for ref_key, ref in refs:
                    undo.append(("ref", (ref_key, self.read_ref(ref_key))))
                    self._write_json(self.layout.ref(ref_key), ref.__dict__, "ref")
                if FAULT_INJECTION:
                    fault_point("ref", "after")
                if key is not None:
                    self._drop_pending(key)
            except OSError:
                self._undo(undo)
                raise
        if FAULT_INJECTION:
            fault_point("done", "after")
        return published

    def _place_object(self, tree: Path, meta: ObjectMeta) -> bool:
        """Rename `tree` to objects/<digest>; True if this call put it there. An existing equal object wins;
        one a crash left without a meta is adopted if it passes the quick check against `meta`, else set aside."""
        from hubd.verify import quick_problems  # verify imports tree only; kept lazy like the other late imports

        target = self.object_path(meta.digest)
        if target.is_dir():
            if self.layout.meta(meta.digest).exists():
                remove_tree(tree)
                return False
            problems = quick_problems(target, meta.listing)
            if not problems:
                remove_tree(tree)
                return True  # an orphan a crash left: ours now, so undone with ours
            self.quarantine(meta.digest, "left without a meta by a crash; " + "; ".join(problems))
        os.rename(tree, target)
        os.chmod(target, 0o555)
        self._fsync_dir(self.objects)
        return True

    def _merge_meta(self, meta: ObjectMeta, staged: Path | None) -> tuple[ObjectMeta, ObjectMeta | None]:
        """Write meta/<digest>.json, keeping an existing one's names first (a losing concurrent publisher only
        adds names). Returns (the meta as written, the meta it replaced). Call under the object lock."""
        previous = self.read_meta(meta.digest)
        if previous is not None:
            merged = ObjectMeta.from_json(previous.to_json())
            merged.names = [*previous.names, *(n for n in meta.names if n not in previous.names)]
            if merged.names != previous.names:
                self._write_json(self.layout.meta(meta.digest), merged.to_json(), "meta")
            if staged is not None:
                staged.unlink(missing_ok=True)
            return merged, previous
        if FAULT_INJECTION:
            fault_point("meta", "before")
        if staged is not None and staged.exists():
            os.rename(staged, self.layout.meta(meta.digest))  # written once, in the pending record
            self._fsync_dir(self.meta_dir)
        else:
            self.write_meta(meta)
        return meta, None

    def _undo(self, steps: list[tuple[str, Any]]) -> None:
        """Take back a failed publish's steps, newest first; each is best effort (the disk may still be full)."""
        for kind, what in reversed(steps):
            try:
                if kind == "ref":
                    ref_key, old = what
                    if old is None:
                        self.remove_ref(ref_key)
                    else:
                        try:
                            self.write_ref(ref_key, old)
                        except OSError:
                            self.remove_ref(ref_key)  # no ref is better than one naming a removed object
                elif kind == "meta" and isinstance(what, ObjectMeta):
                    self.write_meta(what)  # the names before this publish
                elif kind == "meta":
                    self.layout.meta(what).unlink(missing_ok=True)
                elif kind == "object":
                    doomed = self.layout.staging_dir(f"deleted-{what}-{secrets.token_hex(4)}")
                    os.chmod(self.layout.object(what), 0o755)
                    os.rename(self.layout.object(what), doomed)
                    remove_tree(doomed)
                elif kind == "pending":
                    self._drop_pending(what)
            except OSError as exc:
                log.warning("could not undo the %s step of a failed publish: %s", kind, exc)

    def _object_lock(self, digest: str) -> AbstractContextManager[None]:
        """Serialises the publishers and recoverers of one object: its meta is read, merged and written whole."""
        return flocked(self.layout.object_lock(digest))

    # -- pending publishes -----------------------------------------------------------------------------

    def pending_meta_path(self, key: str) -> Path:
        return self.layout.pending_meta(key)

    def _write_pending(self, key: str, meta: ObjectMeta, refs: list[tuple[str, Ref]]) -> None:
        """Record what this publish will write before the object appears: the meta (moved into meta/ later, so it
        is written once) and then the intent naming the digest and refs. The intent exists only with its meta."""
        self._write_json(self.pending_meta_path(key), meta.to_json(), "pending")
        intent = {"digest": meta.digest, "refs": [{"key": k, **ref.__dict__} for k, ref in refs]}
        self._write_json(self.layout.pending_intent(key), intent)
        if FAULT_INJECTION:
            fault_point("pending", "after")

    def _drop_pending(self, key: str) -> None:
        self.layout.pending_intent(key).unlink(missing_ok=True)
        self.pending_meta_path(key).unlink(missing_ok=True)
        for tmp in self.pending.glob(f".{key}.*.tmp"):  # a crash in the middle of writing the record
            tmp.unlink(missing_ok=True)

    def recover_pending(self, key: str | None = None, held: bool = False) -> list[str]:
        """Finish publishes a crash interrupted (all, or ref `key`'s): an object that reached objects/ gets its
        meta and refs; a record whose object never arrived is dropped. Returns the digests re-linked.

        A record whose ref flock is held belongs to a live publisher and is left alone; `held` says the caller
        holds `key`'s flock itself (a fetch about to download, which should rather finish a crashed one's work).
        For one key it costs a stat or two when nothing is pending."""
        try:
            found = [key] if key is not None else [p.name for p in self.pending.iterdir()]
        except OSError:  # none yet, or not ours to read (a read-only user of the cache)
            return []
        keys = sorted({name.lstrip(".").split(".")[0] for name in found})
        done: list[str] = []
        for pending_key in keys:
            try:
                digest = self._recover_one(pending_key, held)
            except OSError as exc:  # a read-only cache, a full disk: the next start tries again
                log.warning("could not finish the interrupted publish of ref %s: %s", pending_key, exc)
                continue
            if digest is not None:
                done.append(digest)
        return done

    def _recover_one(self, key: str, held: bool = False) -> str | None:
        from hubd.verify import quick_problems

        intent_path = self.layout.pending_intent(key)
        if not intent_path.exists() and not any(self.pending.glob(f"*{key}.*")):
            return None
        fd = os.open(self.lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                if not held:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            try:
                intent = json.loads(intent_path.read_text())
                digest = str(intent["digest"])
                _check_digest(digest)
                refs = [(str(r.pop("key")), Ref(**r)) for r in intent["refs"]]
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                self._drop_pending(key)  # the crash came before the intent was whole: nothing was published
                return None
            with gc_lock(self, shared=True), self._object_lock(digest):
                target = self.layout.object(digest)
                staged = self.pending_meta_path(key)
                if not target.is_dir():
                    self._drop_pending(key)
                    return None
                if not self.layout.meta(digest).exists():
                    meta = self.read_meta_file(staged)
                    problems = ["no meta was recorded"] if meta is None else quick_problems(target, meta.listing)
                    if problems:
                        self.quarantine(
                            digest, "an interrupted publish left it incomplete: " + "; ".join(problems)
                        )
                        self._drop_pending(key)
                        return None
                names = [ref.canonical for _key, ref in refs]
                current = self.read_meta_file(staged) or self.read_meta(digest)
                assert current is not None
                current.names = names
                self._merge_meta(current, staged)
                for ref_key, ref in refs:
                    existing = self.read_ref(ref_key)
                    if existing is None or existing.digest == digest or not self._present(existing.digest):
                        self.write_ref(ref_key, ref)
                self._drop_pending(key)
            log.warning("finished the publish of %s that a crash interrupted (no download needed)", names[0])
            return digest
        finally:
            os.close(fd)

    def _present(self, digest: str) -> bool:
        return self.layout.object(digest).is_dir() and self.layout.meta(digest).exists()

    def write_meta(self, meta: ObjectMeta) -> None:
        _check_digest(meta.digest)
        self._write_json(self.layout.meta(meta.digest), meta.to_json())

    def read_meta(self, digest: str) -> ObjectMeta | None:
        return self.read_meta_file(self.layout.meta(digest))

    @staticmethod
    def read_meta_file(path: Path) -> ObjectMeta | None:
        try:
            return ObjectMeta.from_json(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def iter_meta(self) -> Iterator[ObjectMeta]:
        for path in sorted(self.meta_dir.glob("*.json")):
            meta = self.read_meta(path.stem)
            if meta is not None:
                yield meta

    def meta_digests(self) -> tuple[str, ...]:
        """The digest of every meta file, sorted: one listing of meta/, reused while meta/ is unchanged.

        A listing is reused only while meta/'s mtime is what it was, and only if that mtime was already
        LISTING_SETTLE_NS old when the listing was taken: mtimes tick coarsely, so a file added within the same
        tick as the listing would otherwise leave the mtime as it was and go unseen."""
        try:
            mtime = os.stat(self.meta_dir).st_mtime_ns
        except FileNotFoundError:  # a cache not laid out yet holds nothing
            return ()
        cached = self._meta_listing
        if cached is not None and cached[0] == mtime:
            return cached[1]
        taken = time.time_ns()
        with os.scandir(self.meta_dir) as entries:
            digests = tuple(
                sorted(e.name[:-5] for e in entries if e.name.endswith(".json") and not e.name.startswith("."))
            )
        if taken - mtime > LISTING_SETTLE_NS:
            self._meta_listing = (mtime, digests)
        return digests

    def quarantine(self, digest: str, reason: str) -> Path | None:
        """Move a broken object aside so it is never handed out again; its meta stays for re-verification."""
        source = self.object_path(digest)
        if not source.is_dir():
            return None
        dest = self.layout.quarantined(digest, int(time.time() * 1000))
        with suppress(OSError):
            os.chmod(source, 0o755)  # moving a directory to another parent rewrites its '..' entry
        try:
            os.rename(source, dest)
        except FileNotFoundError:
            return None
        self.layout.quarantine_reason(dest).write_text(reason + "\n")
        self._fsync_dir(self.objects)
        return dest

    def remove_object(self, digest: str) -> None:
        """Delete an object and its meta, under its flock so a concurrent publisher of it cannot add names or
        refs to what is going away (it publishes afresh once this is done)."""
        source = self.object_path(digest)
        doomed = self.layout.staging_dir(f"deleted-{digest}-{secrets.token_hex(4)}")
        with self._object_lock(digest):
            with suppress(FileNotFoundError):
                os.chmod(source, 0o755)
                os.rename(source, doomed)  # vanishes atomically, then is removed at leisure
            self.layout.meta(digest).unlink(missing_ok=True)
            self.unpin(digest)
        remove_tree(doomed)

    # -- refs ----------------------------------------------------------------------------------------

    def read_ref(self, key: str) -> Ref | None:
        try:
            data = json.loads(self.layout.ref(key).read_text())
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
        self._write_json(self.layout.ref(key), ref.__dict__)

    def remove_ref(self, key: str) -> None:
        self.layout.ref(key).unlink(missing_ok=True)

    def iter_refs(self) -> Iterator[Ref]:
        for _key, ref in self.ref_items():
            yield ref

    def ref_items(self) -> Iterator[tuple[str, Ref]]:
        """(key, ref) of every readable ref, in one directory listing."""
        for path in sorted(self.refs.glob("*.json")):
            ref = self.read_ref(path.stem)
            if ref is not None:
                yield path.stem, ref

    def refs_since(self, since: float | None) -> Iterator[Ref]:
        """The refs written at or after `since` (epoch seconds; every ref when None). A ref is renamed into place,
        which changes refs/'s mtime, so with nothing new this is one stat; else one listing and a stat per ref,
        and only the new refs are read. Mtimes tick coarsely: LISTING_SETTLE_NS before `since` counts too."""
        if since is None:
            yield from self.iter_refs()
            return
        floor = int(since * 1e9) - LISTING_SETTLE_NS
        if os.stat(self.refs).st_mtime_ns < floor:
            return
        with os.scandir(self.refs) as entries:
            fresh = [
                e.name[:-5]
                for e in entries
                if e.name.endswith(".json")
                and not e.name.startswith(".")
                and e.stat(follow_symlinks=False).st_mtime_ns >= floor
            ]
        for key in sorted(fresh):
            ref = self.read_ref(key)
            if ref is not None:
                yield ref

    def object_digests(self) -> set[str]:
        """The digests of the published trees present (one directory listing; quarantined ones are not)."""
        with os.scandir(self.objects) as entries:
            return {entry.name for entry in entries if entry.is_dir()}

    # -- pins --------------------------------------------------------------------------------------------

    def pin(self, digest: str, name: str) -> None:
        names = self.pin_names(digest)
        if name not in names:
            self._write_json(self.layout.pin(digest), {"names": [*names, name]})

    def unpin(self, digest: str) -> None:
        self.layout.pin(digest).unlink(missing_ok=True)

    def is_pinned(self, digest: str) -> bool:
        return os.path.exists(self.layout.pin(digest))

    def pinned_digests(self) -> set[str]:
        """Every pinned object's digest, in one directory listing."""
        return {name[: -len(".json")] for name in os.listdir(self.pins) if name.endswith(".json")}

    def pin_names(self, digest: str) -> list[str]:
        try:
            return list(json.loads(self.layout.pin(digest).read_text())["names"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []

    def lock_path(self, key: str) -> Path:
        return self.layout.lock(key)

    # -- atomic files --------------------------------------------------------------------------------

    def write_file(self, path: Path, payload: bytes) -> None:
        """Write `path` atomically (temp file, fsync, rename, fsync of the directory)."""
        self._write_atomic(path, payload)

    def _write_json(self, path: Path, data: dict[str, Any], fault_step: str = "") -> None:
        self._write_atomic(path, json.dumps(data, sort_keys=True).encode(), fault_step)

    def _write_atomic(self, path: Path, payload: bytes, fault_step: str = "") -> None:
        """Temp file, write all, fsync, rename, fsync the directory; on any error the temp file is removed."""
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                if FAULT_INJECTION and fault_step:
                    fault_point(fault_step, "before")
                view = memoryview(payload)
                while view:  # os.write may write less than asked (a nearly full disk)
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
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
    if not is_digest(digest):
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


def _make_private(directory: Path) -> None:
    """The index's directory is the daemon's alone (no client reads it): 0700, also on a cache an older hubd
    made, where diskcache had created it 0755. Open to others, SQLite's shared-memory file (0644) let any local
    user hold the byte-range lock every writer needs, and diskcache waits for it forever: each publish and each
    hit's index update stalled for as long as the lock was held."""
    directory.mkdir(mode=0o700, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        try:
            directory.chmod(0o700)
        except PermissionError:  # another of the trusted owners made it: its own start will close it
            log.warning("%s is open to other users; start hubd as its owner once to close it", directory)
