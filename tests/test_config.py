"""Settings: flags over environment over the TOML file over embedded defaults, with readable errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hubd.config import OTHER_VARIABLES, Settings
from tests.conftest import REPO, cli_env


def test_daemon_and_cli_never_import_tensorflow() -> None:
    code = (
        "import sys, hubd.cli, hubd.server.daemon, hubd.watch, hubd.engine;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the cache to another user")
def test_without_a_daemon_the_cli_refuses_a_cache_it_does_not_own(tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    os.chown(cache, 65534, 65534)
    from hubd.config import Settings

    env = cli_env(Settings(cache_dir=cache))
    result = subprocess.run([sys.executable, "-m", "hubd", "ls"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "belongs to another user and no hubd daemon answers" in result.stderr


def test_the_installed_package_is_complete(tmp_path: Path) -> None:
    """Import every module from the installed distributions (hubd, and hubd-client from client/), not from this
    checkout; each package comes from its own distribution."""
    modules = [
        f"{package}.{path.stem}" if path.stem != "__init__" else package
        for package, folder in (
            ("hubd", "hubd"),
            ("hubd.server", "hubd/server"),
            ("hubd_client", "client/hubd_client"),
        )
        for path in sorted((Path(__file__).parent.parent / folder).glob("*.py"))
        if path.stem != "__main__"
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    code = (
        "import importlib, sys, importlib.metadata as md\n"
        "[importlib.import_module(m) for m in sys.argv[1:]]\n"
        "tops = lambda d: sorted({f.parts[0] for f in md.files(d) or [] if f.parts[0] != '..'})\n"
        "print(' '.join(tops('hubd')))\n"
        "print(' '.join(tops('hubd-client')))\n"
        "print(md.version('hubd'), md.version('hubd-client'), *md.requires('hubd') or [])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    hubd_files, client_files, versions = result.stdout.splitlines()
    assert not [name for name in hubd_files.split() if name.startswith("hubd_client")], hubd_files
    assert "hubd_client.pth" in client_files.split(), client_files  # the HUBD_TFHUB=1 hook belongs to the client
    hubd_version, client_version, *requires = versions.split()
    assert hubd_version == client_version
    assert f"hubd-client=={client_version}" in requires, versions


# -- where settings come from ----------------------------------------------------------------------------


def test_hubd_config_prints_every_setting_and_its_source(tmp_path: Path) -> None:
    user = tmp_path / "xdg" / "hubd" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('max_size = "5G"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBD_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HUBD_RETRIES="9", HUBD_CLIENT_TIMEOUT="3")
    hubd = [sys.executable, "-m", "hubd", "config", "--mirror", "http://mirror.lan:8760"]
    result = subprocess.run([*hubd, "--json"], env=env, capture_output=True, text=True, check=True)
    rows = {row["env"]: row for row in json.loads(result.stdout)}
    assert {f"HUBD_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES.keys() == rows.keys()
    assert rows["HUBD_MIRROR"] == {
        "name": "mirror",
        "env": "HUBD_MIRROR",
        "value": "http://mirror.lan:8760",
        "source": "flag",
    }
    assert (rows["HUBD_RETRIES"]["value"], rows["HUBD_RETRIES"]["source"]) == (9, "env")
    assert (rows["HUBD_MAX_SIZE"]["value"], rows["HUBD_MAX_SIZE"]["source"]) == (5 * 2**30, str(user))
    assert (rows["HUBD_CLIENT_TIMEOUT"]["value"], rows["HUBD_CLIENT_TIMEOUT"]["source"]) == ("3", "env")
    assert rows["HUBD_OFFLINE"] == {"name": "offline", "env": "HUBD_OFFLINE", "value": False, "source": "default"}
    text = subprocess.run(hubd, env=env, capture_output=True, text=True, check=True).stdout
    assert re.search(rf"^HUBD_MAX_SIZE +{re.escape(str(user))} +5368709120$", text, re.M)
    assert re.search(r"^HUBD_MIRROR +flag +http://mirror.lan:8760$", text, re.M)


def test_the_readme_documents_every_variable_the_code_reads() -> None:
    """Every HUBD_* variable read by hubd or hubd_client is in the README, and `hubd config` shows it."""
    code = "".join(p.read_text() for d in ("hubd", "client/hubd_client") for p in (REPO / d).rglob("*.py"))
    read = {v for v in re.findall(r"HUBD_[A-Z_]+", code) if not v.endswith("_")} - {"HUBD_TEST_FAULT"}
    shown = {f"HUBD_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES.keys()
    assert read <= shown, sorted(read - shown)
    readme = (REPO / "README.md").read_text()
    assert [v for v in sorted(shown) if f"`{v}`" not in readme] == []
