"""Keeping the cache inside its quota: least recently used first, never a pin, never what is in use.

When a quota is set it runs only after a download has passed every check (checksum, structure, links, refs) and
its model was published: a request that fails, for whatever reason, costs nobody a model. While the bytes
arrive nothing is evicted; staging may exceed the quota meanwhile, bounded by the free-disk check and by the
rule that a download which could not fit even once everything evictable is gone is refused before its first
byte (or stopped as soon as its bytes show it), evicting nothing. So is a model that unpacks too large to fit.

Rules, in order:
- pinned entries (a manifest said `pin = true`) are never evicted;
- an entry resolved or fetched within the grace period may be open in a running process: kept;
- objects no ref points at, then quarantined trees, go before anything in use;
- then the least recently used, until the cache fits.
An exclusive flock on locks/gc.lock keeps collection and publishing (which holds it shared) apart, so a
directory being published is never removed.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hubd.entry import Entry
from hubd.errors import HubdError
from hubd.store import Store, remove_tree

if TYPE_CHECKING:
    from hubd.engine import Engine


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


class QuotaExceeded(HubdError):
    """A download that the quota cannot hold besides what may not be evicted."""

    code = "over_quota"
    http_status = 507


class CollectorBusy(HubdError):
    code = "busy"
    http_status = 409


@contextmanager
def gc_lock(store: Store, shared: bool, wait: bool = True) -> Iterator[None]:
    fd = os.open(store.locks / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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


def collect(
    engine: Engine,
    max_size: int | None,
    dry_run: bool = False,
    protect: frozenset[str] = frozenset(),
    wait: bool = True,
    only_if_fits: bool = False,
) -> GcReport:
    """Evict until published models fit in `max_size` (only orphans and quarantine when it is None).

    With `only_if_fits`, evict nothing at all unless evicting makes the cache fit: a download never costs other
    users their models unless it can then be kept."""
    store = engine.store
    with gc_lock(store, shared=False, wait=wait):
        entries = [e for e in engine.list_entries() if e.state == "ok"]
        plan = _plan(engine, entries, protect)
        report = GcReport(dry_run=dry_run, size_before=sum(e.size_bytes for e in entries))
        report.kept_pinned, report.kept_recent = plan.kept_pinned, plan.kept_recent
        report.fits = max_size is None or plan.floor <= max_size
        if only_if_fits and not report.fits:
            report.size_after = report.size_before
            return report
        report.quarantine_freed_bytes = _clear_quarantine(store, dry_run)
        over = [] if max_size is None else _least_needed(plan.candidates, report.size_before - max_size, plan)
        for entry in [*plan.orphans, *over]:
            if not dry_run:
                engine.remove_digest(entry.id, action="evict")
            report.removed.append(entry)
            report.freed_bytes += entry.size_bytes
        report.size_after = report.size_before - report.freed_bytes
        return report


def _least_needed(candidates: list[Entry], excess: int, plan: _Plan) -> list[Entry]:
    """The least recently used candidates, just enough to free `excess` bytes once the orphans are gone."""
    excess -= sum(e.size_bytes for e in plan.orphans)
    chosen = []
    for entry in candidates:
        if excess <= 0:
            break
        chosen.append(entry)
        excess -= entry.size_bytes
    return chosen


def unevictable_bytes(engine: Engine, protect: frozenset[str] = frozenset()) -> int:
    """What the cache holds that no eviction may remove now: pinned and recently used models."""
    entries = [e for e in engine.list_entries() if e.state == "ok"]
    return _plan(engine, entries, protect).floor


@dataclass
class _Plan:
    orphans: list[Entry]
    """Nothing can resolve to these any more: they go first, whatever the quota."""
    candidates: list[Entry]
    """Evictable, least recently used first."""
    floor: int
    """Bytes that stay whatever is evicted."""
    kept_pinned: int = 0
    kept_recent: int = 0


def _plan(engine: Engine, entries: list[Entry], protect: frozenset[str]) -> _Plan:
    referenced = {ref.digest for ref in engine.store.iter_refs()}
    horizon = time.time() - engine.settings.gc_grace
    plan = _Plan([], [], 0)
    for entry in entries:
        recent = (entry.last_used or entry.fetched_at) > horizon or entry.id in protect
        if entry.pinned:
            plan.kept_pinned += 1
        elif recent:
            plan.kept_recent += 1
        elif entry.id not in referenced:
            plan.orphans.append(entry)
            continue
        else:
            plan.candidates.append(entry)
            continue
        plan.floor += entry.size_bytes
    plan.candidates.sort(key=lambda e: e.last_used or e.fetched_at)
    return plan


def _clear_quarantine(store: Store, dry_run: bool) -> int:
    freed = 0
    for path in store.quarantine_dir.iterdir():
        if path.is_dir():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            if not dry_run:
                remove_tree(path)
        elif not dry_run:
            path.unlink(missing_ok=True)
    return freed
