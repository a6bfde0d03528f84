"""API v1, one row per route: the aiohttp routes (routing.add_routes) and the OpenAPI document (openapi.py) both
come from `ROUTES`, so adding a route is one row here plus its handler in routes.py and its models in api.py."""

from __future__ import annotations

from typing import Any

from hubd.actions import ACTIONS
from hubd.bundle import ImportResult
from hubd.entry import Entry
from hubd.events import DoneEvent, ErrorEvent, ProgressEvent, SummaryEvent
from hubd.server import api, routes
from hubd.server.routing import Body, Param, Route, json_answer, ndjson_answer, raw_answer

BINARY: dict[str, Any] = {"type": "string", "format": "binary"}

MODEL_ID = Param(
    "id",
    "path",
    "model id",
    {"type": "string", "pattern": routes.MODEL_ID.pattern},
    hint="ids are the hex digests shown by GET /v1/models",
)


def _limit(what: str) -> Param:
    return Param(
        "limit",
        "query",
        f"{what} per page, 1 to {routes.MAX_PAGE} (default {routes.PAGE})",
        {"type": "integer", "minimum": 1, "maximum": routes.MAX_PAGE},
    )


def _cursor(pattern: str) -> Param:
    return Param(
        "cursor", "query", "the `next_cursor` of the previous page", {"type": "string", "pattern": pattern}
    )


STREAM = "NDJSON progress events, one per line"
TOML_MANIFEST: dict[str, Any] = {"type": "string", "description": "A manifest file, as `hubd prefetch FILE` reads"}
HANDLES: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 2048},
    "minItems": 1,
}
DIGESTS: dict[str, Any] = {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/health",
        routes.health,
        operation_id="health",
        summary="Whether the daemon answers, its version and cache",
        answer=json_answer(api.Health),
    ),
    Route(
        "POST",
        "/v1/resolve",
        routes.resolve,
        operation_id="resolve",
        summary="Resolve a handle to a verified local model",
        body=Body(api.ResolveRequest),
        answer=json_answer(Entry),
    ),
    Route(
        "POST",
        "/v1/pull",
        routes.pull,
        operation_id="pull",
        summary="Resolve a handle, streaming its progress",
        body=Body(api.PullRequest),
        answer=ndjson_answer(ProgressEvent, DoneEvent, ErrorEvent, description=STREAM),
    ),
    Route(
        "GET",
        "/v1/models",
        routes.list_models,
        operation_id="listModels",
        summary="A page of the cached models, in id order, or the one a name names",
        params=(
            _limit("models"),
            _cursor(routes.MODELS_CURSOR.pattern),
            Param(
                "name",
                "query",
                "only the model this handle, alias or id names (none when nothing cached does); no paging",
                {"type": "string", "minLength": 1, "maxLength": routes.MAX_NAME},
            ),
        ),
        answer=json_answer(api.ModelList),
    ),
    Route(
        "GET",
        "/v1/models/{id}",
        routes.get_model,
        operation_id="getModel",
        summary="One cached model",
        params=(MODEL_ID,),
        answer=json_answer(Entry),
    ),
    Route(
        "DELETE",
        "/v1/models/{id}",
        routes.delete_model,
        operation_id="deleteModel",
        summary="Remove a model from the cache",
        params=(MODEL_ID, Param("force", "query", "remove it even when a manifest pins it", {"type": "boolean"})),
        answer=json_answer(Entry),
        admin=True,
    ),
    Route(
        "DELETE",
        "/v1/models/{id}/pin",
        routes.unpin,
        operation_id="unpinModel",
        summary="Let eviction remove a pinned model again",
        params=(MODEL_ID,),
        answer=json_answer(api.Unpinned),
        admin=True,
    ),
    Route(
        "POST",
        "/v1/verify",
        routes.verify,
        operation_id="verify",
        summary="Re-check a model (or every model) against its digests; heal what fails",
        body=Body(api.VerifyRequest, required=False),
        answer=json_answer(api.VerifyResponse),
        admin_when="when no handle is given (re-hashing every model is heavy)",
    ),
    Route(
        "POST",
        "/v1/prefetch",
        routes.prefetch,
        operation_id="prefetch",
        summary="Fetch a manifest's models, streaming progress and a summary",
        body=Body(api.PrefetchRequest, raw=(("application/toml", TOML_MANIFEST),)),
        answer=ndjson_answer(ProgressEvent, DoneEvent, ErrorEvent, SummaryEvent, description=STREAM),
        admin_when="when an entry pins a model or names it (`pin`, `name`)",
    ),
    Route(
        "POST",
        "/v1/gc",
        routes.gc,
        operation_id="gc",
        summary="Evict unpinned models down to the quota",
        body=Body(api.GcRequest, required=False),
        answer=json_answer(api.GcResponse),
        admin=True,
    ),
    Route(
        "GET",
        "/v1/status",
        routes.status,
        operation_id="status",
        summary="The cache's figures and a page of its usage per user",
        params=(_limit("users"), _cursor(routes.USERS_CURSOR.pattern)),
        answer=json_answer(api.Status),
    ),
    Route(
        "GET",
        "/v1/audit",
        routes.audit,
        operation_id="audit",
        summary="The audit trail, oldest first",
        params=(
            Param("since", "query", "records from this time on (epoch seconds or ISO 8601)"),
            Param("until", "query", "records up to this time (epoch seconds or ISO 8601)"),
            Param("uid", "query", "records of this user (a uid or an account name)"),
            Param("action", "query", f"records of this action: {', '.join(ACTIONS)}"),
            Param("limit", "query", "the most recent N records (default 10000)"),
        ),
        answer=json_answer(api.AuditList),
        admin=True,
    ),
    Route(
        "GET",
        "/v1/export",
        routes.export_bundle,
        operation_id="exportBundle",
        summary="A bundle of models, streamed (docs/bundles.md)",
        params=(
            Param(
                "handle", "query", "a model to export (a handle, name or id); repeatable", HANDLES, required=True
            ),
            Param("sha256", "query", "the expected archive sha256, once per handle (or never)", DIGESTS),
        ),
        answer=raw_answer("application/x-tar", BINARY, "the bundle"),
        errors=(429,),
    ),
    Route(
        "POST",
        "/v1/import",
        routes.import_bundle,
        operation_id="importBundle",
        summary="Import a bundle's models, streaming each one's outcome",
        body=Body(raw=(("application/x-tar", BINARY), ("application/octet-stream", BINARY))),
        answer=ndjson_answer(
            ImportResult, api.ImportDone, api.ImportFailed, description="NDJSON, one line per model"
        ),
        admin=True,
    ),
    Route(
        "GET",
        "/metrics",
        routes.metrics,
        operation_id="metrics",
        summary="Prometheus metrics",
        answer=raw_answer("text/plain", {"type": "string"}, "Prometheus text format"),
    ),
    Route(
        "GET",
        "/v1/openapi.json",
        routes.openapi,
        operation_id="openapi",
        summary="This document",
        answer=raw_answer("application/json", {"type": "object"}, "OpenAPI 3.1"),
    ),
)
