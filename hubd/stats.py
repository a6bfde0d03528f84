"""The resolve pipeline's counters, typed: the engine and the object store count, /metrics reads them when
scraped (hubd.server.metrics), so each number has one owner and a misspelt counter is a type error."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

FetchedFrom = Literal["upstream", "mirror", "objectstore"]


@dataclass
class ResolveStats:
    """What the resolve pipeline counted since start; /metrics reads it when scraped (hubd.server.metrics)."""

    hits: int = 0
    misses: int = 0
    fetches: int = 0
    """Downloads published (from upstream or the mirror; imports from the object store are not counted)."""
    fetch_seconds: float = 0.0
    bytes_fetched: int = 0
    """Archive bytes of every fetch, wherever they came from."""
    bytes_from_upstream: int = 0
    bytes_from_mirror: int = 0
    bytes_from_objectstore: int = 0
    bytes_from_spool: int = 0
    """Bytes a resumed download replayed from its spool (partial/) instead of fetching them again."""
    bytes_served_mirror: int = 0
    """Bytes the LAN mirror listener (--mirror-listen) served to other machines."""

    def fetched(self, where: FetchedFrom, size: int, replayed: int = 0) -> None:
        """An archive of `size` bytes arrived from `where`, the first `replayed` of them from a resume spool."""
        self.bytes_fetched += size
        self.bytes_from_spool += replayed
        arrived = size - replayed
        if where == "upstream":
            self.bytes_from_upstream += arrived
        elif where == "mirror":
            self.bytes_from_mirror += arrived
        else:
            self.bytes_from_objectstore += arrived

    def bytes_by_source(self) -> dict[str, int]:
        """Bytes by where they came from (upstream, mirror, objectstore, spool): a new source shows by itself."""
        prefix = "bytes_from_"
        return {
            f.name.removeprefix(prefix): getattr(self, f.name) for f in fields(self) if f.name.startswith(prefix)
        }
