"""The shared object-store tier: verified trees in an S3-compatible bucket, shared by many hubd hosts.

Set with `HUBD_OBJECT_STORE=s3://BUCKET/PREFIX` and the standard AWS_* variables (AWS_ENDPOINT_URL, keys,
region). The bucket holds, under PREFIX:

    objects/<tree digest>.hubd-bundle.tar   one-entry bundle (docs/bundles.md) of the verified tree
    refs/<ref key>.json                     {"canonical", "handle", "digest", "archive_sha256", ...}

Before going upstream (inside the handle's lock) a hubd reads the handle's ref, then the object the ref names,
and imports it through the checks `hubd import` applies: safe extraction into private staging, the tree digest
recomputed and compared with the digest the ref names and the bundle declares, the SavedModel structure. Only
then is it published, exactly as a fetch of that handle publishes. Anything else (a missing, unreadable or
tampered object, a ref for another handle, a pin the ref does not record) is logged and the fetch goes
upstream as if the bucket were not there: a writable bucket cannot make a host publish bytes that do not hash
to the digest the ref names.

After a fetch from upstream is published, the object and the ref are uploaded in the background, each with a
conditional put (`If-None-Match: *`), so N hosts racing upload each once and never overwrite what is there.
`close()` (the daemon's drain) waits for uploads in flight, then cancels what is left.

Client: obstore (Rust object_store): see bench/bench_objectstore.py for the measurement behind the choice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tarfile
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from hubd_client.handles import Source

from hubd.bundle import (
    MAX_HEADER_BYTES,
    Publisher,
    _EntryExtractor,
    _next,
    _read_header,
    plan_export,
    write_bundle,
)
from hubd.entry import Entry
from hubd.errors import (
    BadRequest,
    HubdError,
    QuotaExceeded,
    Tampered,
    VerificationFailed,
)
from hubd.eviction import collect, unevictable_bytes
from hubd.progress import human_bytes
from hubd.stats import ResolveStats
from hubd.store import ObjectMeta
from hubd.tree import TreeListing
from hubd.verify import structural_problems

log = logging.getLogger("hubd.objectstore")


class Flight(Protocol):
    """The fetch an import from the bucket stands in for (the engine's single-flight record)."""

    @property
    def uid(self) -> int | None: ...
    def emit(self, phase: str, done: int, total: int | None) -> None: ...


class Importer(Publisher, Protocol):
    """What the object store needs of the engine (hubd.engine.Engine is one; the engine builds the object store,
    so it is not imported here: no import circle)."""

    @property
    def stats(self) -> ResolveStats: ...
    def publish(self, tree: Path, meta: ObjectMeta, handle: str) -> None:
        """Publish a verified tree under `handle` as a fetch does, refusing a ref that would change silently."""


REF_FORMAT = "hubd-objectstore-ref"
MAX_REF_BYTES = 64 << 10
DRAIN_SECONDS = 120.0
"""How long `close` waits for uploads in flight before cancelling them."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BucketRef:
    canonical: str
    handle: str
    digest: str
    archive_sha256: str
    size_bytes: int

    def to_json(self) -> bytes:
        return json.dumps({"format": REF_FORMAT, "format_version": 1, **self.__dict__}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BucketRef:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != REF_FORMAT:
            raise ValueError("not a hubd object-store ref")
        ref = cls(
            str(data["canonical"]),
            str(data["handle"]),
            str(data["digest"]),
            str(data["archive_sha256"]),
            int(data["size_bytes"]),
        )
        for value in (ref.digest, ref.archive_sha256):
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError("a digest in the ref is not a sha256")
        return ref


def object_key(digest: str) -> str:
    return f"objects/{digest}.hubd-bundle.tar"


def ref_key(source: Source) -> str:
    return f"refs/{source.ref_key}.json"


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://BUCKET/PREFIX`."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise BadRequest(f"the object store must be s3://BUCKET/PREFIX, not {url!r}", "check HUBD_OBJECT_STORE")
    return parts.netloc, parts.path.strip("/")


def open_object_store(url: str | None) -> ObjectStore | None:
    return ObjectStore(url) if url else None


class ObjectStore:
    """One bucket (and prefix) shared by hubd hosts. Every method logs and swallows the bucket's failures:
    the tier only ever saves an upstream download, it never fails a resolve."""

    def __init__(self, url: str) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:
            raise BadRequest(
                "HUBD_OBJECT_STORE is set, but the S3 client hubd uses (obstore) is not installed",
                "install hubd with its s3 extra (pip install 'hubd[s3]'), or unset HUBD_OBJECT_STORE",
            ) from None
        self.url = url
        self.bucket, prefix = parse_url(url)
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or ""
        self._store = S3Store(  # keys, region and endpoint from the AWS_* variables
            self.bucket,
            prefix=prefix or None,
            client_options={"allow_http": endpoint.startswith("http://"), "connect_timeout": timedelta(seconds=5)},
            retry_config={  # a bucket that is down costs a fetch seconds, not object_store's default 3 minutes
                "max_retries": 2,
                "retry_timeout": timedelta(seconds=10),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=2),
                    "base": 2,
                },
            },
        )
        self._uploads: set[asyncio.Task[None]] = set()
        self._uploading: set[str] = set()
        self.uploaded = 0
        """Objects this process put into the bucket (a put another host won does not count)."""

    # -- bucket primitives ----------------------------------------------------------------------------

    async def get_bytes(self, key: str, limit: int) -> bytes | None:
        import obstore

        try:
            result = await obstore.get_async(self._store, key)
        except FileNotFoundError:
            return None
        data = bytearray()
        async for chunk in result.stream(min_chunk_size=64 << 10):
            data += chunk
            if len(data) > limit:
                raise Tampered(f"the bucket's {key} is larger than {limit} bytes", "")
        return bytes(data)

    async def put_once(self, key: str, source: bytes | Path) -> bool:
        """Create `key` unless it exists (`If-None-Match: *`): True if this put created it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            if isinstance(source, Path):
                with open(source, "rb") as handle:
                    await obstore.put_async(self._store, key, handle, mode="create", use_multipart=False)
            else:
                await obstore.put_async(self._store, key, source, mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    async def exists(self, key: str) -> bool:
        import obstore

        try:
            await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return False
        return True

    # -- before going upstream ------------------------------------------------------------------------

    async def fetch(self, engine: Importer, source: Source, sha256: str | None, flight: Flight) -> Entry | None:
        """The handle's model from the bucket, verified and published like a fetch; None: go upstream."""
        started = time.monotonic()
        try:
            raw = await self.get_bytes(ref_key(source), MAX_REF_BYTES)
            if raw is None:
                log.info("object store: no ref for %s in %s; fetching upstream", source.handle, self.url)
                return None
            ref = BucketRef.from_json(raw)
            if ref.canonical != source.canonical:
                raise Tampered(f"the bucket's ref for {source.canonical} names {ref.canonical!r}", "")
            if sha256 and ref.archive_sha256 != sha256:
                log.info(
                    "object store: the bucket has %s as archive sha256 %s, not the pinned %s; fetching upstream",
                    source.handle,
                    ref.archive_sha256,
                    sha256,
                )
                return None
            entry = await self._import(engine, source, ref, flight)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # anything the bucket does ends here: the upstream is the way out
            refused = isinstance(exc, Tampered | VerificationFailed | HubdError | tarfile.TarError | ValueError)
            log.warning(
                "object store: %s %s from %s: %s: %s; fetching upstream instead",
                "REFUSED" if refused else "could not read",
                source.handle,
                self.url,
                type(exc).__name__,
                getattr(exc, "message", exc),
            )
            return None
        log.info(
            "fetch handle=%s cache=miss bytes=%d seconds=%.2f from=objectstore",
            source.handle,
            entry.size_bytes,
            time.monotonic() - started,
        )
        return entry

    async def _import(self, engine: Importer, source: Source, ref: BucketRef, flight: Flight) -> Entry:
        settings = engine.settings
        staging = engine.store.new_staging()
        try:
            path = staging.path / "object.hubd-bundle.tar"
            await self._download(object_key(ref.digest), path, settings, flight)
            flight.emit("verify", 0, None)
            meta = await asyncio.to_thread(_verified_tree, engine, path, staging.tree, source, ref)
            quota = settings.max_size
            if quota is not None and await asyncio.to_thread(unevictable_bytes, engine) + meta.size_bytes > quota:
                raise QuotaExceeded(
                    f"{source.handle} unpacks to {human_bytes(meta.size_bytes)}, more than the quota can hold", ""
                )
            flight.emit("publish", 0, None)
            await asyncio.to_thread(engine.publish, staging.tree, meta, source.handle)
            size = path.stat().st_size
            engine.stats.fetched("objectstore", size)
        finally:
            await asyncio.to_thread(staging.cleanup)
        await asyncio.to_thread(
            engine.audit.record, "import", flight.uid, meta.digest, source.handle, "ok", f"from {self.url}"
        )
        if quota is not None:
            await asyncio.to_thread(collect, engine, quota, False, frozenset({meta.digest}))
        return engine.entry_for(meta)

    async def _download(self, key: str, path: Path, settings: Any, flight: Flight) -> None:
        import obstore

        limit = settings.max_extract_bytes + MAX_HEADER_BYTES + 2048 * (settings.max_members + 2)
        result = await obstore.get_async(self._store, key)
        total = result.meta["size"]
        if total > limit:
            raise Tampered(f"the bucket's {key} is {human_bytes(total)}, more than hubd would unpack", "")
        done = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            async for chunk in result.stream(min_chunk_size=_CHUNK):
                done += len(chunk)
                if done > limit:
                    raise Tampered(f"the bucket's {key} is larger than it said", "")
                await asyncio.to_thread(out.write, chunk)
                flight.emit("download", done, total)

    # -- after a fetch --------------------------------------------------------------------------------

    def upload_later(self, engine: Importer, meta: ObjectMeta, source: Source) -> None:
        """Upload the published model and the handle's ref in the background (once per digest at a time)."""
        if meta.digest in self._uploading:
            return
        self._uploading.add(meta.digest)
        task = asyncio.create_task(self.upload(engine, meta, source))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)
        task.add_done_callback(lambda _t: self._uploading.discard(meta.digest))

    async def upload(self, engine: Importer, meta: ObjectMeta, source: Source) -> None:
        key = object_key(meta.digest)
        try:
            if not await self.exists(key):
                staging = engine.store.new_staging()
                try:
                    path = staging.path / "object.hubd-bundle.tar"
                    size = await asyncio.to_thread(_write_bundle, engine, meta.digest, path)
                    created = await self.put_once(key, path)
                finally:
                    await asyncio.to_thread(staging.cleanup)
                if created:
                    self.uploaded += 1
                    log.info("object store: uploaded model %s (%d bytes) to %s", meta.digest[:12], size, self.url)
                else:
                    log.info("object store: model %s was uploaded meanwhile by another host", meta.digest[:12])
            ref = BucketRef(source.canonical, source.handle, meta.digest, meta.archive_sha256, meta.size_bytes)
            if not await self.put_once(ref_key(source), ref.to_json()):
                log.info("object store: the bucket already has a ref for %s; left as it is", source.canonical)
        except asyncio.CancelledError:
            log.warning("object store: upload of model %s cancelled at shutdown", meta.digest[:12])
            raise
        except Exception as exc:
            log.warning(
                "object store: upload of model %s to %s failed: %s: %s",
                meta.digest[:12],
                self.url,
                type(exc).__name__,
                getattr(exc, "message", exc),
            )

    async def wait_uploads(self) -> None:
        """Return once every upload started so far has ended (tests and the drain use it)."""
        while self._uploads:
            await asyncio.wait(set(self._uploads))

    async def close(self, timeout: float = DRAIN_SECONDS) -> None:
        """Finish uploads in flight (up to `timeout` seconds), then cancel what is left and wait for it."""
        pending = set(self._uploads)
        if pending:
            log.info("object store: finishing %d upload(s) before stopping", len(pending))
            _done, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            for task in late:
                with suppress(asyncio.CancelledError):
                    await task


def _write_bundle(engine: Importer, digest: str, path: Path) -> int:
    """A one-entry bundle of a published model, re-hashed as it is written (see hubd/bundle.py)."""
    header = plan_export(engine, [digest])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        write_bundle(engine, header, out)
    return path.stat().st_size


def _verified_tree(engine: Importer, path: Path, tree: Path, source: Source, ref: BucketRef) -> ObjectMeta:
    """Unpack the bucket's bundle as `hubd import` does and check it against the ref; the meta to publish."""
    with open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
        header = _read_header(archive)
        if len(header.entries) != 1:
            raise Tampered(f"the bucket's object for {source.handle} holds {len(header.entries)} entries", "")
        entry = header.entries[0]
        if entry.digest != ref.digest or entry.archive_sha256 != ref.archive_sha256:
            raise Tampered(
                f"the bucket's object declares model {entry.digest[:12]} (archive sha256 {entry.archive_sha256}), "
                f"but the ref for {source.handle} names {ref.digest[:12]} (archive sha256 {ref.archive_sha256})",
                "",
            )
        prefix = f"objects/{ref.digest}/"
        extractor = _EntryExtractor(tree, engine.settings)
        while (member := _next(archive)) is not None:
            if not member.name.startswith(prefix):
                raise Tampered(f"the bucket's object holds {member.name[:200]!r}, outside its tree", "")
            extractor.add(archive, member, prefix)
        listing = extractor.finish()
    got, declared = listing.digest(), TreeListing.from_json(entry.manifest).digest()
    if got != ref.digest or declared != ref.digest:
        raise Tampered(
            f"the bucket's object for {source.handle} does not match its digest: its files hash to {got[:12]}, "
            f"the ref names {ref.digest[:12]}",
            "",
        )
    problems = structural_problems(tree)
    if problems:
        raise Tampered(f"the bucket's {source.handle} is not a usable SavedModel: {'; '.join(problems)}", "")
    return ObjectMeta(
        ref.digest, ref.archive_sha256, listing.total_bytes, time.time(), listing, [source.canonical]
    )
