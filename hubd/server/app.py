"""The application factory: the route table registered, the error and guard middlewares, the OpenAPI document."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from hubd.engine import Engine
from hubd.errors import HubdError
from hubd.events import ErrorDetail
from hubd.server import api
from hubd.server.guards import AdminPolicy, Handler, browser_guard
from hubd.server.metrics import Metrics
from hubd.server.openapi import openapi_document
from hubd.server.routes import ADMIN, CONNECTIONS, ENGINE, METRICS, OPENAPI, add_state
from hubd.server.routes_table import ROUTES
from hubd.server.routing import add_routes

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
    app[OPENAPI] = openapi_document(ROUTES)
    add_state(app)
    add_routes(app, ROUTES, admin)
    return app
