"""Events streamed as NDJSON by `POST /v1/pull` and `POST /v1/prefetch`, and rendered by the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from hubd.entry import Entry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Strict):
    code: str
    message: str
    hint: str


class ProgressEvent(_Strict):
    event: Literal["progress"]
    handle: str
    phase: str
    done: int
    total: int | None


class DoneEvent(_Strict):
    event: Literal["done"]
    handle: str
    entry: Entry


class ErrorEvent(_Strict):
    event: Literal["error"]
    handle: str
    error: ErrorDetail


class SummaryEvent(_Strict):
    event: Literal["summary"]
    ok: int
    failed: int
    failures: list[ErrorEvent]
