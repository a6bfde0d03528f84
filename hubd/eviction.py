"""Keeping the cache inside its quota: least recently used first, never a pin, never what is in use.

It runs twice per fetch when a quota is set: before the first byte, making room for the archive's stated size
(a model unpacks to at least that), and after publishing, with the model's real size.

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
) -> GcReport:
    """Evict until published models fit in `max_size` (only orphans and quarantine when it is None)."""
    store = engine.store
    with gc_lock(store, shared=False, wait=wait):
        entries = [e for e in engine.list_entries() if e.state == "ok"]
        referenced = {ref.digest for ref in store.iter_refs()}
        now = time.time()
        grace = engine.settings.gc_grace
        report = GcReport(dry_run=dry_run, size_before=sum(e.size_bytes for e in entries))
        report.quarantine_freed_bytes = _clear_quarantine(store, dry_run)
        size = report.size_before

        def evict(entry: Entry) -> None:
            nonlocal size
            if not dry_run:
                engine.remove_digest(entry.id)
            report.removed.append(entry)
            report.freed_bytes += entry.size_bytes
            size -= entry.size_bytes

        candidates = []
        for entry in entries:
            recent = (entry.last_used or entry.fetched_at) > now - grace or entry.id in protect
            if entry.pinned:
                report.kept_pinned += 1
            elif recent:
                report.kept_recent += 1
            elif entry.id not in referenced:
                evict(entry)  # nothing can resolve to it any more
            else:
                candidates.append(entry)
        candidates.sort(key=lambda e: e.last_used or e.fetched_at)
        for entry in candidates:
            if max_size is None or size <= max_size:
                break
            evict(entry)
        report.size_after = size
        return report


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
