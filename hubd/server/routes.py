"""API v1 handlers: parse the body into a model, call the engine, render the result. Nothing else lives here."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import TypeVar, cast

from aiohttp import web
from pydantic import BaseModel

from hubd import __version__, bundle
from hubd.actions import ACTIONS
from hubd.audit import parse_time, uid_of, user_name
from hubd.engine import Engine, VerifyReport
from hubd.entry import Entry
from hubd.errors import BadHandle, BadRequest, HubdError, RequestTimeout, TooManyExports, UnknownModel
from hubd.events import ErrorDetail
from hubd.eviction import gc_lock
from hubd.executors import EXPORTS, PARSING, WAITS, run_in
from hubd.inventory import cache_status
from hubd.manifest import Manifest, ManifestEntry, ManifestProblems, parse_manifest, validate
from hubd.prefetch import resolve_many
from hubd.server.api import (
    AuditList,
    GcRequest,
    GcResponse,
    Health,
    ImportDone,
    ImportFailed,
    ModelList,
    PrefetchRequest,
    PullRequest,
    ResolveRequest,
    Unpinned,
    VerifyRequest,
    VerifyResponse,
    VerifyResult,
)
from hubd.server.connections import ConnectionLimits
from hubd.server.guards import AdminPolicy, peer_creds, peer_socket
from hubd.server.metrics import CONTENT_TYPE, Metrics

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
ENGINE = web.AppKey("engine", Engine)
ADMIN = web.AppKey("admin", AdminPolicy)
METRICS = web.AppKey("metrics", Metrics)
OPENAPI = web.AppKey("openapi", dict)
CONNECTIONS = web.AppKey("connections", ConnectionLimits)
RUNNING = web.AppKey("running", dict)
"""Shared runs of coalesced work (verify), by key."""
MODEL_ID = re.compile(r"^[0-9a-f]{8,64}$")
log = logging.getLogger("hubd.server")


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


async def parse_body(request: web.Request, model: type[M]) -> M:
    """The body as `model`. Parsed and validated in `PARSING` (4 MB of JSON is seconds of CPU: never on the event
    loop); a validation error names the first few problems and counts the rest, so its answer stays small."""
    raw = await _read_body(request)
    return await run_in(PARSING, _parse_json, raw, model)


def _parse_json(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", "send a JSON object") from None
    except RecursionError:
        raise _too_deep() from None
    try:
        return validate(model, data)
    except ManifestProblems as exc:
        raise BadRequest(f"invalid request body: {exc}", "see /v1/openapi.json for the schema") from None


def _parse_toml(raw: bytes, charset: str) -> Manifest:
    try:
        return parse_manifest(raw.decode(charset, "replace"), "request body")
    except RecursionError:
        raise _too_deep() from None
    except LookupError:
        raise BadRequest(f"unknown charset {charset!r}", "send the manifest as UTF-8") from None


def _too_deep() -> BadRequest:
    return BadRequest("the request body nests too deeply", "no request of API v1 nests more than a few levels")


async def _read_body(request: web.Request) -> bytes:
    """The whole body, within `header_timeout`: a client trickling its body holds no connection for long."""
    timeout = _engine(request).settings.header_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g} s", "send the whole request at once"
        ) from None


def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE]


async def health(request: web.Request) -> web.Response:
    engine = _engine(request)
    return json_response(
        Health(
            status="ok",
            version=__version__,
            cache_dir=str(engine.settings.cache_dir),
            offline=engine.settings.offline,
        )
    )


#: Scheme-less handles the API takes: tfhub.dev/... and kaggle.com/... (handles.py adds https:// to these).
_HUB_HOSTS = frozenset({"tfhub.dev", "www.tfhub.dev", "kaggle.com", "www.kaggle.com"})


def _not_remote() -> BadHandle:
    return BadHandle(
        "the daemon resolves remote handles only: a URL, or a tfhub.dev or kaggle.com handle",
        "pass a local directory to tf.saved_model.load (hubd_client.resolve returns local paths unchanged)",
    )


def _remote_only(handle: str) -> None:
    """Refuse anything that is or may be a local path with one fixed error, decided from the text alone.

    parse_handle would look at the daemon's filesystem (does the directory exist?), and its answer would tell any
    socket user what exists where they cannot look. So every absolute, ./, ../, ~ or file: path, and every name
    without a scheme that is not a tfhub.dev or kaggle.com handle (a relative path, existing or not), gets the
    same status, code and message, and the filesystem is never consulted.
    """
    raw = handle.strip()
    if raw.startswith(("/", "~", ".")) or raw.lower().startswith("file:"):
        raise _not_remote()
    if "://" not in raw and raw.split("/", 1)[0].lower() not in _HUB_HOSTS:
        raise _not_remote()


def _expand_alias(engine: Engine, handle: str, sha256: str | None) -> tuple[str, str | None]:
    """A manifest's name stands for its handle and sha256. Looked up in memory: a name that is no alias stays
    what it was (to `_remote_only`, a relative path) and the filesystem is never consulted."""
    alias = engine.catalog.alias(handle)
    return (alias.handle, sha256 or alias.sha256) if alias is not None else (handle, sha256)


def _uid(request: web.Request) -> int | None:
    return peer_creds(sock)[1] if (sock := peer_socket(request)) else None


async def resolve(request: web.Request) -> web.Response:
    body = await parse_body(request, ResolveRequest)
    handle, sha256 = _expand_alias(_engine(request), body.handle, body.sha256)
    _remote_only(handle)
    entry = await _engine(request).resolve(handle, sha256=sha256, uid=_uid(request), offline=body.offline)
    return json_response(entry)


async def pull(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, PullRequest)
    handle, sha256 = _expand_alias(_engine(request), body.handle, body.sha256)
    _remote_only(handle)  # a bad handle is a plain 400, before the stream starts
    wanted = [ManifestEntry(handle=handle, sha256=sha256, name=None)]
    return await _stream_resolves(request, wanted, summary=False, interactive=True, offline=body.offline)


async def prefetch(request: web.Request) -> web.StreamResponse:
    if request.content_type in ("application/toml", "text/x-toml", "text/plain"):
        raw = await _read_body(request)
        manifest = await run_in(PARSING, _parse_toml, raw, request.charset or "utf-8")
        wanted, given = manifest.model, None
    else:
        body = await parse_body(request, PrefetchRequest)
        wanted, given = body.model, body.source
    for item in wanted:
        _remote_only(item.handle)
    if any(item.pin or item.name for item in wanted):
        # Pins change what eviction may remove, and names what a name resolves to for everyone: admins only.
        request.app[ADMIN].check(request)
    uid = _uid(request)
    source = f"{given or 'a manifest'} (sent by {user_name(uid) or uid})" if uid is not None else given
    source = source or "a manifest sent over TCP"
    _engine(request).claim_aliases(source, [(item.name, item.handle, item.sha256) for item in wanted])
    return await _stream_resolves(request, wanted, summary=True, interactive=False, source=source)


async def _stream_resolves(
    request: web.Request,
    wanted: Iterable[ManifestEntry],
    summary: bool,
    interactive: bool,
    source: str = "a manifest",
    offline: bool = False,
) -> web.StreamResponse:
    """Stream NDJSON events; a client that disconnects stops reading, the fetches go on for everyone else.

    After `stream_heartbeat` seconds of silence a blank line goes out: clients give up on a silent stream, and a
    fetch can be quiet for long (waiting for another process's download, verifying a large model).
    """
    heartbeat = _engine(request).settings.stream_heartbeat
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    connected = True

    async def send(data: bytes) -> None:
        nonlocal connected
        if connected:
            connected = await _write_or_give_up(request, response, data, heartbeat)

    events = aiter(
        resolve_many(
            _engine(request),
            wanted,
            summary=summary,
            uid=_uid(request),
            interactive=interactive,
            source=source,
            offline=offline,
        )
    )
    try:
        while True:
            following = asyncio.ensure_future(anext(events))
            while connected and not (await asyncio.wait({following}, timeout=heartbeat))[0]:
                await send(b"\n")
            if not connected:
                break  # nobody reads: withdraw from the fetches (each stops unless someone else waits for it)
            try:
                event = following.result()
            except StopAsyncIteration:
                break
            await send(event.model_dump_json().encode() + b"\n")
            if not connected:
                break  # nobody reads: withdraw from the fetches (each stops unless someone else waits for it)
    finally:
        if not following.done():
            following.cancel()
    if connected:
        await _write_or_give_up(request, response, None, heartbeat)  # the end (gone after the last event: fine)
    return response


STALLED_WRITES = 12
"""Heartbeats' worth of time (60 s by default) a stream's write may wait for a client that reads nothing; then the
client counts as gone (and its fetches lose a waiter): an unread stream holds no memory or fetch for ever."""


async def _write_or_give_up(
    request: web.Request, response: web.StreamResponse, data: bytes | None, heartbeat: float
) -> bool:
    """Write `data` (None: the end); False when the client is gone: it hung up, or took nothing for
    STALLED_WRITES heartbeats (then the connection is aborted)."""
    try:
        async with asyncio.timeout(STALLED_WRITES * heartbeat):
            await (response.write(data) if data is not None else response.write_eof())
        return True
    except TimeoutError:
        log.info(
            "%s %s: the client read nothing for %g s: closed",
            request.method,
            request.path,
            STALLED_WRITES * heartbeat,
        )
        if request.transport is not None:
            request.transport.abort()
        return False
    except (ConnectionError, RuntimeError):  # the client went away: a normal end, not a server error
        return False


PAGE = 1000
"""Models (or users, in status) per page when the query gives no `limit`."""
MAX_PAGE = 10_000
MODELS_CURSOR = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME = 2048
"""The longest handle, alias or id `GET /v1/models?name=` looks up (the same bound as a prefetch's handles)."""
USERS_CURSOR = re.compile(r"^[0-9]{1,9}$")


def _page(request: web.Request, cursor_form: re.Pattern[str]) -> tuple[int, str | None]:
    """`limit` and `cursor` of a paginated GET: a page size of 1 to MAX_PAGE, and a cursor from a previous page."""
    try:
        limit = int(request.query.get("limit", PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_PAGE}", f"e.g. ?limit={PAGE}")
    cursor = request.query.get("cursor") or None
    if cursor is not None and not cursor_form.match(cursor):
        raise BadRequest("not a cursor of this listing", "pass the `next_cursor` of the previous page as it came")
    return limit, cursor


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models?limit=&cursor=: a page of models in id order and the cursor of the next page. A page costs
    an index look-up per model on it, whatever the cache's size; off the event loop all the same.
    GET /v1/models?name=: only the model a handle, alias or id names (none when nothing cached does), found by
    one look-up: `hubd rm HANDLE` used to page through every model to find it."""
    engine = _engine(request)
    name = request.query.get("name")
    if name is not None:
        if not 1 <= len(name) <= MAX_NAME:
            raise BadRequest(f"name must be 1 to {MAX_NAME} characters", "give a handle, an alias or a model id")
        if not MODEL_ID.match(name) and engine.catalog.alias(name) is None:
            _remote_only(name)  # decided from the text: the daemon's filesystem is never consulted for a caller
        return json_response(ModelList(models=await asyncio.to_thread(_named, engine, name)))
    limit, cursor = _page(request, MODELS_CURSOR)
    models, following = await asyncio.to_thread(engine.list_page, limit, cursor)
    return json_response(ModelList(models=models, next_cursor=following))


def _named(engine: Engine, name: str) -> list[Entry]:
    try:
        return [engine.entry_for(engine.find(name))]
    except UnknownModel:
        return []


def _model_id(request: web.Request) -> str:
    return request.match_info["id"]  # checked against MODEL_ID's pattern before the handler runs


async def get_model(request: web.Request) -> web.Response:
    engine = _engine(request)
    model_id = _model_id(request)
    # A large model's meta is megabytes of JSON (17 MB for 150,000 files: 0.6 s to parse): off the event loop.
    return json_response(await asyncio.to_thread(lambda: engine.entry_for(engine.find(model_id))))


async def delete_model(request: web.Request) -> web.Response:
    model_id = _model_id(request)
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    return json_response(
        await run_in(WAITS, _remove_exclusively, _engine(request), model_id, _uid(request), force)
    )


def _remove_exclusively(engine: Engine, model_id: str, uid: int | None, force: bool) -> Entry:
    """Remove a model under the gc lock, so never in the middle of a publish or a collection (in a thread: the
    wait, and deleting a large tree, take long). A pinned model only with `force` (?force=1)."""
    with gc_lock(engine.store, shared=False):
        return engine.remove(model_id, uid=uid, force=force)


async def unpin(request: web.Request) -> web.Response:
    """Let eviction remove a pinned model again (admins; recorded in the audit trail)."""
    model_id = _model_id(request)
    engine = _engine(request)
    digest = (await asyncio.to_thread(engine.find, model_id)).digest
    names = await asyncio.to_thread(engine.unpin, digest, _uid(request))
    return json_response(Unpinned(id=digest, unpinned=names))


async def gc(request: web.Request) -> web.Response:
    body = await parse_body(request, GcRequest)
    report = await _engine(request).gc(dry_run=body.dry_run, max_size=body.max_size)
    return json_response(GcResponse(**report.__dict__))


async def status(request: web.Request) -> web.Response:
    """GET /v1/status?limit=&cursor=: the cache's figures, with a page of its per-user usage."""
    limit, cursor = _page(request, USERS_CURSOR)
    return json_response(await cache_status(_engine(request), limit, int(cursor) if cursor else 0))


async def verify(request: web.Request) -> web.Response:
    body = await parse_body(request, VerifyRequest)
    if (
        body.handle is not None
        and not MODEL_ID.match(body.handle)
        and _engine(request).catalog.alias(body.handle) is None
    ):
        _remote_only(body.handle)
    if body.handle is None:
        request.app[ADMIN].check(request)  # re-hashing every model is heavy: anyone may check one, admins all
    engine = _engine(request)
    # Concurrent verifies of one model (or of all) share one run: asking twelve times costs one re-hash.
    target = (await asyncio.to_thread(engine.find, body.handle)).digest if body.handle is not None else None
    metrics = request.app[METRICS]

    def start() -> Awaitable[list[VerifyReport]]:
        metrics.verify_runs.inc()
        return engine.verify(body.handle, body.heal)

    reports = await _shared(request.app, ("verify", target, body.heal), start)
    results = [
        VerifyResult(id=r.entry.id, handles=r.entry.handles, problems=r.problems, healed=r.healed) for r in reports
    ]
    return json_response(VerifyResponse(results=results))


async def audit(request: web.Request) -> web.Response:
    """The audit trail, oldest first, for admins: ?since=&until= (epoch seconds or ISO 8601), ?uid= (a number or
    an account name), ?action=, ?limit= (the most recent N, default 10000)."""
    query = request.query
    action = query.get("action") or None
    if action is not None and action not in ACTIONS:
        raise BadRequest(f"unknown audit action {action!r}", f"one of: {', '.join(ACTIONS)}")
    try:
        limit = int(query.get("limit", "10000"))
    except ValueError:
        raise BadRequest("limit must be a whole number", "e.g. ?limit=100") from None

    def read() -> AuditList:
        records = list(
            _engine(request).audit.read(
                since=parse_time(query["since"]) if query.get("since") else None,
                until=parse_time(query["until"]) if query.get("until") else None,
                uid=uid_of(query["uid"]) if query.get("uid") else None,
                action=action,
            )
        )
        return AuditList(records=records[-limit:] if limit > 0 else [])

    return json_response(await asyncio.to_thread(read))


async def export_bundle(request: web.Request) -> web.StreamResponse:
    """GET /v1/export?handle=H[&handle=H2...][&sha256=S...]: a bundle (hubd/bundle.py) of those models, streamed.
    Anyone may export what they could resolve; each handle is resolved first (fetched if need be), so a bad one
    is a plain error before the first byte. A model failing its re-hash mid-stream breaks the connection off."""
    engine = _engine(request)
    handles, pins = request.query.getall("handle", []), request.query.getall("sha256", [])
    if not handles or (pins and len(pins) != len(handles)):
        raise BadRequest("name the models to export", "?handle=H (repeatable); ?sha256=S once per handle, or none")
    digests = []
    for handle, pin in zip(handles, pins or [""] * len(handles), strict=True):
        if MODEL_ID.match(handle):
            digests.append((await asyncio.to_thread(engine.find, handle)).digest)
            continue
        handle, sha256 = _expand_alias(engine, handle, pin or None)
        _remote_only(handle)
        digests.append((await engine.resolve(handle, sha256=sha256, uid=_uid(request))).id)
    header = await asyncio.to_thread(bundle.plan_export, engine, digests)
    who = _uid(request)
    exporting = request.app[EXPORTING]
    key = who if who is not None else request.remote
    if exporting.get(key, 0) >= EXPORTS_PER_USER:
        raise TooManyExports(
            f"{EXPORTS_PER_USER} exports of yours are already running",
            "wait for one to end (or read the ones you started), then try again",
        )
    exporting[key] = exporting.get(key, 0) + 1
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        await response.prepare(request)
        heartbeat = engine.settings.stream_heartbeat

        async def send(data: bytes) -> None:  # on the loop: a client that reads nothing is cut off there
            if not await _write_or_give_up(request, response, data, heartbeat):
                raise ConnectionResetError("the client is gone: it read nothing, or hung up")

        # The thread's own limit is a backstop, longer than the loop's: it never cancels a write itself.
        writer = bundle.LoopWriter(send, asyncio.get_running_loop(), STALLED_WRITES * heartbeat + 10)
        out = io.BufferedWriter(writer, 1 << 20)
        try:
            await run_in(EXPORTS, _write_bundle, engine, header, out)
        except (HubdError, OSError, ConnectionError, RuntimeError) as exc:
            log.warning("export of %s broken off: %s", ", ".join(handles), exc)
            if request.transport is not None:
                request.transport.abort()  # the client sees an incomplete body, never a truncated bundle as whole
            return response
        await _write_or_give_up(request, response, None, engine.settings.stream_heartbeat)
        return response
    finally:
        exporting[key] -= 1
        if not exporting[key]:
            del exporting[key]


EXPORTS_PER_USER = 2
"""Exports one uid (or one TCP peer) may have running at once; more get 429. With the pool's 8 threads, one user's
unread exports hold 2 for at most STALLED_WRITES heartbeats (60 s), never the threads everyone else needs."""
EXPORTING = web.AppKey("exporting", dict)
"""Running exports, by uid (or TCP peer address)."""


def _write_bundle(engine: Engine, header: bundle.BundleHeader, out: io.BufferedWriter) -> None:
    bundle.write_bundle(engine, header, out)
    out.flush()


async def import_bundle(request: web.Request) -> web.StreamResponse:
    """POST /v1/import, the body a bundle: admins only (it adds models every user loads). The daemon never reads
    a path for a caller; the bytes come in the body. NDJSON: one "entry" event per model as it is imported or
    refused, then "done" (or "error" when the bundle itself cannot be read)."""
    engine = _engine(request)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[bundle.ImportResult | None] = asyncio.Queue()
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    reader = io.BufferedReader(bundle.LoopReader(request.content.readany, loop), 1 << 20)

    def on_entry(result: bundle.ImportResult) -> None:
        loop.call_soon_threadsafe(events.put_nowait, result)

    work = asyncio.ensure_future(run_in(WAITS, bundle.import_bundle, engine, reader, _uid(request), on_entry))
    work.add_done_callback(lambda _f: events.put_nowait(None))
    connected = True

    async def send(data: bytes) -> None:
        nonlocal connected
        if connected:
            connected = await _write_or_give_up(request, response, data, engine.settings.stream_heartbeat)

    while True:
        try:
            event = await asyncio.wait_for(events.get(), engine.settings.stream_heartbeat)
        except TimeoutError:
            await send(b"\n")
            continue
        if event is None:
            break
        await send(event.model_dump_json().encode() + b"\n")
    try:
        results = work.result()
        done = ImportDone(
            event="done", imported=sum(r.ok for r in results), refused=sum(not r.ok for r in results)
        )
        await send(done.model_dump_json().encode() + b"\n")
    except HubdError as exc:
        failed = ImportFailed(event="error", error=ErrorDetail(**exc.as_dict()))
        await send(failed.model_dump_json().encode() + b"\n")
    if connected:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
    return response


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[METRICS].render)  # lists the cache: off the event loop
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def _shared(app: web.Application, key: Hashable, start: Callable[[], Awaitable[T]]) -> T:
    """The result of `start()`, run once for every caller that asks with the same `key` while it runs."""
    running = app[RUNNING]
    task = running.get(key)
    if task is None:
        task = asyncio.ensure_future(start())
        running[key] = task
        task.add_done_callback(lambda _t: running.pop(key, None))
    return cast(T, await asyncio.shield(task))  # a caller that goes away does not cancel the others' run


def add_state(app: web.Application) -> None:
    """What the handlers keep between requests: shared verify runs, and running exports per user."""
    app[RUNNING] = {}
    app[EXPORTING] = {}
