"""`Entry`: what the cache hands out for a handle, in the shape the CLI, the API and the client all use."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

EntryState = Literal["ok", "broken"]


class Entry(BaseModel):
    """One published model: where it is, what it is, and which names point at it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """The tree digest (sha256 of the extracted files' names, sizes and digests)."""
    path: str
    """Absolute path of the SavedModel directory."""
    relpath: str
    """`path` relative to the cache root, for clients that see the cache at another mount point."""
    handles: list[str]
    """Canonical handles that resolve to this entry."""
    size_bytes: int
    archive_sha256: str
    tree_digest: str
    fetched_at: float
    last_used: float | None = None
    state: EntryState = "ok"
    pinned: bool = False
    problems: list[str] = []
    users: list[int] = []
    """The uids that asked for it (resolve, pull or prefetch), in the order of their numbers."""
    aliases: list[str] = []
    """Names manifests give it (`name = ...`); each resolves like a handle."""
