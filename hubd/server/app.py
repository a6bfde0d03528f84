"""The application factory: routes, the error and guard middlewares, and the OpenAPI document."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hubd import __version__
from hubd.engine import Engine
from hubd.entry import Entry
from hubd.errors import HubdError
from hubd.events import ErrorDetail
from hubd.server import api
from hubd.server.guards import AdminPolicy, Handler, browser_guard
from hubd.server.metrics import Metrics
from hubd.server.routes import ADMIN, CONNECTIONS, ENGINE, METRICS, OPENAPI, add_routes

log = logging.getLogger("hubd.server")
MAX_BODY = 4 * 2**20


def _error(
    status: int, code: str, message: str, hint: str = "", headers: dict[str, str] | None = None
) -> web.Response:
    body = api.ErrorBody(error=ErrorDetail(code=code, message=message, hint=hint))
    return web.Response(
        text=body.model_dump_json(), status=status, content_type="application/json", headers=headers
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as `{"error": {code, message, hint}}` with its status; nothing leaks as a 500 page."""
    try:
        return await handler(request)
    except HubdError as exc:
        return _error(exc.http_status, exc.code, exc.message, exc.hint)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        hint = "see /v1/openapi.json" if exc.status in (404, 405) else ""
        if exc.status == 413:
            hint = f"request bodies are limited to {MAX_BODY} bytes"
        keep = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}  # RFC 9110: 405 names the methods
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason, hint, keep)
    except ConnectionResetError:  # the client hung up mid-answer: nothing to send, nothing wrong here
        log.debug("client went away during %s %s", request.method, request.path)
        return web.Response(status=499, reason="Client Closed Request")
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error(500, "internal", "hubd hit an unexpected error", "see the daemon's log; please report it")


def metrics_middleware(metrics: Metrics) -> Any:
    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        route = request.match_info.route.resource  # the template (/v1/models/{id}), never the raw path
        metrics.observe_request(
            request.method, route.canonical if route is not None else "unmatched", response.status
        )
        return response

    return count


def create_app(engine: Engine, admin: AdminPolicy) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    metrics = Metrics(engine, lambda: app.get(CONNECTIONS))
    app.middlewares.extend([metrics_middleware(metrics), errors_as_json, browser_guard])
    app[ENGINE] = engine
    app[ADMIN] = admin
    app[METRICS] = metrics
    app[OPENAPI] = openapi_document()
    add_routes(app)
    return app


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for API v1, built from the same pydantic models the handlers validate with."""
    models: list[type[BaseModel]] = [
        api.ResolveRequest,
        api.PullRequest,
        api.VerifyRequest,
        api.PrefetchRequest,
        api.ErrorBody,
        api.Health,
        api.ModelList,
        api.VerifyResponse,
        api.GcRequest,
        api.GcResponse,
        api.Status,
        api.AuditList,
        api.Unpinned,
        Entry,
    ]
    _, schema = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    components = schema.get("$defs", {})

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def responses(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
        out: dict[str, Any] = {"200": ok}
        for status in (400, 403, 404, 408, 409, 413, 415, 422, 502, 503, 507, *errors):
            out[str(status)] = {
                "description": "error",
                "content": {"application/json": {"schema": ref("ErrorBody")}},
            }
        return out

    def body(name: str, required: bool = True) -> dict[str, Any]:
        return {"required": required, "content": {"application/json": {"schema": ref(name)}}}

    def json_ok(name: str) -> dict[str, Any]:
        return {"description": "ok", "content": {"application/json": {"schema": ref(name)}}}

    ndjson_ok = {"description": "NDJSON progress events", "content": {"application/x-ndjson": {"schema": {}}}}
    model_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{8,64}$"},
    }
    paths: dict[str, Any] = {
        "/v1/health": {"get": {"operationId": "health", "responses": responses(json_ok("Health"))}},
        "/v1/resolve": {
            "post": {
                "operationId": "resolve",
                "requestBody": body("ResolveRequest"),
                "responses": responses(json_ok("Entry")),
            }
        },
        "/v1/pull": {
            "post": {"operationId": "pull", "requestBody": body("PullRequest"), "responses": responses(ndjson_ok)}
        },
        "/v1/models": {"get": {"operationId": "listModels", "responses": responses(json_ok("ModelList"))}},
        "/v1/models/{id}": {
            "get": {"operationId": "getModel", "parameters": [model_id], "responses": responses(json_ok("Entry"))},
            "delete": {
                "operationId": "deleteModel",
                "parameters": [model_id],
                "responses": responses(json_ok("Entry")),
            },
        },
        "/v1/models/{id}/pin": {
            "delete": {
                "operationId": "unpinModel",
                "parameters": [model_id],
                "responses": responses(json_ok("Unpinned")),
            }
        },
        "/v1/verify": {
            "post": {
                "operationId": "verify",
                "requestBody": body("VerifyRequest", required=False),
                "responses": responses(json_ok("VerifyResponse")),
            }
        },
        "/v1/prefetch": {
            "post": {
                "operationId": "prefetch",
                "requestBody": body("PrefetchRequest"),
                "responses": responses(ndjson_ok),
            }
        },
        "/v1/gc": {
            "post": {
                "operationId": "gc",
                "requestBody": body("GcRequest", required=False),
                "responses": responses(json_ok("GcResponse")),
            }
        },
        "/v1/status": {"get": {"operationId": "status", "responses": responses(json_ok("Status"))}},
        "/v1/audit": {
            "get": {
                "operationId": "audit",
                "parameters": [
                    {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                    for name in ("since", "until", "uid", "action", "limit")
                ],
                "responses": responses(json_ok("AuditList")),
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hubd",
            "version": __version__,
            "description": "Local API of the hubd model cache daemon.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
