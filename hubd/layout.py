"""The cache's layout version: written in `<root>/layout-version`, checked at start, older layouts migrated.

Version 1 (hubd before the file existed) named objects by an ambiguous digest of ``f <path> <size> <sha256>``
lines; version 2 names them by `TreeListing.digest` (a tagged, JSON-encoded record per member). A cache with
no version file but with entries is version 1. A newer version than this hubd knows is refused: it would
misread the cache. An older one is migrated, under an flock, before anything else touches the cache.

The migration is crash-safe because every step is idempotent and the version file is written last: for each
object, its meta is first written under the new digest, then the tree renamed, then refs and pins re-pointed,
then the old meta removed. Re-running after a crash at any point finishes the job. Objects whose member names or
links break version 2's rules are quarantined (never handed out; re-fetched, and so re-checked, on next use).
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hubd_client.layout import LAYOUT_VERSION, VERSION_FILE

from hubd.errors import LayoutTooNew

if TYPE_CHECKING:
    from hubd.store import Store

__all__ = [
    "LAYOUT_VERSION",
    "VERSION_FILE",
    "Migration",
    "open_cache",
    "open_layout",
    "read_version",
]
log = logging.getLogger("hubd.layout")


def open_cache(store: Store) -> Store:
    """Make `store` ready to use, the one way every user of a cache opens it: its directories (after checking who
    could change them), its layout version (an older one migrated, a newer one refused), then the publishes a crash
    interrupted. It lives here, not in the store, because migrating rebuilds the index and the tensorflow_hub
    view, which are built on the store."""
    store.prepare_directories()
    open_layout(store)
    store.recover_pending()
    return store


@dataclass
class Migration:
    """What a migration did: old digest -> new digest, and the objects quarantined for breaking the rules."""

    renamed: dict[str, str] = field(default_factory=dict)
    quarantined: list[str] = field(default_factory=list)


def read_version(store: Store) -> int:
    """The cache's layout version: the file's, else 1 for a cache with entries, else the current one (empty)."""
    try:
        version = store.layout.stored_version()
    except ValueError as exc:
        raise LayoutTooNew(
            f"{store.layout.version_file} holds {str(exc)[:40]!r}, not a layout version",
            f"restore the file (this hubd writes {LAYOUT_VERSION}) or point HUBD_CACHE_DIR at another directory",
        ) from None
    if version is None:
        has_entries = any(store.meta_dir.glob("*.json")) or any(store.refs.glob("*.json"))
        return 1 if has_entries else LAYOUT_VERSION
    return version


def open_layout(store: Store) -> Migration | None:
    """Check the cache's layout version; migrate an older one. Call with the layout directories created."""
    if store.layout.version_file.exists() and read_version(store) == LAYOUT_VERSION:
        return None  # the common case: nothing to write, so no lock (readers need no write access)
    lock_fd = os.open(store.layout.lock("layout"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        version = read_version(store)
        if version > LAYOUT_VERSION:
            raise LayoutTooNew(
                f"the cache at {store.root} has layout version {version}; this hubd understands up to "
                f"{LAYOUT_VERSION}",
                "upgrade hubd (a newer one wrote this cache), or point HUBD_CACHE_DIR at another directory",
            )
        migration = None
        if version < LAYOUT_VERSION:
            migration = migrate_v1(store)
            log.warning(
                "migrated the cache at %s to layout version %d: %d objects re-digested, %d quarantined",
                store.root,
                LAYOUT_VERSION,
                len(migration.renamed),
                len(migration.quarantined),
            )
        if version < LAYOUT_VERSION or not store.layout.version_file.exists():
            store.write_file(store.layout.version_file, f"{LAYOUT_VERSION}\n".encode())
        return migration
    finally:
        os.close(lock_fd)


def migrate_v1(store: Store) -> Migration:
    """Re-digest every object under version 2 and re-point everything that names it."""
    from hubd.store import remove_tree

    migration = Migration()
    for path in sorted(store.meta_dir.glob("*.json")):
        meta = store.read_meta(path.stem)
        if meta is None:
            continue
        old, new = path.stem, meta.listing.digest()
        if old == new:
            continue  # already migrated (a crash came after this object's meta was rewritten)
        meta.digest = new
        existing = store.read_meta(new)
        if existing is not None:
            meta.names = [*existing.names, *(n for n in meta.names if n not in existing.names)]
        store.write_meta(meta)
        old_tree, new_tree = store.layout.object(old), store.layout.object(new)
        if old_tree.is_dir():
            if new_tree.is_dir():
                remove_tree(old_tree)
            else:
                os.rename(old_tree, new_tree)
        for ref_path in sorted(store.refs.glob("*.json")):
            ref = store.read_ref(ref_path.stem)
            if ref is not None and ref.digest == old:
                ref.digest = new
                store.write_ref(ref_path.stem, ref)
        for name in store.pin_names(old):
            store.pin(new, name)
        store.unpin(old)
        path.unlink(missing_ok=True)
        migration.renamed[old] = new
    for meta in store.iter_meta():
        problems = meta.listing.name_problems() + meta.listing.link_problems()
        if problems and store.quarantine(meta.digest, "layout v2: " + "; ".join(problems)) is not None:
            migration.quarantined.append(meta.digest)
    _migrate_derived(store, migration)
    return migration


def _migrate_derived(store: Store, migration: Migration) -> None:
    """The index (keeping last-use times) and the tensorflow_hub view follow the renamed objects."""
    from hubd.index import Index
    from hubd.tfhub_view import TfhubView

    if store.layout.index.exists():
        index = Index(store)
        try:
            index.migrate(migration.renamed)
        finally:
            index.close()
    if store.layout.view.is_dir():
        TfhubView(store).rebuild()
