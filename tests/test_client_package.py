"""hubd-client, the client-only distribution (client/): built and installed alone into a fresh venv, it resolves
through a running daemon with nothing but the standard library; its version is the daemon's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import hubd_client
import pytest

import hubd
from hubd.config import Settings
from tests.conftest import REPO, Upstream
from tests.daemon import start_daemon

CHECK = """
import importlib.util, json, os, sys, sysconfig
import hubd_client
print(json.dumps({
    "file": hubd_client.__file__,
    "version": hubd_client.__version__,
    "absent": [m for m in ("hubd", "aiohttp", "pydantic", "tensorflow") if importlib.util.find_spec(m) is None],
    "hubd_loaded": sorted(m for m in sys.modules if m == "hubd" or m.startswith("hubd.")),
    "pth": os.path.isfile(os.path.join(sysconfig.get_paths()["purelib"], "hubd_client.pth")),
    "path": hubd_client.resolve(sys.argv[1]),
    "hubd_loaded_after": sorted(m for m in sys.modules if m == "hubd" or m.startswith("hubd.")),
}))
"""


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of client/, built from a copy (setuptools writes build/ and *.egg-info next to the sources)."""
    source = tmp_path / "client-src"
    shutil.copytree(REPO / "client", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("hubd_client-*.whl")
    return wheel


@pytest.mark.slow
def test_hubd_client_installs_alone_and_resolves_through_the_daemon(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "hubd_client.pth" in names
    assert not [n for n in names if n.startswith("hubd/")]
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert all('extra == "tf"' in line for line in requires), requires  # no required dependencies

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
    )

    daemon = start_daemon(settings, tmp_path)
    try:
        handle = f"https://tfhub.dev/{upstream.publish('reusable')}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "PYTHON"))}
        env.update(HUBD_SOCKET=str(daemon.socket_path), HUBD_CACHE_DIR=str(settings.cache_dir))
        result = subprocess.run(
            [python, "-c", CHECK, handle], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        daemon.stop()
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["file"].startswith(str(venv)), seen["file"]
    assert seen["absent"] == ["hubd", "aiohttp", "pydantic", "tensorflow"]
    assert seen["hubd_loaded"] == [] and seen["hubd_loaded_after"] == []
    assert seen["pth"]
    assert seen["version"] == hubd_client.__version__
    assert Path(seen["path"], "saved_model.pb").is_file()
    assert Path(seen["path"]).is_relative_to(settings.cache_dir)


def test_one_version_for_both_distributions() -> None:
    """hubd pins hubd-client==<its own version>; each version has one source (its package's __version__)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    assert "version" in project["dynamic"] and "version" in client["dynamic"]
    assert hubd.__version__ == hubd_client.__version__
    assert f"hubd-client=={hubd.__version__}" in project["dependencies"]
    assert client["dependencies"] == []
