"""The end-to-end tier's fixtures: real SavedModels built by TensorFlow (once per session, on first use), a real
hosting server on 127.0.0.1, local users. All are lazy: a test that asks for none of them starts none of them, and
tests/unit/conftest.py refuses them to the unit tier outright."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hubd.config import Settings
from tests.hosting import Behaviour, HostingServer
from tests.users import CAN_SWITCH_USERS, LocalUser, local_user

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
_names = itertools.count()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The unit tier first, whatever the command line: it fails in seconds where the end-to-end tier takes
    minutes (a stable sort, so each tier keeps its own order)."""
    unit = REPO / "tests" / "unit"
    items.sort(key=lambda item: not item.path.is_relative_to(unit))


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Archives of real SavedModels: 'reusable', 'text_embedding' and 'large_4mb' (random weights)."""
    out = tmp_path_factory.mktemp("models")
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "model_factory.py"), str(out), "--large-mb", "4"],
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
    )
    names = json.loads((out / "index.json").read_text())
    return {name: (out / f"{name}.tar.gz").read_bytes() for name in names}


@pytest.fixture(scope="session")
def hosting() -> Iterator[HostingServer]:
    with HostingServer() as server:
        yield server


class Upstream:
    """A per-test view of the hosting server: registers models under fresh paths so tests never collide."""

    def __init__(self, server: HostingServer, models: dict[str, bytes]) -> None:
        self.server = server
        self.models = models

    def publish(self, model: str | bytes, behaviour: Behaviour | None = None, path: str | None = None) -> str:
        """Serve a model archive; returns its tfhub-style path (publisher/model/version)."""
        data = self.models[model] if isinstance(model, str) else model
        path = path or f"pub{next(_names)}/model/1"
        self.server.add(path, data, behaviour)
        return path

    def handle(self, path: str) -> str:
        return f"{self.server.url}/{path}"

    def bytes_sent(self, path: str) -> int:
        return self.server.bytes_sent[path]

    def requests(self, path: str) -> int:
        return self.server.requests[path]


@pytest.fixture
def upstream(hosting: HostingServer, models: dict[str, bytes]) -> Upstream:
    return Upstream(hosting, models)


@pytest.fixture
def settings(tmp_path: Path, hosting: HostingServer) -> Settings:
    return Settings(
        cache_dir=tmp_path / "cache",
        mirror=hosting.url,
        http_hosts=["127.0.0.1"],
        backoff_base=0.01,
        retries=3,
        read_timeout=10,
    )


def run_on_terminal(cmd: list[str], env: dict[str, str], stdout_too: bool = False) -> tuple[int, bytes, bytes]:
    """Run `cmd` with stderr (and with `stdout_too` stdout, as in a shell) on a pseudo-terminal:
    (exit code, what the terminal showed, stdout when it was a pipe)."""
    import pty

    master, terminal = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdout=terminal if stdout_too else subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        drawn += chunk
    stdout, _ = proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, drawn, stdout or b""


def cli_env(settings: Settings) -> dict[str, str]:
    """Environment for a `hubd` subprocess using the same cache and upstream as `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBD_")}
    env.update(
        HUBD_CACHE_DIR=str(settings.cache_dir),
        HUBD_MIRROR=settings.mirror or "",
        HUBD_HTTP_HOSTS=",".join(settings.http_hosts),
        HUBD_BACKOFF_BASE=str(settings.backoff_base),
        HUBD_SOCKET=str(settings.cache_dir.parent / "no-daemon.sock"),
    )
    return env


@pytest.fixture(scope="session")
def attacker() -> LocalUser:
    """An unprivileged local account that attacks the shared cache (tests run as root; the attack never does)."""
    if not CAN_SWITCH_USERS:
        pytest.skip("creating and switching users needs root and useradd")
    return local_user("hubd-mallory")


@pytest.fixture(scope="session")
def victim() -> LocalUser:
    """An unprivileged local account whose models the attacker tries to tamper with."""
    if not CAN_SWITCH_USERS:
        pytest.skip("creating and switching users needs root and useradd")
    return local_user("hubd-alice")
