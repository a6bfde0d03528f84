"""An older CLI keeps working with a newer daemon: answers are read ignoring fields this hubd does not know.

The daemon's own models forbid unknown fields (requests stay exact and its OpenAPI document says
additionalProperties: false), so reading an answer with them as they are would refuse anything a later daemon
adds, nested or not."""

from __future__ import annotations

import pydantic
import pytest

from hubd.backends import _answer
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
