"""What the cache holds, read without the network and never entry by entry: find a model by handle, id or id
prefix, list entries a page at a time, count them for `status`.

Reads only: what removes, pins or re-checks entries is hubd.maintenance. Both take the engine as a protocol
(`Cached`), so neither imports hubd.engine (no import circle); the engine's `find`, `list_page` and `counts`
delegate here.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from hubd_client.handles import Source
from hubd_client.layout import is_digest

from hubd.audit import user_name
from hubd.entry import Entry
from hubd.errors import UnknownModel
from hubd.eviction import Cache
from hubd.server.api import Status, Upstream, UserUsage
from hubd.store import ObjectMeta
from hubd.tree import TreeListing


class Cached(Cache, Protocol):
    """What inspecting the cache needs of the engine (hubd.engine.Engine is one)."""

    def parse(self, handle: str) -> Source: ...
    async def check_upstream(self) -> tuple[str, bool, str]: ...


@dataclass(frozen=True)
class CacheCounts:
    entries: int
    pinned: int
    broken: int
    size_bytes: int
    users: dict[int, tuple[int, int]]
    """uid -> (entries, bytes) of the served entries that uid asked for."""


def find(cache: Cached, handle_or_id: str) -> ObjectMeta:
    """The object a handle, an alias or an id (or an unambiguous id prefix) names."""
    digest: str | None = None
    alias = cache.catalog.alias(handle_or_id)
    if alias is not None:
        handle_or_id = alias.handle
    if is_digest(handle_or_id):
        digest = handle_or_id  # a whole id: one read, not a listing of every entry
    elif len(handle_or_id) >= 8 and all(c in "0123456789abcdef" for c in handle_or_id):
        digests = cache.store.meta_digests()  # sorted: the ids with this prefix are side by side
        first = bisect.bisect_left(digests, handle_or_id)
        matches = set(itertools.takewhile(lambda d: d.startswith(handle_or_id), digests[first : first + 2]))
        if len(matches) > 1:
            raise UnknownModel(f"id prefix {handle_or_id!r} is ambiguous", "give more characters of the id")
        digest = matches.pop() if matches else None
    else:
        source = cache.parse(handle_or_id)
        ref = cache.store.read_ref(source.ref_key)
        digest = ref.digest if ref else None
    meta = cache.store.read_meta(digest) if digest else None
    if meta is None:
        raise UnknownModel(f"no cached model matches {handle_or_id!r}", "see `hubd ls` for what is cached")
    return meta


def list_page(cache: Cached, limit: int | None = None, after: str | None = None) -> tuple[list[Entry], str | None]:
    """Up to `limit` entries (all when None) in id order, after the id `after`, and the cursor of the next
    page (None after the last). A page costs one listing of meta/ (reused while it is unchanged) and an index
    look-up per entry on it, never a read of every meta: the first page of 100,000 entries is as quick as
    the first of 10."""
    digests = cache.store.meta_digests()
    start = bisect.bisect_right(digests, after) if after else 0
    end = len(digests) if limit is None else min(len(digests), start + limit)
    entries = [entry for entry in (_listed(cache, digest) for digest in digests[start:end]) if entry is not None]
    return entries, (digests[end - 1] if start < end < len(digests) else None)


def _listed(cache: Cached, digest: str) -> Entry | None:
    summary = cache.index.summary(digest)
    if summary is None:  # a publish whose index update a crash cut off: its meta is the truth
        meta = cache.store.read_meta(digest)
        return cache.entry_for(meta) if meta is not None else None
    return cache.entry_for(
        ObjectMeta(
            digest,
            summary["archive_sha256"],
            summary["size_bytes"],
            summary["fetched_at"],
            _NO_LISTING,
            list(summary["names"]),
        )
    )


def counts(cache: Cached) -> CacheCounts:
    """Entries, pins, broken entries, bytes and per-user usage for `status`: one listing each of meta/,
    objects/ and pins/ and one index row (the totals), plus an index look-up per broken entry."""
    on_disk = cache.store.meta_digests()
    present = cache.store.object_digests()
    totals = cache.index.totals()
    size = totals["size_bytes"]
    users = {int(uid): (row[0], row[1]) for uid, row in totals["users"].items()}
    broken = [digest for digest in on_disk if digest not in present]
    for digest in broken:  # status counts only what is served: broken entries' shares come off the totals
        summary = cache.index.summary(digest)
        if summary is None:
            continue
        size -= summary["size_bytes"]
        for uid in summary["users"]:
            entries, size_bytes = users.get(uid, (1, summary["size_bytes"]))
            users[uid] = (entries - 1, size_bytes - summary["size_bytes"])
    pinned = cache.store.pinned_digests()
    return CacheCounts(
        entries=len(on_disk) - len(broken),
        pinned=sum(1 for digest in pinned if _has(on_disk, digest)),
        broken=len(broken),
        size_bytes=size,
        users={uid: usage for uid, usage in users.items() if usage[0] > 0},
    )


async def cache_status(cache: Cached, limit: int | None = None, offset: int = 0) -> Status:
    """`hubd status` and GET /v1/status: counted from the index's totals and three directory listings
    (`counts`), never every entry; users a page at a time, largest first."""
    counted = await asyncio.to_thread(counts, cache)
    url, reachable, detail = await cache.check_upstream()
    ranked = sorted(counted.users.items(), key=lambda item: (-item[1][1], item[0]))
    end = len(ranked) if limit is None else min(len(ranked), offset + limit)
    users = [
        UserUsage(uid=uid, user=user_name(uid), entries=entries, size_bytes=size_bytes)
        for uid, (entries, size_bytes) in ranked[offset:end]
    ]
    return Status(
        users=users,
        next_cursor=str(end) if end < len(ranked) else None,
        cache_dir=str(cache.settings.cache_dir),
        offline=cache.settings.offline,
        entries=counted.entries,
        pinned=counted.pinned,
        broken=counted.broken,
        size_bytes=counted.size_bytes,
        max_size=cache.settings.max_size,
        upstream=Upstream(url=url, reachable=reachable, detail=detail),
    )


_NO_LISTING = TreeListing()
"""Entries listed from index summaries carry no listing: listing never reads a tree's file list."""


def _has(digests: Sequence[str], digest: str) -> bool:
    """Whether the sorted `digests` hold `digest` (a binary search)."""
    at = bisect.bisect_left(digests, digest)
    return at < len(digests) and digests[at] == digest
