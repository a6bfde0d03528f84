"""Request and response bodies of API v1, as pydantic models (the OpenAPI document is generated from them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hubd.audit import AuditRecord
from hubd.entry import Entry
from hubd.events import ErrorDetail
from hubd.manifest import ManifestEntry

HANDLE = Field(min_length=1, max_length=2048, description="A model handle (see docs/handles.md).")
SHA256 = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="Expected sha256 of the archive.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResolveRequest(_Strict):
    handle: str = HANDLE
    sha256: str | None = SHA256
    offline: bool = Field(False, description="Answer from the cache only: never fetch (as `hubd --offline`).")


class PullRequest(ResolveRequest):
    pass


class VerifyRequest(_Strict):
    handle: str | None = Field(None, max_length=2048, description="A handle or id; every model when absent.")
    heal: bool = True


class PrefetchRequest(_Strict):
    model: list[ManifestEntry] = Field(max_length=10_000)
    source: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="Where the manifest comes from (its path): named by pins and in alias conflicts.",
    )


class GcRequest(_Strict):
    dry_run: bool = False
    max_size: int | None = Field(None, ge=0, description="Collect down to this many bytes (default: the quota).")


class GcResponse(_Strict):
    dry_run: bool
    freed_bytes: int
    quarantine_freed_bytes: int
    removed: list[Entry]
    kept_pinned: int
    kept_recent: int
    size_before: int
    size_after: int
    fits: bool = Field(True, description="False when even evicting everything evictable misses the quota.")
    spools_dropped: int = Field(0, description="Resume spools of abandoned downloads (partial/) dropped.")
    spool_bytes_freed: int = Field(0, description="Bytes those spools held.")


class Upstream(_Strict):
    url: str
    reachable: bool
    detail: str


class UserUsage(_Strict):
    uid: int
    user: str | None
    entries: int
    size_bytes: int
    """Bytes of the models this uid asked for (a model several users asked for counts for each)."""


class Status(_Strict):
    cache_dir: str
    offline: bool
    entries: int
    pinned: int
    broken: int
    size_bytes: int
    max_size: int | None
    upstream: Upstream
    users: list[UserUsage] = Field(
        [], description="Usage per uid, largest first: a page of at most `limit` (query), from `cursor` (query)."
    )
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page of users; None: the last."
    )


class Unpinned(_Strict):
    id: str
    unpinned: list[str] = Field(description="What pinned the model (manifests and names); empty when nothing did.")


class AuditList(_Strict):
    records: list[AuditRecord]


class ErrorBody(_Strict):
    error: ErrorDetail


class Health(_Strict):
    status: Literal["ok"]
    version: str
    cache_dir: str
    offline: bool


class ModelList(_Strict):
    models: list[Entry] = Field(
        description="A page of at most `limit` (query, default 1000, at most 10000) models in id order, after "
        "`cursor` (query); with `name` (query), only the model it names, or none."
    )
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; None: the last page.")


class VerifyResult(_Strict):
    id: str
    handles: list[str]
    problems: list[str]
    healed: bool


class VerifyResponse(_Strict):
    results: list[VerifyResult]


class ImportDone(_Strict):
    """The last line of POST /v1/import's stream when the bundle could be read to its end."""

    event: Literal["done"]
    imported: int
    refused: int


class ImportFailed(_Strict):
    """The last line of POST /v1/import's stream when the bundle itself could not be read."""

    event: Literal["error"]
    error: ErrorDetail
