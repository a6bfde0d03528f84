"""An older CLI keeps working with a newer daemon: answers are read ignoring fields this hubd does not know.

The daemon's own models forbid unknown fields (requests stay exact and its OpenAPI document says
additionalProperties: false), so reading an answer with them as they are would refuse anything a later daemon
adds, nested or not."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any, cast

import pydantic
import pytest

from hubd.api_client import DaemonClient
from hubd.backends import DaemonBackend, _answer
from hubd.errors import UnknownModel
from hubd.server.api import VerifyResponse


def test_unknown_fields_at_any_depth_are_ignored() -> None:
    answer = {"results": [{"id": "ab", "handles": [], "problems": [], "healed": False, "later": 1}], "also": 2}
    result = _answer(VerifyResponse, answer)
    assert result.results[0].id == "ab"
    assert not hasattr(result.results[0], "later")


def test_a_missing_field_is_still_an_error() -> None:
    with pytest.raises(pydantic.ValidationError):
        _answer(VerifyResponse, {"results": [{"id": "ab"}]})


def test_the_daemon_side_model_still_forbids_them() -> None:
    with pytest.raises(pydantic.ValidationError):
        VerifyResponse.model_validate({"results": [], "also": 2})


class _DaemonBeforeNameLookups:
    """What `hubd rm HANDLE` talks to when the daemon is older than `GET /v1/models?name=`: it ignores the
    name and answers with its first page of models (the real client's `json`, as that daemon answers it)."""

    where = "unix:/run/hubd/hubd.sock"
    settings = SimpleNamespace(http_hosts=[])

    def __init__(self, models: list[dict[str, Any]]) -> None:
        self.models = models

    def json(self, method: str, path: str, body: Any = None, long: bool = False) -> Any:
        return {"models": self.models, "next_cursor": None}


def _entry(handle: str, aliases: tuple[str, ...] = ()) -> dict[str, Any]:
    digest = hashlib.sha256(handle.encode()).hexdigest()
    return {
        "id": digest,
        "path": f"/var/cache/hubd/objects/{digest}",
        "relpath": f"objects/{digest}",
        "handles": [handle],
        "size_bytes": 1,
        "archive_sha256": "0" * 64,
        "tree_digest": digest,
        "fetched_at": 0.0,
        "aliases": list(aliases),
    }


def test_rm_never_takes_another_model_from_an_older_daemons_page_for_the_one_named() -> None:
    page = [_entry("tfhub.dev/a/other/1", ("embed",)), _entry("tfhub.dev/a/wanted/1")]
    backend = DaemonBackend(cast(DaemonClient, _DaemonBeforeNameLookups(page)))
    assert backend._model_id("https://tfhub.dev/a/wanted/1") == page[1]["id"]
    assert backend._model_id("embed") == page[0]["id"]
    with pytest.raises(UnknownModel):
        backend._model_id("https://tfhub.dev/a/not-on-the-page/1")
