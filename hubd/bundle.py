"""Air-gapped bundles: verified trees, their digests and refs, in one uncompressed tar (see docs/bundles.md).

`write_bundle` streams cached models into a tar, re-hashing every file as it is written (a cache entry that no
longer matches its manifest is refused, not exported) and never following a link out of a tree. `import_bundle`
streams a bundle back: each entry is unpacked under hubd's safe-extraction rules into private staging, its tree
digest recomputed and compared with the one declared, the SavedModel structure checked, and only then published
(crash-safe, through the engine, like a fetch). Entries are independent: a damaged one is refused, naming its
handle and digest, and the entries before and after it are imported as usual.

Neither side ever holds a whole bundle (or a whole file) in memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import io
import json
import os
import stat
import tarfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Literal, Protocol, TypeVar, cast

from hubd_client.handles import Source
from hubd_client.kinds import KINDS
from hubd_client.layout import ref_key
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hubd import __version__
from hubd.errors import (
    BadBundle,
    BadRequest,
    DiskFull,
    HubdError,
    QuotaExceeded,
    RefConflict,
    Stalled,
    UnsafeArchive,
    VerificationFailed,
)
from hubd.eviction import Cache, collect, gc_lock, unevictable_bytes
from hubd.extract import SafeExtractor
from hubd.layout import LAYOUT_VERSION
from hubd.progress import human_bytes
from hubd.store import ObjectMeta, Ref, flocked
from hubd.tree import TreeListing
from hubd.verify import quick_problems, structural_problems

FORMAT = "hubd-bundle"
FORMAT_VERSION = 1
HEADER = "hubd-bundle.json"
HEADER_SUM = "hubd-bundle.json.sha256"
MAX_HEADER_BYTES = 64 << 20
"""A 100,000-file model's manifest is about 15 MB of JSON; a larger header is not a bundle."""
_CHUNK = 1 << 20
_DIGEST = r"^[0-9a-f]{64}$"
T = TypeVar("T")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleRef(_Strict):
    canonical: str = Field(min_length=1, max_length=2048)
    handle: str = Field(min_length=1, max_length=2048)


class BundleEntry(_Strict):
    digest: str = Field(pattern=_DIGEST)
    archive_sha256: str = Field(pattern=_DIGEST)
    size_bytes: int = Field(ge=0)
    refs: list[BundleRef] = Field(min_length=1, max_length=64)
    manifest: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.refs[0].handle} (model {self.digest[:12]})"


class BundleHeader(_Strict):
    format: Literal["hubd-bundle"] = "hubd-bundle"
    format_version: int
    hubd_version: str
    layout_version: int
    created_at: float
    entries: list[BundleEntry] = Field(max_length=100_000)


class ImportResult(BaseModel):
    """One entry's outcome, as the CLI prints it and POST /v1/import streams it (NDJSON, event "entry")."""

    event: Literal["entry"] = "entry"
    position: int
    of: int
    digest: str
    handles: list[str]
    size_bytes: int
    ok: bool
    code: str = ""
    message: str = ""


# -- export ---------------------------------------------------------------------------------------------


class Publisher(Cache, Protocol):
    """What bundles need of the engine (hubd.engine.Engine is one; it is not imported: the engine builds the
    object store, which writes bundles, so an import would close a circle)."""

    def parse(self, handle: str) -> Source: ...
    def publish_refs(self, tree: Path, meta: ObjectMeta, refs: list[tuple[str, Ref]]) -> None:
        """Publish the tree and point `refs` at it (the gc lock held shared, the refs checked by the caller)."""


def plan_export(engine: Publisher, digests: list[str]) -> BundleHeader:
    """The header for these cached objects (duplicates once): their manifests and every ref that names them."""
    entries: list[BundleEntry] = []
    for digest in dict.fromkeys(digests):
        meta = engine.store.read_meta(digest)
        if meta is None:
            raise VerificationFailed(f"model {digest[:12]} is not cached", "see `hubd ls`")
        refs = []
        for canonical in meta.names:
            ref = engine.store.read_ref(ref_key(canonical))
            if ref is not None and ref.digest == digest:
                refs.append(BundleRef(canonical=ref.canonical, handle=ref.handle))
        if not refs:
            raise VerificationFailed(
                f"model {digest[:12]} has no handle naming it, so an import could not find it", "pull it by handle"
            )
        entries.append(
            BundleEntry(
                digest=digest,
                archive_sha256=meta.archive_sha256,
                size_bytes=meta.size_bytes,
                refs=refs,
                manifest=meta.listing.to_json(),
            )
        )
    return BundleHeader(
        format_version=FORMAT_VERSION,
        hubd_version=__version__,
        layout_version=LAYOUT_VERSION,
        created_at=time.time(),
        entries=entries,
    )


def write_bundle(
    engine: Publisher, header: BundleHeader, out: IO[bytes], on_entry: Callable[[BundleEntry], None] | None = None
) -> None:
    """Write the bundle to `out` (any writable stream: a file, an HTTP response). Every file is re-hashed as it
    is written; one that no longer matches its manifest stops the export (`VerificationFailed`)."""
    raw = header.model_dump_json().encode()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        _add_bytes(archive, HEADER, raw, header.created_at)
        _add_bytes(
            archive, HEADER_SUM, f"{hashlib.sha256(raw).hexdigest()}  {HEADER}\n".encode(), header.created_at
        )
        for entry in header.entries:
            _write_entry(engine, archive, entry, header.created_at)
            if on_entry is not None:
                on_entry(entry)


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(mtime)
    archive.addfile(info, io.BytesIO(data))


def _write_entry(engine: Publisher, archive: tarfile.TarFile, entry: BundleEntry, mtime: float) -> None:
    listing = TreeListing.from_json(entry.manifest)
    prefix = f"objects/{entry.digest}/"
    root = os.open(engine.store.object_path(entry.digest), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in sorted(listing.all_dirs() - {""}):
            info = tarfile.TarInfo(prefix + name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(mtime)
            archive.addfile(info)
        for name, record in sorted(listing.files.items()):
            with _open_in_tree(root, name) as (parent, base):
                fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                with os.fdopen(fd, "rb", buffering=0) as handle:
                    if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_size != record.size:
                        raise _broken(entry, f"{name}: no longer the file that was published")
                    info = tarfile.TarInfo(prefix + name)
                    info.size, info.mode, info.mtime = record.size, 0o644, int(mtime)
                    reader = _HashingReader(handle)
                    archive.addfile(info, reader)
                    if reader.hexdigest() != record.sha256 or handle.read(1):
                        raise _broken(entry, f"{name}: content changed (sha256 mismatch)")
        for name, target in sorted(listing.symlinks.items()):
            with _open_in_tree(root, name) as (parent, base):
                if os.readlink(base, dir_fd=parent) != target:
                    raise _broken(entry, f"{name}: link changed")
            info = tarfile.TarInfo(prefix + name)
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, int(mtime)
            archive.addfile(info)
    except FileNotFoundError as exc:
        raise _broken(entry, f"{exc.filename or 'a file'}: deleted") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link where a directory or file was published
            raise _broken(
                entry, f"a link stands where the tree had a file or directory ({exc.strerror})"
            ) from None
        if exc.errno is None:  # tarfile: the file shrank while it was read
            raise _broken(entry, str(exc)) from None
        raise
    finally:
        os.close(root)


@contextmanager
def _open_in_tree(root: int, name: str) -> Iterator[tuple[int, str]]:
    """(a descriptor of `name`'s directory, its base name), reached one real directory at a time: no link on
    the way is followed, so nothing outside the tree can be read in its place."""
    parts = name.split("/")
    fds: list[int] = []
    try:
        parent = root
        for part in parts[:-1]:
            parent = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            fds.append(parent)
        yield parent, parts[-1]
    finally:
        for fd in fds:
            os.close(fd)


class _HashingReader(io.RawIOBase):
    """Hands a file's bytes to tarfile and hashes them on the way: the bytes exported are the bytes checked."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._digest.update(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _broken(entry: BundleEntry, why: str) -> VerificationFailed:
    return VerificationFailed(
        f"{entry.label} no longer matches what was published ({why}); it was not exported",
        "run `hubd verify` (it quarantines the copy and fetches it again), then export again",
    )


# -- import ---------------------------------------------------------------------------------------------


def import_bundle(
    engine: Publisher, stream: IO[bytes], uid: int | None, on_entry: Callable[[ImportResult], None]
) -> list[ImportResult]:
    """Import every entry of the bundle read from `stream`, each published on its own once it passed every
    check; `on_entry` hears of each as it ends. Raises `BadBundle` when the bundle itself cannot be read (then
    nothing of it was imported)."""
    results: list[ImportResult] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            header = _read_header(archive)
            member = _next(archive)
            total = len(header.entries)
            damaged = ""
            for position, entry in enumerate(header.entries, 1):
                if damaged or member is None:
                    why = damaged or "the bundle ends before this entry (it is truncated or damaged)"
                    error: HubdError = VerificationFailed(f"{entry.label}: {why}", "export the bundle again")
                    result = _result(position, total, entry, error)
                else:
                    result, member, damaged = _import_entry(engine, archive, member, entry, uid, position, total)
                results.append(result)
                on_entry(result)
    except tarfile.TarError as exc:
        if not results:
            raise BadBundle(
                f"not a hubd bundle (an uncompressed tar): {exc}", "give the file `hubd export` wrote"
            ) from None
        raise BadBundle(f"the bundle is damaged after entry {len(results)}: {exc}", "export it again") from None
    if engine.settings.max_size is not None and any(r.ok for r in results):
        collect(engine, engine.settings.max_size, False, frozenset(r.digest for r in results if r.ok))
    return results


def _read_header(archive: tarfile.TarFile) -> BundleHeader:
    first, second = _next(archive), None
    if first is None or first.name != HEADER or not first.isreg() or first.size > MAX_HEADER_BYTES:
        raise BadBundle(f"not a hubd bundle: it does not begin with {HEADER}", "give the file `hubd export` wrote")
    raw = _read_member(archive, first)
    second = _next(archive)
    if second is None or second.name != HEADER_SUM or not second.isreg() or second.size > 1024:
        raise BadBundle(f"the bundle is damaged: {HEADER_SUM} does not follow {HEADER}", "export it again")
    declared = _read_member(archive, second).split(b" ", 1)[0].decode("ascii", "replace")
    if declared != hashlib.sha256(raw).hexdigest():
        raise BadBundle(f"the bundle is damaged: {HEADER} does not match its checksum", "export it again")
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise BadBundle(
                f"the bundle has format version {data['format_version']}; this hubd reads up to {FORMAT_VERSION}",
                "upgrade hubd on this machine, or export with the hubd version installed here",
            )
        header = BundleHeader.model_validate(data)
    except (ValueError, TypeError, RecursionError) as exc:
        detail = "; ".join(str(e["msg"]) for e in exc.errors()[:3]) if isinstance(exc, ValidationError) else exc
        raise BadBundle(f"the bundle's {HEADER} is not valid: {detail}", "export it again") from None
    if len({e.digest for e in header.entries}) != len(header.entries):
        raise BadBundle("the bundle names one model twice", "export it again")
    return header


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = archive.extractfile(member)
    assert source is not None
    return source.read()


def _next(archive: tarfile.TarFile) -> tarfile.TarInfo | None:
    member = archive.next()
    cast(Any, archive).members.clear()  # a stream is read once: no header is needed again
    return member


def _import_entry(
    engine: Publisher,
    archive: tarfile.TarFile,
    member: tarfile.TarInfo | None,
    entry: BundleEntry,
    uid: int | None,
    position: int,
    total: int,
) -> tuple[ImportResult, tarfile.TarInfo | None, str]:
    """Unpack, check and publish one entry; returns its result, the next entry's first member, and why the rest
    of the bundle cannot be read ("" when it can)."""
    prefix = f"objects/{entry.digest}/"
    staging = engine.store.new_staging()
    error: HubdError | None = None
    damaged = ""
    try:
        extractor = _EntryExtractor(staging.tree, engine.settings)
        if member is None or not member.name.startswith(prefix):
            name = member.name[:200] if member is not None else "nothing"
            error = VerificationFailed(
                f"{entry.label}: the bundle holds {name!r} where this entry should begin", ""
            )
            damaged = f"the bundle is damaged before this entry (at {name!r})"
        while member is not None and member.name.startswith(prefix):
            if error is None:
                try:
                    extractor.add(archive, member, prefix)
                except (HubdError, OSError, tarfile.TarError) as exc:
                    error = _entry_error(entry, exc)
            try:
                member = _next(archive)
            except tarfile.TarError as exc:
                member, damaged = None, f"the bundle is damaged after entry {position}: {exc}"
        if error is None:
            error = _publish_checked(engine, extractor, staging.tree, entry)
    finally:
        staging.cleanup()
    handle = entry.refs[0].handle
    if error is None:
        engine.audit.record("import", uid, entry.digest, handle, "ok", f"{entry.size_bytes} bytes from a bundle")
    else:
        engine.audit.record("import", uid, entry.digest, handle, f"refused: {error.message}"[:500])
    return _result(position, total, entry, error), member, damaged


def _entry_error(entry: BundleEntry, exc: BaseException) -> HubdError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{entry.label}: the disk holding the cache is full", "free space, then import again")
    if isinstance(exc, HubdError):
        exc.message = f"{entry.label}: {exc.message}"
        return exc
    return UnsafeArchive(f"{entry.label} cannot be unpacked safely: {exc}", "the entry was refused")


class _EntryExtractor(SafeExtractor):
    """hubd's safe extractor, fed one bundle member at a time (names relative to the entry's tree)."""

    def __init__(self, dest: Path, settings: Any) -> None:
        dest.mkdir(mode=0o700)
        super().__init__(dest, settings.max_extract_bytes, settings.max_members, settings.fsync)

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo, prefix: str) -> None:
        member.name = member.name[len(prefix) :]
        if member.islnk() and member.linkname.startswith(prefix):
            member.linkname = member.linkname[len(prefix) :]
        self._extract_member(archive, member)

    def finish(self) -> TreeListing:
        self._create_links()
        return self.listing


def _publish_checked(
    engine: Publisher, extractor: _EntryExtractor, tree: Path, entry: BundleEntry
) -> HubdError | None:
    """The entry's last checks (digest, structure, handles, refs, quota), then its publish; the error, if any."""
    try:
        listing = extractor.finish()
        declared = TreeListing.from_json(entry.manifest).digest()
        got = listing.digest()
        if got != entry.digest or declared != entry.digest:
            return VerificationFailed(
                f"{entry.label} does not match its digest (its files hash to {got[:12]}): the bundle is damaged; "
                "the entry was refused",
                "export the bundle again (or copy it again); entries that passed were imported",
            )
        problems = structural_problems(tree)
        if problems:
            return VerificationFailed(f"{entry.label} is not a usable SavedModel: {'; '.join(problems)}", "")
        meta = ObjectMeta(entry.digest, entry.archive_sha256, listing.total_bytes, time.time(), listing, [])
        _publish(engine, tree, meta, entry)
    except HubdError as exc:
        return exc if entry.label in exc.message else _entry_error(entry, exc)
    except (OSError, tarfile.TarError, ValueError) as exc:
        return _entry_error(entry, exc)
    return None


def _publish(engine: Publisher, tree: Path, meta: ObjectMeta, entry: BundleEntry) -> None:
    """Under each handle's flock (as a fetch of it takes) and the shared gc lock: refuse any ref that would
    change which healthy model a handle names, then publish as a fetch does (`publish_refs`)."""
    refs: list[tuple[str, Ref]] = []
    for given in entry.refs:
        source = engine.parse(given.handle)
        if not KINDS[source.kind].fetched or source.canonical != given.canonical:
            raise BadRequest(f"the bundle's handle {given.handle!r} is not {given.canonical!r}", "")
        refs.append((source.ref_key, Ref(source.canonical, given.handle, meta.digest, meta.archive_sha256, 0)))
    quota = engine.settings.max_size
    if quota is not None and unevictable_bytes(engine) + meta.size_bytes > quota:
        raise QuotaExceeded(
            f"{entry.label} unpacks to {human_bytes(meta.size_bytes)}, more than the quota of "
            f"{human_bytes(quota)} can hold besides pinned and recently used models",
            "an admin can raise the quota (--max-size / HUBD_MAX_SIZE) or unpin models",
        )
    with ExitStack() as locks:
        for key in sorted({key for key, _ref in refs}):
            locks.enter_context(flocked(engine.store.lock_path(key)))
        locks.enter_context(gc_lock(engine.store, shared=True))
        for key, ref in refs:
            existing = engine.store.read_ref(key)
            if existing is not None and existing.digest != meta.digest and _healthy(engine, existing.digest):
                raise RefConflict(
                    f"{ref.canonical} is cached as model {existing.digest[:12]}, but the bundle has it as "
                    f"{meta.digest[:12]}; the cached one was kept and {entry.label} refused",
                    "a cached handle never changes silently: if the bundle is right, an admin removes the old "
                    f"entry (`hubd rm {existing.digest[:12]}`) and imports again",
                )
            ref.updated_at = time.time()
        engine.publish_refs(tree, meta, refs)


def _healthy(engine: Publisher, digest: str) -> bool:
    meta = engine.store.read_meta(digest)
    tree = engine.store.object_path(digest)
    return meta is not None and tree.is_dir() and not quick_problems(tree, meta.listing)


def _result(position: int, total: int, entry: BundleEntry, error: HubdError | None) -> ImportResult:
    return ImportResult(
        position=position,
        of=total,
        digest=entry.digest,
        handles=[r.handle for r in entry.refs],
        size_bytes=entry.size_bytes,
        ok=error is None,
        code=error.code if error is not None else "",
        message=error.message if error is not None else "",
    )


def describe(result: ImportResult) -> str:
    """One progress line for an entry: `hubd import` prints it on stderr."""
    name = ", ".join(result.handles)
    if result.ok:
        size = human_bytes(result.size_bytes)
        return f"hubd: [{result.position}/{result.of}] imported {result.digest[:12]} ({size}) {name}"
    return f"hubd: [{result.position}/{result.of}] REFUSED {result.digest[:12]} {name}"


def read_header(path: Path) -> BundleHeader:
    """The header of a bundle file (its first member), for listing what was written."""
    with open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
        return _read_header(archive)


def remove_partial(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


# -- between an event loop and the blocking tar code -------------------------------------------------------


class LoopReader(io.RawIOBase):
    """Bytes that arrive on an event loop (a request body), read by blocking code in a worker thread."""

    def __init__(self, read_chunk: Callable[[], Awaitable[bytes]], loop: asyncio.AbstractEventLoop) -> None:
        self._read_chunk = read_chunk
        self._loop = loop
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            chunk = _on_loop(self._read_chunk(), self._loop, "no byte of the bundle arrived")
            if not chunk:
                return 0
            self._pending = memoryview(chunk)
        view = memoryview(buffer).cast("B")
        size = min(len(view), len(self._pending))
        view[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


class LoopWriter(io.RawIOBase):
    """Blocking writes from a worker thread, sent by an event loop (a streamed response); each waits for its
    send, so a slow reader slows the writer down instead of filling memory."""

    def __init__(
        self,
        write: Callable[[bytes], Awaitable[None]],
        loop: asyncio.AbstractEventLoop,
        stall: float | None = None,
    ) -> None:
        self._write = write
        self._loop = loop
        self._stall = EXPORT_STALL_SECONDS if stall is None else stall

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        _on_loop(self._write(chunk), self._loop, "the client read nothing of the bundle", self._stall)
        return len(chunk)


STALL_SECONDS = 300.0
"""How long a bundle's transfer may stand still before it is given up (and its worker thread freed)."""
EXPORT_STALL_SECONDS = 60.0
"""The same for an export, whose client only has to read: an unread export frees its export thread sooner."""


def _on_loop(
    awaitable: Awaitable[T], loop: asyncio.AbstractEventLoop, what: str, stall: float = STALL_SECONDS
) -> T:
    future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), loop)
    try:
        return future.result(timeout=stall)
    except (TimeoutError, concurrent.futures.CancelledError):
        # Not the caller's cancellation: a stalled send given up (its CancelledError must not reach the loop,
        # where it would read as the request handler being cancelled).
        future.cancel()
        raise Stalled(f"{what} for {stall:g} s; the transfer was given up", "try again") from None


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable
