"""Small model trees written straight to disk, with the manifest and meta hubd would record for them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hubd.store import ObjectMeta, Ref
from hubd.tree import FileRecord, TreeManifest

FETCHED_AT = 1_700_000_000.0
SAVED_MODEL = {"saved_model.pb": b"\x08\x01graph", "variables/variables.index": b"index"}


def write_tree(
    root: Path, files: dict[str, bytes] | None = None, links: dict[str, str] | None = None
) -> TreeManifest:
    """Write `files` (default: a minimal SavedModel) and `links` under `root`; the manifest of what was written."""
    files = SAVED_MODEL if files is None else files
    manifest = TreeManifest()
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        manifest.files[name] = FileRecord(len(data), hashlib.sha256(data).hexdigest())
    for name, target in (links or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        manifest.symlinks[name] = target
    root.mkdir(parents=True, exist_ok=True)
    return manifest


def meta_of(manifest: TreeManifest, *names: str, fetched_at: float = FETCHED_AT) -> ObjectMeta:
    """The meta a publish records for `manifest` (archive sha256 made up: no archive is involved)."""
    return ObjectMeta(
        digest=manifest.digest(),
        archive_sha256=hashlib.sha256(manifest.digest().encode()).hexdigest(),
        size_bytes=manifest.total_bytes,
        fetched_at=fetched_at,
        manifest=manifest,
        names=list(names),
    )


def ref_to(meta: ObjectMeta, canonical: str, handle: str | None = None) -> Ref:
    return Ref(canonical, handle or f"https://{canonical}", meta.digest, meta.archive_sha256, meta.fetched_at)


def ref_key(canonical: str) -> str:
    """The key refs and locks use for a canonical name (what `Source.ref_key` computes)."""
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
