"""Small model trees written straight to disk, with the listing and meta hubd would record for them."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

from hubd.store import ObjectMeta, Ref
from hubd.tree import FileRecord, TreeListing

FETCHED_AT = 1_700_000_000.0
SAVED_MODEL = {"saved_model.pb": b"\x08\x01graph", "variables/variables.index": b"index"}


def write_tree(
    root: Path, files: dict[str, bytes] | None = None, links: dict[str, str] | None = None
) -> TreeListing:
    """Write `files` (default: a minimal SavedModel) and `links` under `root`; the listing of what was written."""
    files = SAVED_MODEL if files is None else files
    listing = TreeListing()
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        listing.files[name] = FileRecord(len(data), hashlib.sha256(data).hexdigest())
    for name, target in (links or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        listing.symlinks[name] = target
    root.mkdir(parents=True, exist_ok=True)
    return listing


def meta_of(listing: TreeListing, *names: str, fetched_at: float = FETCHED_AT) -> ObjectMeta:
    """The meta a publish records for `listing` (archive sha256 made up: no archive is involved)."""
    return ObjectMeta(
        digest=listing.digest(),
        archive_sha256=hashlib.sha256(listing.digest().encode()).hexdigest(),
        size_bytes=listing.total_bytes,
        fetched_at=fetched_at,
        listing=listing,
        names=list(names),
    )


def ref_to(meta: ObjectMeta, canonical: str, handle: str | None = None) -> Ref:
    return Ref(canonical, handle or f"https://{canonical}", meta.digest, meta.archive_sha256, meta.fetched_at)


def ref_key(canonical: str) -> str:
    """The key refs and locks use for a canonical name (what `Source.ref_key` computes)."""
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def gzip_tar(files: dict[str, bytes]) -> bytes:
    """A .tar.gz (PAX) of `files`, name -> bytes, built in memory."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1)
