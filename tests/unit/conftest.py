"""The unit tier: one module at a time, on real files in a temp dir, with no TensorFlow, no daemon and no
hosting server, so the whole tier runs in seconds and CI runs it before the end-to-end tier.

The end-to-end fixtures of tests/conftest.py (models built by TensorFlow, the hosting server, local users) are
shadowed here by fixtures that fail at once, so a unit test cannot start them by accident; and a test that
imports TensorFlow fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from hubd.layout import open_cache
from hubd.store import Store

_E2E_ONLY = "is an end-to-end fixture: unit tests (tests/unit) start no TensorFlow, hosting server or daemon"


@pytest.fixture(autouse=True)
def _no_tensorflow() -> Iterator[None]:
    """A unit test that imports TensorFlow (directly or through a module it tests) is not a unit test.

    Only checkable when TensorFlow was not loaded before the test (the unit tier alone, as CI runs it first)."""
    loaded_before = "tensorflow" in sys.modules
    yield
    if not loaded_before:
        assert "tensorflow" not in sys.modules, "this unit test imported TensorFlow"


@pytest.fixture(autouse=True)
def _no_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read HUBD_* variables and the user's and machine's TOML files: none of them leak into a test."""
    for name in list(os.environ):
        if name.startswith("HUBD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HUBD_CONFIG", str(tmp_path / "no-config.toml"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """An empty cache laid out as the daemon lays it out (fsync off: a throwaway cache)."""
    cache = Store(tmp_path / "cache", fsync=False)
    open_cache(cache)
    return cache


@pytest.fixture
def models() -> NoReturn:
    raise pytest.UsageError(f"`models` {_E2E_ONLY}")


@pytest.fixture
def hosting() -> NoReturn:
    raise pytest.UsageError(f"`hosting` {_E2E_ONLY}")


@pytest.fixture
def upstream() -> NoReturn:
    raise pytest.UsageError(f"`upstream` {_E2E_ONLY}")


@pytest.fixture
def settings() -> NoReturn:
    raise pytest.UsageError(f"`settings` {_E2E_ONLY} (build a Settings(cache_dir=tmp_path / 'cache') instead)")


@pytest.fixture
def attacker() -> NoReturn:
    raise pytest.UsageError(f"`attacker` {_E2E_ONLY}")


@pytest.fixture
def victim() -> NoReturn:
    raise pytest.UsageError(f"`victim` {_E2E_ONLY}")
