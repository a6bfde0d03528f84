"""Prefetch manifests: which models a machine should have, with checksums, aliases and pins.

TOML (or JSON) of the form::

    [[model]]
    handle = "https://tfhub.dev/google/nnlm-en-dim50/2"
    sha256 = "..."        # optional: the archive's sha256, enforced
    name = "nnlm50"       # optional alias
    pin = true            # optional: never evicted
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hubd.catalog import alias_problem
from hubd.errors import BadRequest

M = TypeVar("M", bound=BaseModel)


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
        return validate(Manifest, data)
    except ManifestProblems as exc:
        raise BadRequest(f"{source}: {exc}", "each [[model]] needs a handle; see docs/manifest.md") from None


MAX_PROBLEMS = 10
"""How many validation problems an error names; the rest are counted ("and N more"), so the answer stays small."""


def summarize(problems: Iterable[str], count: int, limit: int = MAX_PROBLEMS) -> str:
    """The first `limit` of `count` problems joined by "; " (each cut to 200 characters), then "and N more"."""
    shown = [p if len(p) <= 200 else p[:199] + "…" for p in itertools.islice(problems, limit)]
    rest = count - len(shown)
    return "; ".join(shown) + (f"; and {rest} more" if rest > 0 else "")


def unknown_keys(data: Any, model: type[BaseModel], where: str = "") -> Iterator[str]:
    """A problem for each key that `model` (extra="forbid") and the models in its list fields do not know.

    Looked for in Python before pydantic sees the data: pydantic builds its errors holding the GIL (0.4-1.3 s
    for the half a million unknown keys a 4 MB body holds), so a hostile body would stall the event loop even
    from a worker thread. Data without unknown keys leaves pydantic little to report.
    """
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    if model.model_config.get("extra") == "forbid":
        known = set(fields) | {f.alias for f in fields.values() if f.alias}
        for key in data:
            if key not in known:
                yield f"{where}{key}: Extra inputs are not permitted"
    for name, field in fields.items():
        items = data.get(field.alias or name)
        args = get_args(field.annotation)
        if isinstance(items, list) and get_origin(field.annotation) is list and args:
            item_model = args[0]
            if isinstance(item_model, type) and issubclass(item_model, BaseModel):
                for i, item in enumerate(items):
                    yield from unknown_keys(item, item_model, f"{where}{name}[{i}].")


def validate(model: type[M], data: Any) -> M:
    """`model.model_validate(data)`; a ValidationError's problems summarized (`summarize`) as `problems`."""
    extra = unknown_keys(data, model)
    first = list(itertools.islice(extra, MAX_PROBLEMS))
    if first:
        raise ManifestProblems(summarize(iter(first), len(first) + sum(1 for _ in extra)))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = summarize((f"{_where(err['loc'])}: {err['msg']}" for err in exc.errors()), exc.error_count())
        raise ManifestProblems(problems) from None


class ManifestProblems(ValueError):
    """What is wrong with a body or manifest, summarized: its text is the problems."""


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
