"""The shape of the API's route table: each route declared once, with everything the server and its document need.

A `Route` names its method, path, handler, the body it reads, the answer it gives, its parameters and who may
call it. `add_routes` registers a table with aiohttp and applies what the table says about path parameters and
admins; server/openapi.py derives the OpenAPI document from the same table. So a new route is one row plus its
handler and models, and the document cannot drift from what the server does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from hubd.errors import BadRequest
from hubd.server.guards import AdminPolicy, Handler


@dataclass(frozen=True)
class Param:
    """A path or query parameter. A path parameter's `pattern` is checked before the handler (and before the admin
    check: a malformed id is a 400 for anyone); query parameters are checked by their handler."""

    name: str
    where: Literal["path", "query"]
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False
    hint: str = ""
    """For a path parameter: what to do when the value does not match its pattern."""


@dataclass(frozen=True)
class Body:
    """What a route reads: a JSON model, and other media types it takes as they are (a TOML manifest, a bundle)."""

    model: type[BaseModel] | None = None
    required: bool = True
    raw: tuple[tuple[str, dict[str, Any]], ...] = ()
    """(media type, schema) of each non-JSON form of the body."""


@dataclass(frozen=True)
class Answer:
    """What a route answers with on success: one JSON model, NDJSON lines (each one of `models`), or raw bytes."""

    media_type: str
    description: str
    models: tuple[type[BaseModel], ...] = ()
    schema: dict[str, Any] | None = None
    """The schema of a raw answer (text, a tar stream); None for a JSON or NDJSON one, whose models say it."""


def json_answer(model: type[BaseModel], description: str = "ok") -> Answer:
    return Answer("application/json", description, (model,))


def ndjson_answer(*events: type[BaseModel], description: str) -> Answer:
    return Answer("application/x-ndjson", description, events)


def raw_answer(media_type: str, schema: dict[str, Any], description: str) -> Answer:
    return Answer(media_type, description, schema=schema)


@dataclass(frozen=True)
class Route:
    method: Literal["GET", "POST", "DELETE"]
    path: str
    handler: Handler
    operation_id: str
    summary: str
    answer: Answer
    body: Body | None = None
    params: tuple[Param, ...] = ()
    admin: bool = False
    """Admins only, checked before the handler runs (403 otherwise)."""
    admin_when: str = ""
    """Admins only in the case this names: the handler checks, since it depends on the request's body."""
    errors: tuple[int, ...] = ()
    """Error statuses this route answers besides the ones every route may (openapi.ANY_ROUTE)."""

    @property
    def path_params(self) -> tuple[Param, ...]:
        return tuple(param for param in self.params if param.where == "path")


def add_routes(app: web.Application, routes: Iterable[Route], admin: AdminPolicy) -> None:
    """Register each route with aiohttp (a GET answers HEAD too, as aiohttp's add_get does)."""
    for route in routes:
        endpoint = _endpoint(route, admin)
        if route.method == "GET":
            app.router.add_get(route.path, endpoint)
        else:
            app.router.add_route(route.method, route.path, endpoint)


def _endpoint(route: Route, admin: AdminPolicy) -> Handler:
    """The handler behind the table's checks: path parameters against their patterns, then the admin policy."""
    patterns = [
        (param, re.compile(param.schema["pattern"])) for param in route.path_params if "pattern" in param.schema
    ]
    if not patterns and not route.admin:
        return route.handler

    async def endpoint(request: web.Request) -> web.StreamResponse:
        for param, pattern in patterns:
            value = request.match_info[param.name]
            if not pattern.match(value):
                raise BadRequest(f"not a {param.description}: {value!r}", param.hint)
        if route.admin:
            admin.check(request)
        return await route.handler(request)

    return endpoint
