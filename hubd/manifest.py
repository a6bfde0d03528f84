"""Prefetch manifests: which models a machine should have, with checksums, aliases and pins.

TOML (or JSON) of the form::

    [[model]]
    handle = "https://tfhub.dev/google/nnlm-en-dim50/2"
    sha256 = "..."        # optional: the archive's sha256, enforced
    name = "nnlm50"       # optional alias
    pin = true            # optional: never evicted
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hubd.catalog import alias_problem
from hubd.errors import BadRequest


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    handle: str = Field(min_length=1, max_length=2048)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    name: str | None = Field(None, max_length=200)
    """An alias: once the manifest is applied, resolves like the handle (`hubd pull NAME`, `hub.resolve`)."""
    pin: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_a_word(cls, value: str | None) -> str | None:
        problem = alias_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: list[ManifestEntry] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _one_model_per_name(self) -> Manifest:
        first: dict[str, tuple[int, ManifestEntry]] = {}
        for position, item in enumerate(self.model):
            if item.name is None:
                continue
            seen = first.setdefault(item.name, (position, item))
            if (seen[1].handle, seen[1].sha256) != (item.handle, item.sha256):
                raise ValueError(
                    f"model[{position}] and model[{seen[0]}] are both named {item.name!r} "
                    f"({item.handle} and {seen[1].handle})"
                )
        return self


def parse_manifest(text: str, source: str = "manifest") -> Manifest:
    """Parse TOML or JSON; errors name the offending entry (`model[2].sha256: ...`)."""
    data: Any
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as toml_error:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise BadRequest(
                f"{source} is neither valid TOML nor JSON: {toml_error}", "fix the syntax error it names"
            ) from None
    if isinstance(data, dict) and "models" in data and "model" not in data:
        data = {**data, "model": data.pop("models")}
    if isinstance(data, list):
        data = {"model": data}
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_where(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise BadRequest(f"{source}: {problems}", "each [[model]] needs a handle; see docs/manifest.md") from None


def load_manifest(path: Path) -> Manifest:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadRequest(f"cannot read manifest {path}: {exc.strerror}", "check the path") from None
    return parse_manifest(text, str(path))


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "manifest"
