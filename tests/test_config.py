"""Settings: flags over environment over the TOML file over embedded defaults, with readable errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubd.config import load_settings
from hubd.errors import BadRequest
from tests.conftest import cli_env


def test_embedded_defaults_need_no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("HUBD_"):
            monkeypatch.delenv(key)
    settings = load_settings()
    assert settings.cache_dir.name == "hubd" and not settings.offline and settings.mirror is None
    assert "tfhub.dev" in settings.allowed_hosts


def test_toml_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hubd.toml"
    config.write_text('mirror = "http://mirror.lan:8080"\noffline = true\nhttp_hosts = ["mirror.lan"]\n')
    monkeypatch.setenv("HUBD_CONFIG", str(config))
    assert load_settings().mirror == "http://mirror.lan:8080"
    monkeypatch.setenv("HUBD_MIRROR", "https://env.example")
    assert load_settings().mirror == "https://env.example"
    assert load_settings(mirror="https://flag.example").mirror == "https://flag.example"
    assert load_settings().offline is True
    monkeypatch.setenv("HUBD_HTTP_HOSTS", "a.lan, b.lan")
    assert load_settings().http_hosts == ["a.lan", "b.lan"]


def test_invalid_settings_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBD_RETRIES", "many")
    with pytest.raises(BadRequest, match="retries"):
        load_settings()
    monkeypatch.delenv("HUBD_RETRIES")
    config = tmp_path / "hubd.toml"
    config.write_text('mirror = "ftp://nope"\nsurprise = 1\n')
    monkeypatch.setenv("HUBD_CONFIG", str(config))
    with pytest.raises(BadRequest, match="mirror") as caught:
        load_settings()
    assert "surprise" in caught.value.message


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
