"""Keeping the cache inside its quota: least recently used first, never a pin, never what is in use.

When a quota is set it runs only after a download has passed every check (checksum, structure, links, refs) and
its model was published: a request that fails, for whatever reason, costs nobody a model. While the bytes
arrive nothing is evicted; staging may exceed the quota meanwhile, bounded by the free-disk check and by the
rule that a download which could not fit even once everything evictable is gone is refused before its first
byte (or stopped as soon as its bytes show it), evicting nothing. So is a model that unpacks too large to fit.

Rules, in order:
- pinned entries (a manifest said `pin = true`) are never evicted;
- an entry resolved or fetched within the grace period may be open in a running process: kept; so is the model
  being published;
- objects no ref points at, then quarantined trees, go before anything in use;
- then the least recently used, until the cache fits.

Three steps, kept apart. `gather` reads the cache in one pass (one listing each of objects, meta, refs, pins and
the tensorflow_hub view) into a frozen `CacheState` and look-up tables. `plan` is a pure function of that state
(no I/O, no clock): it returns a frozen `GcPlan`, which is what `hubd gc --dry-run` prints. `collect` executes
the plan in one batch under the exclusive gc lock (`hubd.store.gc_lock`; publishing holds it shared, so a
directory being published is never removed), removing refs, links, objects and index records by look-up.
Evicting k of N entries costs one pass over the cache, not k.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from hubd.audit import AuditLog
from hubd.catalog import Catalog
from hubd.config import Settings
from hubd.entry import Entry
from hubd.errors import (
    CollectorBusy,
    QuotaExceeded,
)
from hubd.index import Index
from hubd.store import ObjectMeta, Store, gc_lock, remove_tree
from hubd.tfhub_view import TfhubView

__all__ = [
    "CacheState",
    "CachedEntry",
    "CollectorBusy",
    "GcPlan",
    "GcReport",
    "QuarantinedTree",
    "QuotaExceeded",
    "collect",
    "gather",
    "gc_lock",
    "plan",
    "unevictable_bytes",
]


# -- the planner: state in, plan out, no I/O -------------------------------------------------------------------


@dataclass(frozen=True)
class CachedEntry:
    digest: str
    size: int
    last_used: float
    """The last resolve, or the fetch when it was never resolved since (seconds since the epoch)."""
    pinned: bool = False
    names: tuple[str, ...] = ()
    referenced: bool = True
    """Whether a ref points at it: an object nothing can resolve to any more is an orphan."""


@dataclass(frozen=True)
class QuarantinedTree:
    name: str
    """Its name under quarantine/ (a tree, or a file beside one)."""
    size: int


@dataclass(frozen=True)
class CacheState:
    entries: tuple[CachedEntry, ...]
    """Published objects whose tree is present (quarantined ones are not entries)."""
    quarantine: tuple[QuarantinedTree, ...] = ()


@dataclass(frozen=True)
class GcPlan:
    to_evict: tuple[CachedEntry, ...]
    """In order: the orphans, then the least recently used, just enough to fit."""
    bytes_freed: int
    fits: bool
    """Whether the cache (plus `need`) fits the quota once `to_evict` is gone. False: even evicting everything
    evictable misses it (then, with `only_if_fits`, nothing is evicted and no quarantine dropped)."""
    drop_quarantine: tuple[QuarantinedTree, ...]
    quarantine_bytes: int
    size_before: int
    floor: int
    """Bytes that stay whatever is evicted: pinned, recently used and protected entries."""
    kept_pinned: int
    kept_recent: int
    orphans: int
    """How many of `to_evict` (the first ones) no ref points at."""

    @property
    def size_after(self) -> int:
        return self.size_before - self.bytes_freed


def plan(
    state: CacheState,
    quota: int | None,
    need: int = 0,
    *,
    now: float,
    grace: float,
    protect: Collection[str] = frozenset(),
    only_if_fits: bool = False,
) -> GcPlan:
    """What to evict so that the cache, plus `need` bytes about to be added, fits `quota` (None: no quota, only
    orphans and quarantine go). Pinned entries never go; nor entries used within `grace` seconds of `now`, nor
    `protect` (the model being published). With `only_if_fits`, a cache that cannot fit loses nothing."""
    horizon = now - grace
    orphans: list[CachedEntry] = []
    candidates: list[CachedEntry] = []
    floor = kept_pinned = kept_recent = 0
    for entry in state.entries:
        if entry.pinned:
            kept_pinned += 1
        elif entry.last_used > horizon or entry.digest in protect:
            kept_recent += 1
        elif not entry.referenced:
            orphans.append(entry)
            continue
        else:
            candidates.append(entry)
            continue
        floor += entry.size
    size_before = sum(entry.size for entry in state.entries)
    fits = quota is None or floor + need <= quota
    if only_if_fits and not fits:
        return GcPlan((), 0, False, (), 0, size_before, floor, kept_pinned, kept_recent, 0)
    chosen = list(orphans)
    if quota is not None:
        excess = size_before + need - quota - sum(entry.size for entry in orphans)
        for entry in sorted(candidates, key=lambda e: (e.last_used, e.digest)):
            if excess <= 0:
                break
            chosen.append(entry)
            excess -= entry.size
    return GcPlan(
        to_evict=tuple(chosen),
        bytes_freed=sum(entry.size for entry in chosen),
        fits=fits,
        drop_quarantine=state.quarantine,
        quarantine_bytes=sum(tree.size for tree in state.quarantine),
        size_before=size_before,
        floor=floor,
        kept_pinned=kept_pinned,
        kept_recent=kept_recent,
        orphans=len(orphans),
    )


# -- gathering and executing -----------------------------------------------------------------------------------


class Cache(Protocol):
    """What eviction needs of the engine (hubd.engine.Engine is one; it is not imported: no import circle)."""

    @property
    def store(self) -> Store: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def index(self) -> Index: ...
    @property
    def view(self) -> TfhubView | None: ...
    @property
    def catalog(self) -> Catalog: ...
    @property
    def audit(self) -> AuditLog: ...
    def entry_for(self, meta: ObjectMeta) -> Entry: ...
    def forget_meta(self, digest: str) -> None:
        """Drop what the engine remembers of an object that was removed."""


@dataclass
class Found:
    """Look-up tables from the same pass as a `CacheState`, for executing its plan without rescanning."""

    metas: dict[str, ObjectMeta]
    refs: dict[str, list[tuple[str, str]]]
    """digest -> (ref key, canonical name) of each ref pointing at it."""


def gather(cache: Cache, quarantine: bool = False) -> tuple[CacheState, Found]:
    """The cache's state in one pass: one listing each of objects, pins, refs and meta; last-use times from the
    index (`quarantine`: the quarantined trees and their sizes too)."""
    store, index = cache.store, cache.index
    present = store.object_digests()
    pinned = store.pinned_digests()
    refs: dict[str, list[tuple[str, str]]] = {}
    for key, ref in store.ref_items():
        refs.setdefault(ref.digest, []).append((key, ref.canonical))
    metas = {meta.digest: meta for meta in store.iter_meta() if meta.digest in present}
    entries = tuple(
        CachedEntry(
            digest=digest,
            size=meta.size_bytes,
            last_used=index.last_used(digest) or meta.fetched_at,
            pinned=digest in pinned,
            names=tuple(meta.names),
            referenced=digest in refs,
        )
        for digest, meta in metas.items()
    )
    trees = tuple(_quarantined(store)) if quarantine else ()
    return CacheState(entries, trees), Found(metas, refs)


def _quarantined(store: Store) -> list[QuarantinedTree]:
    trees = []
    for path in sorted(store.quarantine_dir.iterdir()):
        size = 0
        if path.is_dir() and not path.is_symlink():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        trees.append(QuarantinedTree(path.name, size))
    return trees


@dataclass
class GcReport:
    freed_bytes: int = 0
    removed: list[Entry] = field(default_factory=list)
    quarantine_freed_bytes: int = 0
    kept_pinned: int = 0
    kept_recent: int = 0
    size_before: int = 0
    size_after: int = 0
    dry_run: bool = False
    fits: bool = True
    """False when the quota could not be reached even by evicting everything evictable (nothing was, then, when
    `collect` was asked to evict only if that makes the cache fit)."""
    spools_dropped: int = 0
    """Resume spools of abandoned downloads (partial/) that `hubd gc` dropped (Engine.gc, not `collect`)."""
    spool_bytes_freed: int = 0


def collect(
    cache: Cache,
    max_size: int | None,
    dry_run: bool = False,
    protect: frozenset[str] = frozenset(),
    wait: bool = True,
    only_if_fits: bool = False,
) -> GcReport:
    """Evict until published models fit in `max_size` (only orphans and quarantine when it is None).

    Under the exclusive gc lock: gather the state, plan, and (unless `dry_run`) execute the plan in one batch.
    With `only_if_fits`, evict nothing at all unless evicting makes the cache fit: a download never costs other
    users their models unless it can then be kept."""
    with gc_lock(cache.store, shared=False, wait=wait):
        state, found = gather(cache, quarantine=True)
        the_plan = plan(
            state,
            max_size,
            now=time.time(),
            grace=cache.settings.gc_grace,
            protect=protect,
            only_if_fits=only_if_fits,
        )
        report = GcReport(
            freed_bytes=the_plan.bytes_freed,
            removed=[cache.entry_for(found.metas[item.digest]) for item in the_plan.to_evict],
            quarantine_freed_bytes=the_plan.quarantine_bytes,
            kept_pinned=the_plan.kept_pinned,
            kept_recent=the_plan.kept_recent,
            size_before=the_plan.size_before,
            size_after=the_plan.size_after,
            dry_run=dry_run,
            fits=the_plan.fits,
        )
        if not dry_run:
            execute(cache, the_plan, found)
        return report


def execute(cache: Cache, the_plan: GcPlan, found: Found) -> None:
    """Carry out a plan (call under the exclusive gc lock): quarantine first, then each object with its refs,
    links, pin and users, recorded in the audit trail as the daemon's; the index in one transaction at the end."""
    store = cache.store
    for tree in the_plan.drop_quarantine:
        path = store.quarantine_dir / tree.name
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            path.unlink(missing_ok=True)
    links = cache.view.links_by_target() if cache.view is not None and the_plan.to_evict else {}
    gone: list[str] = []
    unbound: list[str] = []
    try:
        for item in the_plan.to_evict:
            name = item.names[0] if item.names else None
            try:
                for key, canonical in found.refs.get(item.digest, ()):
                    store.remove_ref(key)
                    unbound.append(canonical)
                if cache.view is not None:
                    cache.view.remove_links(links.get(item.digest, ()))
                store.remove_object(item.digest)
                cache.catalog.forget(item.digest)
                cache.forget_meta(item.digest)
            except Exception as exc:
                cache.audit.record("evict", None, item.digest, name, f"failed: {exc}")
                raise
            gone.append(item.digest)
            cache.audit.record("evict", None, item.digest, name, detail=f"{item.size} bytes")
    finally:
        cache.index.forget_all(gone, unbound)


def fits_without_eviction(cache: Cache, quota: int, adding: int = 0) -> bool:
    """Whether every published model plus `adding` bytes is within `quota` by the index's totals row: one row and
    one listing of meta/ (`Index.size_bytes`), not a read of every meta and ref. False when the index cannot
    tell (then the caller gathers from the files)."""
    size = cache.index.size_bytes()
    return size is not None and size + adding <= quota


def unevictable_bytes(cache: Cache, protect: frozenset[str] = frozenset()) -> int:
    """What the cache holds that no eviction may remove now: pinned and recently used models."""
    state, _found = gather(cache)
    return plan(state, None, now=time.time(), grace=cache.settings.gc_grace, protect=protect).floor
