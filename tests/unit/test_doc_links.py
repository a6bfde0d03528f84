"""Every file README.md and docs/*.md cite exists: relative links, paths in code spans (`hubd/store.py`,
`bench_inflate.py`) and paths in plain text (hubd/eviction.py). A doc that names a file a reader then cannot find
is worse than one that names none."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SEARCHED = ("hubd", "client", "bench", "tests", "examples", "systemd", "docs")
TOP = (*SEARCHED, ".ci")
"""The repository's top-level directories: a path that starts with one of them is a reference."""
GENERATED = ("bench/results/",)  # git-ignored output of the benchmarks: absent from a fresh checkout

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\s]+)`")
_TOP = "|".join(re.escape(name) for name in TOP)
_PLAIN = re.compile(rf"(?<![\w./-])((?:{_TOP})/[\w./*-]*\w\.\w+|(?:{_TOP})/[\w./-]*/)(?![\w/])")
_FILE_NAME = re.compile(r"^[\w-]+\.py$")


def references(doc: Path) -> set[str]:
    """The repository paths `doc` cites, relative to the repository root."""
    text = doc.read_text()
    found = set()
    for target in _LINK.findall(text):
        if not re.match(r"^[a-z]+:", target) and not target.startswith("#"):
            found.add(str((doc.parent / target.split("#")[0]).resolve().relative_to(REPO)))
    for span in _CODE.findall(text):
        path = span.removeprefix("./")
        if path.split("/")[0] in TOP and "/" in path:
            found.add(path)
        elif _FILE_NAME.match(path):
            found.add(f"*/{path}")  # a bare file name: some file of that name
    found.update(_PLAIN.findall(_CODE.sub("", text)))
    return {path for path in found if not path.startswith(GENERATED)}


@functools.cache
def file_names() -> frozenset[str]:
    """The names of the files in the repository's directories (hidden and generated ones skipped)."""
    names: set[str] = set()
    for top in SEARCHED:
        for _dir, dirs, files in os.walk(REPO / top):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__", "hubd-bench-"))]
            names.update(files)
    return frozenset(names)


def exists(path: str) -> bool:
    if path.startswith("*/"):
        return path[2:] in file_names()
    if "*" in path:
        return any(REPO.glob(path))
    return (REPO / path).exists() and (not path.endswith("/") or (REPO / path).is_dir())


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(REPO)))
def test_every_file_a_doc_cites_exists(doc: Path) -> None:
    missing = sorted(path for path in references(doc) if not exists(path))
    assert missing == [], f"{doc.relative_to(REPO)} cites files that do not exist"


def test_the_reference_finder_sees_each_kind_of_reference(tmp_path: Path) -> None:
    """The check above passes vacuously if it finds nothing: these must be found."""
    readme = references(REPO / "README.md")
    assert {"docs/design.md", "bench/bench_gc.py", "*/bench_inflate.py", "hubd/eviction.py"} <= readme
    design = references(REPO / "docs" / "design.md")
    assert {"hubd/store.py", "client/hubd_client/handles.py", "hubd/server/"} <= design
    assert not exists("docs/manifest.md") and not exists("*/no_such_bench.py") and exists("tests/test_trust_*.py")


def test_the_design_module_table_lists_every_module() -> None:
    """docs/design.md is the map of the code: a module missing from its table is a module nobody can find."""
    table = {
        cell
        for line in (REPO / "docs" / "design.md").read_text().splitlines()
        if line.startswith("| `")
        for cell in re.findall(r"`([^`]+\.py)`", line.split("|")[1])
    }
    modules = {
        str(path.relative_to(REPO))
        for package in ("hubd", "hubd/server", "client/hubd_client")
        for path in (REPO / package).glob("*.py")
        if path.name not in ("__init__.py", "__main__.py") or package == "client/hubd_client"
    }
    assert sorted(modules - table) == [], "add these to the module table in docs/design.md"
    assert sorted(table - modules) == [], "the module table in docs/design.md names modules that do not exist"
