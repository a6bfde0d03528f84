"""Changing what the cache holds outside a resolve: pin and unpin, remove (`hubd rm`), re-verify and heal
(`hubd verify`), collect garbage (`hubd gc`). Each change is recorded in the audit trail.

Reading the cache is hubd.inventory, evicting to a quota is hubd.eviction (a plan, then its execution). This
module takes the engine as a protocol (`Maintained`) and does not import hubd.engine (no import circle); the
engine's `pin`, `unpin`, `remove`, `verify` and `gc` delegate here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from hubd_client.layout import ref_key

from hubd.entry import Entry
from hubd.errors import HubdError, PinnedModel, UnknownModel
from hubd.eviction import GcReport, collect
from hubd.executors import HASHING, run_in
from hubd.fetch import trim_spools
from hubd.inventory import Cached, find
from hubd.store import ObjectMeta, Ref
from hubd.verify import full_problems


class Maintained(Cached, Protocol):
    """What maintenance needs of the engine besides inspection (hubd.engine.Engine is one)."""

    @property
    def spool_dir(self) -> Path: ...
    def spool_bytes(self) -> int: ...
    def entry_for(
        self, meta: ObjectMeta, last_used: float | None = None, problems: list[str] | None = None
    ) -> Entry: ...
    def first_name(self, digest: str) -> str | None: ...
    def quarantine(self, digest: str, problems: list[str]) -> None: ...
    async def resolve(self, handle: str) -> Entry: ...


@dataclass
class VerifyReport:
    entry: Entry
    problems: list[str]
    healed: bool = False


# -- pins ---------------------------------------------------------------------------------------------------


def pin(cache: Maintained, digest: str, name: str, uid: int | None = None) -> None:
    """Mark an object as wanted by a manifest (`name` says which): eviction never removes it."""
    if name in cache.store.pin_names(digest):
        return
    cache.store.pin(digest, name)
    cache.audit.record("pin", uid, digest, cache.first_name(digest), detail=name)


def unpin(cache: Maintained, digest: str, uid: int | None = None) -> list[str]:
    """Drop every pin of an object; returns what pinned it."""
    names = cache.store.pin_names(digest)
    if names or cache.store.is_pinned(digest):
        cache.store.unpin(digest)
        cache.audit.record("unpin", uid, digest, cache.first_name(digest), detail="; ".join(names))
    return names


# -- removing ------------------------------------------------------------------------------------------------


def remove(cache: Maintained, handle_or_id: str, uid: int | None = None, force: bool = False) -> Entry:
    """`hubd rm`: a pinned model only with `force` (its pins go first, and are recorded as unpinned)."""
    meta = find(cache, handle_or_id)
    handle = None if meta.digest.startswith(handle_or_id) else handle_or_id  # an id: its first name instead
    pins = cache.store.pin_names(meta.digest)
    if pins and not force:
        why = f"pinned by {'; '.join(pins)}"
        cache.audit.record("delete", uid, meta.digest, handle or _first(meta.names), f"refused: {why}")
        raise PinnedModel(
            f"{handle_or_id} (model {meta.digest[:12]}) is {why}",
            "remove it from that manifest first, or delete it anyway with `hubd rm --force` (a manifest the "
            "daemon watches fetches it again)",
        )
    if pins:
        unpin(cache, meta.digest, uid)
    return remove_digest(cache, meta.digest, uid=uid, handle=handle)


def remove_digest(
    cache: Maintained,
    digest: str,
    uid: int | None = None,
    action: Literal["delete", "evict"] = "delete",
    handle: str | None = None,
) -> Entry:
    """Delete an object, every ref to it, its pin, its index records and its tensorflow_hub links."""
    meta = cache.store.read_meta(digest)
    if meta is None:
        raise UnknownModel(f"no cached model has id {digest}", "see `hubd ls` for what is cached")
    handle = handle or _first(meta.names)
    try:
        entry = _remove(cache, meta)
    except Exception as exc:
        cache.audit.record(action, uid, digest, handle, f"failed: {exc}")
        raise
    cache.audit.record(action, uid, digest, handle, detail=f"{meta.size_bytes} bytes")
    return entry


def _remove(cache: Maintained, meta: ObjectMeta) -> Entry:
    digest = meta.digest
    entry = cache.entry_for(meta)
    refs = _refs_to(cache, meta)
    for key, ref in refs:
        cache.store.remove_ref(key)
        cache.index.unbind(ref.canonical)
    if cache.view is not None:
        cache.view.unlink_refs(digest, [ref for _key, ref in refs])
    cache.store.remove_object(digest)
    cache.index.forget(digest)
    cache.catalog.forget(digest)
    cache.forget_meta(digest)
    return entry


def _refs_to(cache: Maintained, meta: ObjectMeta) -> list[tuple[str, Ref]]:
    """The refs pointing at `meta`'s object, as (key, ref). Every publish adds the name of each ref it writes
    to the object's meta, so reading the refs of those names (and of the index's) finds them all in a few
    reads, not one per cached model (100,000 at scale). A meta with no names (there should be none) falls back
    to reading every ref. A name whose ref has moved to another object keeps that ref."""
    if not meta.names:
        return [(key, ref) for key, ref in cache.store.ref_items() if ref.digest == meta.digest]
    found = []
    for name in dict.fromkeys([*meta.names, *cache.index.names_of(meta.digest)]):
        key = ref_key(name)  # refs are keyed by their stored name: a handle that no longer parses still is
        ref = cache.store.read_ref(key)
        if ref is not None and ref.digest == meta.digest:
            found.append((key, ref))
    return found


# -- garbage collection ---------------------------------------------------------------------------------------


async def gc(cache: Maintained, dry_run: bool = False, max_size: int | None = None) -> GcReport:
    """Evict to fit `max_size` (default: the quota); always drops orphaned objects and quarantined trees."""
    quota = max_size if max_size is not None else cache.settings.max_size
    return await asyncio.to_thread(_gc, cache, quota, dry_run)


def _gc(cache: Maintained, quota: int | None, dry_run: bool) -> GcReport:
    """Drop every resume spool no download is using (they count against the quota and the disk; a fetch of
    the handle then starts from zero), then collect down to the quota less what spools remain."""
    dropped = trim_spools(cache.spool_dir, everything=True, dry_run=dry_run)
    freed = sum(spool.size for spool in dropped)
    kept = cache.spool_bytes() - (freed if dry_run else 0)
    report = collect(cache, None if quota is None else max(0, quota - kept), dry_run)
    report.spools_dropped, report.spool_bytes_freed = len(dropped), freed
    return report


# -- verifying and healing ------------------------------------------------------------------------------------


async def verify(cache: Maintained, handle_or_id: str | None = None, heal: bool = True) -> list[VerifyReport]:
    """Re-hash published trees; quarantine what changed; re-fetch it when the network allows."""
    metas = list(cache.store.iter_meta()) if handle_or_id is None else [find(cache, handle_or_id)]
    reports = []
    for meta in metas:
        tree = cache.store.object_path(meta.digest)
        problems = await run_in(HASHING, full_problems, tree, meta.listing)
        if problems and tree.is_dir():
            cache.quarantine(meta.digest, problems)
        report = VerifyReport(cache.entry_for(meta, problems=problems), problems)
        if problems and heal and not cache.settings.offline:
            report.healed = await _heal(cache, meta)
        reports.append(report)
    return reports


async def _heal(cache: Maintained, meta: ObjectMeta) -> bool:
    """Fetch a quarantined model again through any handle that named it; the first that succeeds heals it."""
    why = "no handle names it"
    for _key, ref in _refs_to(cache, meta):
        try:
            entry = await cache.resolve(ref.handle)
        except HubdError as exc:
            why = exc.message
            continue
        if entry.state == "ok":
            # In line (one small append): the healed entry is already served, and the heal's report follows.
            cache.audit.record("heal", None, meta.digest, ref.handle)
            return True
    cache.audit.record("heal", None, meta.digest, _first(meta.names), f"failed: {why}")
    return False


def _first(names: list[str]) -> str | None:
    return names[0] if names else None
