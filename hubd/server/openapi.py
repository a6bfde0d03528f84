"""The OpenAPI 3.1 document of API v1, derived from the route table and the pydantic models the handlers use."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hubd import __version__
from hubd.server.api import ErrorBody
from hubd.server.routing import Answer, Body, Param, Route

ANY_ROUTE = (400, 403, 404, 408, 409, 413, 415, 422, 502, 503, 507)
"""Error statuses any route may answer: the guards (400 bad_host, 403 cross-origin), body limits and timeouts, and
the engine's errors, which reach most routes through a resolve or a look-up."""

ADMIN_TOKEN = "adminToken"
SECURITY_SCHEMES = {
    ADMIN_TOKEN: {
        "type": "http",
        "scheme": "bearer",
        "description": "Admin operations over TCP need `Authorization: Bearer <token>`, the token read from the "
        "daemon's token_file. Over the Unix socket no token is sent: the kernel says who connects, and root, the "
        "daemon's own user and members of admin_group are admins.",
    }
}
ERROR = {
    "description": 'What went wrong, why, and what to do: `{"error": {code, message, hint}}`. A request line '
    "or header over 8 KiB (a long export query) is refused in plain text by the HTTP parser, before hubd runs.",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}},
        "text/plain": {"schema": {"type": "string"}},
    },
}
NDJSON_LINES = "One JSON object per line, each one of the schemas in `oneOf`; a blank line is a keep-alive."


def openapi_document(routes: Iterable[Route]) -> dict[str, Any]:
    """The whole document: a path item per route path, with the models the routes name as components."""
    table = list(routes)
    components = _schemas(table)
    paths: dict[str, dict[str, Any]] = {}
    for route in table:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hubd",
            "version": __version__,
            "description": "Local API of the hubd model cache daemon.",
        },
        "paths": paths,
        "components": {"schemas": components, "responses": {"Error": ERROR}, "securitySchemes": SECURITY_SCHEMES},
    }


def _schemas(routes: list[Route]) -> dict[str, Any]:
    models: dict[type[BaseModel], None] = {ErrorBody: None}  # ordered and unique
    for route in routes:
        if route.body is not None and route.body.model is not None:
            models[route.body.model] = None
        models.update(dict.fromkeys(route.answer.models))
    _, schema = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return dict(schema.get("$defs", {}))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary}
    description = _who(route)
    if description:
        operation["description"] = description
    if route.params:
        operation["parameters"] = [_parameter(param) for param in route.params]
    if route.body is not None:
        operation["requestBody"] = _request_body(route.body)
    operation["responses"] = _responses(route)
    if route.admin:
        operation["security"] = [{ADMIN_TOKEN: []}]
    elif route.admin_when:
        operation["security"] = [{}, {ADMIN_TOKEN: []}]
    return operation


def _who(route: Route) -> str:
    if route.admin:
        return "Admins only."
    if route.admin_when:
        return f"Admins only {route.admin_when}."
    return ""


def _parameter(param: Param) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": param.where,
        "required": param.required or param.where == "path",
        "description": param.description,
        "schema": param.schema,
    }


def _request_body(body: Body) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if body.model is not None:
        content["application/json"] = {"schema": _ref(body.model)}
    for media_type, schema in body.raw:
        content[media_type] = {"schema": schema}
    return {"required": body.required, "content": content}


def _responses(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": route.answer.description, "content": _content(route.answer)}}
    for status in sorted({*ANY_ROUTE, *route.errors}):
        out[str(status)] = {"$ref": "#/components/responses/Error"}
    return out


def _content(answer: Answer) -> dict[str, Any]:
    if answer.schema is not None:
        schema = answer.schema
    elif answer.media_type == "application/x-ndjson":
        schema = {"description": NDJSON_LINES, "oneOf": [_ref(model) for model in answer.models]}
    else:
        (model,) = answer.models
        schema = _ref(model)
    return {answer.media_type: {"schema": schema}}
