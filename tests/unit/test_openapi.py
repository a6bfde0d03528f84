"""The OpenAPI document is a valid OpenAPI 3.1 document, and it describes exactly the routes the app serves: both
come from one table (hubd/server/routes_table.py), and this keeps them one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from hubd.config import Settings
from hubd.engine import Engine
from hubd.errors import BY_CODE, REGISTRY, HubdError, error_class
from hubd.server.app import create_app
from hubd.server.guards import AdminPolicy
from hubd.server.openapi import ADMIN_TOKEN, openapi_document
from hubd.server.routes import OPENAPI
from hubd.server.routes_table import ROUTES

STREAMING = {("POST", "/v1/pull"), ("POST", "/v1/prefetch"), ("POST", "/v1/import")}
ADMIN_ONLY = {
    ("DELETE", "/v1/models/{id}"),
    ("DELETE", "/v1/models/{id}/pin"),
    ("POST", "/v1/gc"),
    ("GET", "/v1/audit"),
    ("POST", "/v1/import"),
}


@pytest.fixture
def app(tmp_path: Path) -> web.Application:
    return create_app(Engine(Settings(cache_dir=tmp_path / "cache")), AdminPolicy(None, None))


@pytest.fixture
def document(app: web.Application) -> dict[str, Any]:
    return app[OPENAPI]


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"


def test_every_served_route_is_documented_and_every_documented_one_served(
    app: web.Application, document: dict[str, Any]
) -> None:
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"  # aiohttp answers HEAD for every GET
    }
    assert served == set(operations(document))


def test_the_served_document_is_the_one_derived_from_the_table(document: dict[str, Any]) -> None:
    assert document == openapi_document(ROUTES)


def test_every_operation_has_an_id_a_summary_and_documented_errors(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for operation in operations(document).values()]
    assert len(ids) == len(set(ids))
    for key, operation in operations(document).items():
        assert operation["summary"], key
        assert {"200", "400", "403"} <= operation["responses"].keys(), key


def test_admin_operations_name_the_bearer_scheme_for_tcp(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"][ADMIN_TOKEN]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    required = {key for key, op in operations(document).items() if op.get("security") == [{ADMIN_TOKEN: []}]}
    assert required == ADMIN_ONLY
    sometimes = {key for key, op in operations(document).items() if op.get("security") == [{}, {ADMIN_TOKEN: []}]}
    assert sometimes == {("POST", "/v1/verify"), ("POST", "/v1/prefetch")}


def test_streaming_operations_describe_their_ndjson_events(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for key in STREAMING:
        content = operations(document)[key]["responses"]["200"]["content"]
        lines = content["application/x-ndjson"]["schema"]["oneOf"]
        names = {line["$ref"].rsplit("/", 1)[1] for line in lines}
        assert names <= schemas.keys(), key
        events = {schemas[name]["properties"]["event"].get("const") for name in names}
        assert {"done", "error"} <= events, key


def test_prefetch_takes_a_toml_manifest_as_well_as_json(document: dict[str, Any]) -> None:
    content = operations(document)[("POST", "/v1/prefetch")]["requestBody"]["content"]
    assert content.keys() == {"application/json", "application/toml"}


def test_export_and_import_are_documented(document: dict[str, Any]) -> None:
    export = operations(document)[("GET", "/v1/export")]
    assert "application/x-tar" in export["responses"]["200"]["content"]
    assert "429" in export["responses"]
    assert "application/x-tar" in operations(document)[("POST", "/v1/import")]["requestBody"]["content"]


def test_paginated_listings_document_limit_and_cursor(document: dict[str, Any]) -> None:
    for key in (("GET", "/v1/models"), ("GET", "/v1/status")):
        params = {param["name"]: param for param in operations(document)[key]["parameters"]}
        assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 10_000}
        assert "pattern" in params["cursor"]["schema"]


def test_each_error_code_names_one_class_and_an_unknown_code_the_base() -> None:
    codes = [cls.code for cls in REGISTRY]
    assert len(codes) == len(set(codes)), "two error classes share a code"
    assert all(issubclass(cls, HubdError) and 400 <= cls.http_status < 600 for cls in REGISTRY)
    assert error_class("ref_conflict") is BY_CODE["ref_conflict"]
    assert error_class("no_such_code") is HubdError
