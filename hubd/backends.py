"""Where a `hubd` command runs: through the daemon's API, or with the engine in this process.

Both backends answer with the API's own models (hubd/server/api.py, hubd/events.py), so each command in cli.py
is written once against `Backend` and rendered once. `DaemonBackend` is the daemon's API through `DaemonClient`
(standard library HTTP: no aiohttp, no event loop); `LocalBackend` starts the engine, on a cache the user owns,
and runs each call on its own event loop. Neither prints anything: progress reaches the caller as callbacks.

A model a command does not need is imported by the method that returns it: `hubd pull` through the daemon loads
the events and `Entry`, nothing of the server or the engine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlencode

from hubd.api_client import DaemonClient, error_from
from hubd.entry import Entry
from hubd.errors import AnswerBrokenOff, BadRequest, HubdError, UnknownModel
from hubd.events import DoneEvent, ErrorEvent, ProgressEvent, SummaryEvent

if TYPE_CHECKING:
    from pydantic import BaseModel

    from hubd.audit import AuditRecord
    from hubd.bundle import BundleEntry, ImportResult
    from hubd.config import Settings
    from hubd.engine import Engine
    from hubd.manifest import Manifest
    from hubd.server.api import GcResponse, Status, Unpinned, VerifyResult

T = TypeVar("T")
Event = ProgressEvent | DoneEvent | ErrorEvent | SummaryEvent
"""What a pull or a prefetch reports, as the API streams it."""
_ID_PREFIX = re.compile(r"[0-9a-f]{8,64}")


@dataclass(frozen=True)
class AuditQuery:
    """`hubd audit`'s filters, as the API takes them (times as the user wrote them)."""

    since: str | None = None
    until: str | None = None
    uid: str | None = None
    action: str | None = None
    limit: int = 10000


@dataclass(frozen=True)
class ExportProgress:
    """How an export reports: the daemon streams bytes (`received`), the engine writes model by model
    (`exported`: the entry, how many so far, how many in all)."""

    received: Callable[[str, int, int | None], None]
    exported: Callable[[BundleEntry, int, int], None]


class Backend(Protocol):
    """What every command needs of the cache, whoever serves it."""

    via: str
    """Who serves the commands, in words (`hubd status` shows it)."""

    def pull(self, handle: str, sha256: str | None, offline: bool, on: Callable[[ProgressEvent], None]) -> Entry:
        """Resolve one model, fetching it if need be; progress events as they happen."""
        ...

    def prefetch(self, manifest: Manifest, source: str, on: Callable[[Event], None]) -> None:
        """Resolve every model of a manifest; its events (done or error per model) as they happen."""
        ...

    def models(self) -> list[Entry]: ...

    def remove(self, handle: str, force: bool) -> Entry: ...

    def unpin(self, handle: str) -> Unpinned: ...

    def verify(self, handle: str | None, heal: bool) -> list[VerifyResult]: ...

    def gc(self, dry_run: bool, max_size: int | None) -> GcResponse: ...

    def status(self) -> Status:
        """The cache's figures with every user's usage (`next_cursor` None: all pages read)."""
        ...

    def audit(self, query: AuditQuery) -> list[AuditRecord]: ...

    def export(self, wanted: list[tuple[str, str | None]], out: IO[bytes], progress: ExportProgress) -> None:
        """Write a bundle of the models `wanted` ((handle, sha256) pairs) into `out`."""
        ...

    def import_bundle(self, path: Path, on: Callable[[ImportResult], None]) -> None:
        """Publish the models of the bundle at `path`, each result (imported or refused) as it comes."""
        ...

    def close(self) -> None: ...


# -- through the daemon ---------------------------------------------------------------------------------


_Answer = TypeVar("_Answer", bound="BaseModel")


def _answer(kind: type[_Answer], data: Any) -> _Answer:
    """A daemon's answer as `kind`, ignoring fields this hubd does not know: a newer daemon may add some, and an
    older CLI must keep working with it. (The daemon's own models forbid extras, so its OpenAPI document and the
    requests it accepts stay exact.)"""
    return kind.model_validate(data, extra="ignore")


def _event(data: dict[str, Any]) -> Event:
    kinds: dict[str, type[Event]] = {
        "progress": ProgressEvent,
        "done": DoneEvent,
        "error": ErrorEvent,
        "summary": SummaryEvent,
    }
    kind = kinds.get(str(data.get("event")))
    if kind is None:
        raise HubdError(f"the daemon sent an event this hubd does not know: {data.get('event')!r}", "upgrade hubd")
    return _answer(kind, data)


class DaemonBackend:
    """The daemon's API v1: it stays the only writer of its cache."""

    def __init__(self, client: DaemonClient) -> None:
        self.client = client
        self.via = f"the daemon at {client.where}"

    @classmethod
    def find(cls, candidates: list[Settings]) -> DaemonBackend | None:
        """The first candidate whose daemon answers; None when none does."""
        for settings in candidates:
            client = DaemonClient(settings)
            if client.is_running():
                return cls(client)
        return None

    def _events(self, path: str, body: Any) -> Any:
        for data in self.client.stream(path, body):
            yield _event(data)

    def pull(self, handle: str, sha256: str | None, offline: bool, on: Callable[[ProgressEvent], None]) -> Entry:
        for event in self._events("/v1/pull", {"handle": handle, "sha256": sha256, "offline": offline}):
            if isinstance(event, ProgressEvent):
                on(event)
            elif isinstance(event, DoneEvent):
                return event.entry
            elif isinstance(event, ErrorEvent):
                raise error_from(event.model_dump())
        raise HubdError("the daemon ended the stream without a result", "see the daemon's log")

    def prefetch(self, manifest: Manifest, source: str, on: Callable[[Event], None]) -> None:
        for event in self._events("/v1/prefetch", {**manifest.model_dump(), "source": source}):
            on(event)

    def models(self, page: int = 1000) -> list[Entry]:
        """Every model, a page of `page` at a time."""
        return [_answer(Entry, e) for data in self.client.pages("/v1/models", page) for e in data["models"]]

    def _model_id(self, handle: str) -> str:
        """The id the daemon knows a handle, alias or id (prefix) by, looked up by the daemon: one request, not a
        listing of every model. The answer is checked against the name, since a daemon too old to know `?name=`
        answers with a page of all models, and `hubd rm` must never take one of those for the one named."""
        if _ID_PREFIX.fullmatch(handle):  # the daemon resolves ids and id prefixes itself (Engine.find)
            return handle
        from hubd_client.handles import parse_handle

        from hubd.catalog import ALIAS

        try:  # refused here, before anything is sent: a handle with credentials never leaves this process
            canonical = parse_handle(handle, frozenset(self.client.settings.http_hosts)).canonical
        except HubdError:
            if not ALIAS.match(handle):
                raise
            canonical = None
        answer = self.client.json("GET", "/v1/models?" + urlencode({"name": handle}))
        entries = [_answer(Entry, e) for e in answer["models"]]
        for entry in entries:
            if handle in entry.aliases:
                return entry.id
        for entry in entries:
            if canonical in entry.handles:
                return entry.id
        raise UnknownModel(f"no cached model matches {handle!r}", "see `hubd ls` for what is cached")

    def remove(self, handle: str, force: bool) -> Entry:
        query = "?force=1" if force else ""
        return _answer(Entry, self.client.json("DELETE", f"/v1/models/{self._model_id(handle)}{query}"))

    def unpin(self, handle: str) -> Unpinned:
        from hubd.server.api import Unpinned

        return _answer(Unpinned, self.client.json("DELETE", f"/v1/models/{self._model_id(handle)}/pin"))

    def verify(self, handle: str | None, heal: bool) -> list[VerifyResult]:
        from hubd.server.api import VerifyResponse

        data = self.client.json("POST", "/v1/verify", {"handle": handle, "heal": heal}, long=True)
        return _answer(VerifyResponse, data).results

    def gc(self, dry_run: bool, max_size: int | None) -> GcResponse:
        from hubd.server.api import GcResponse

        data = self.client.json("POST", "/v1/gc", {"dry_run": dry_run, "max_size": max_size}, long=True)
        return _answer(GcResponse, data)

    def status(self, page: int = 1000) -> Status:
        from hubd.server.api import Status

        merged: dict[str, Any] = {}
        for data in self.client.pages("/v1/status", page):
            merged = {**data, "users": [*merged.get("users", []), *data.get("users", [])]}
        return _answer(Status, {**merged, "next_cursor": None})

    def audit(self, query: AuditQuery) -> list[AuditRecord]:
        from hubd.server.api import AuditList

        params = {k: v for k in ("since", "until", "uid", "action") if (v := getattr(query, k))}
        params["limit"] = str(query.limit)
        return _answer(AuditList, self.client.json("GET", f"/v1/audit?{urlencode(params)}")).records

    def export(self, wanted: list[tuple[str, str | None]], out: IO[bytes], progress: ExportProgress) -> None:
        pins = [sha or "" for _handle, sha in wanted] if any(sha for _handle, sha in wanted) else []
        query = urlencode([("handle", handle) for handle, _sha in wanted] + [("sha256", pin) for pin in pins])
        try:
            self.client.download(f"/v1/export?{query}", out, progress.received)
        except AnswerBrokenOff:
            raise HubdError(
                "the daemon broke off the export (a cached model failed its re-hash?); no bundle was written",
                "see the daemon's log, run `hubd verify`, then export again",
            ) from None

    def import_bundle(self, path: Path, on: Callable[[ImportResult], None]) -> None:
        from hubd.bundle import ImportResult

        for event in self.client.upload("/v1/import", path, "application/x-tar"):
            if event.get("event") == "entry":
                on(_answer(ImportResult, event))
            elif event.get("event") == "error":
                raise error_from(event)

    def close(self) -> None:
        pass


# -- in this process ------------------------------------------------------------------------------------


def check_owner(settings: Settings) -> None:
    """The in-process engine may only write a cache the user owns; a shared cache belongs to its daemon."""
    root = settings.cache_dir
    if root.exists() and root.stat().st_uid != os.geteuid():
        where = settings.url or settings.socket
        raise BadRequest(
            f"the cache {root} belongs to another user and no hubd daemon answers at {where}",
            "start the daemon (`systemctl start hubd`), or set HUBD_CACHE_DIR to a cache of your own",
        )


async def _in_thread(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a worker thread, so the engine's loop goes on meanwhile."""
    import asyncio

    return await asyncio.to_thread(work, *args)


class LocalBackend:
    """The engine in this process, on its own event loop; what it does is attributed to this user's uid."""

    def __init__(self, settings: Settings) -> None:
        import asyncio  # here, not at the top: a command the daemon serves never starts an event loop

        from hubd.engine import Engine

        check_owner(settings)
        self.settings = settings
        self.via = f"the cache {settings.cache_dir}, in this process"
        self.uid = os.getuid()
        self._runner = asyncio.Runner()
        self.engine: Engine = Engine(settings)
        try:
            self._run(self.engine.start())
        except BaseException:
            self._runner.close()
            raise

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(work)

    def close(self) -> None:
        try:
            self._run(self.engine.close())
        finally:
            self._runner.close()

    def pull(self, handle: str, sha256: str | None, offline: bool, on: Callable[[ProgressEvent], None]) -> Entry:
        def progress(phase: str, done: int, total: int | None) -> None:
            on(ProgressEvent.model_construct(event="progress", handle=handle, phase=phase, done=done, total=total))

        return self._run(
            self.engine.resolve(handle, sha256=sha256, on_progress=progress, uid=self.uid, offline=offline)
        )

    def prefetch(self, manifest: Manifest, source: str, on: Callable[[Event], None]) -> None:
        from hubd.prefetch import resolve_many

        self.engine.claim_aliases(source, [(m.name, m.handle, m.sha256) for m in manifest.model])

        async def consume() -> None:
            async for event in resolve_many(self.engine, manifest.model, uid=self.uid, source=source):
                on(event)  # type: ignore[arg-type]  # resolve_many yields exactly these event models

        self._run(consume())

    def models(self) -> list[Entry]:
        return self.engine.list_entries()

    def remove(self, handle: str, force: bool) -> Entry:
        return self.engine.remove(handle, uid=self.uid, force=force)

    def unpin(self, handle: str) -> Unpinned:
        from hubd.server.api import Unpinned

        digest = self.engine.find(handle).digest
        return Unpinned(id=digest, unpinned=self.engine.unpin(digest, self.uid))

    def verify(self, handle: str | None, heal: bool) -> list[VerifyResult]:
        from hubd.server.api import VerifyResult

        reports = self._run(self.engine.verify(handle, heal=heal))
        return [
            VerifyResult(id=r.entry.id, handles=r.entry.handles, problems=r.problems, healed=r.healed)
            for r in reports
        ]

    def gc(self, dry_run: bool, max_size: int | None) -> GcResponse:
        from hubd.server.api import GcResponse

        report = self._run(self.engine.gc(dry_run=dry_run, max_size=max_size))
        return GcResponse(**report.__dict__)

    def status(self) -> Status:
        from hubd.inventory import cache_status

        return self._run(cache_status(self.engine))

    def audit(self, query: AuditQuery) -> list[AuditRecord]:
        from hubd.audit import AuditLog, parse_time, uid_of

        records = list(
            AuditLog(self.settings.cache_dir).read(
                since=parse_time(query.since) if query.since else None,
                until=parse_time(query.until) if query.until else None,
                uid=uid_of(query.uid) if query.uid else None,
                action=query.action,
            )
        )
        return records[-query.limit :] if query.limit > 0 else []

    def export(self, wanted: list[tuple[str, str | None]], out: IO[bytes], progress: ExportProgress) -> None:
        from hubd.bundle import plan_export, write_bundle

        digests = []
        for handle, sha256 in wanted:
            if _ID_PREFIX.fullmatch(handle):
                digests.append(self.engine.find(handle).digest)
            else:
                digests.append(self._run(self.engine.resolve(handle, sha256=sha256, uid=self.uid)).id)
        header = plan_export(self.engine, digests)
        count = iter(range(1, len(header.entries) + 1))

        def exported(entry: BundleEntry) -> None:
            progress.exported(entry, next(count), len(header.entries))

        self._run(_in_thread(write_bundle, self.engine, header, out, exported))

    def import_bundle(self, path: Path, on: Callable[[ImportResult], None]) -> None:
        from hubd.bundle import import_bundle

        with open(path, "rb") as stream:
            self._run(_in_thread(import_bundle, self.engine, stream, self.uid, on))
