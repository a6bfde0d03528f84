"""hubd_client without TensorFlow: resolve through the daemon, the offline fallback, containers, imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hubd_client
import pytest

from hubd.config import Settings
from tests.conftest import REPO, Upstream
from tests.daemon import Daemon, start_daemon


@pytest.fixture
def daemon(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    d = start_daemon(settings, tmp_path)
    monkeypatch.setenv("HUBD_SOCKET", str(d.socket_path))
    monkeypatch.delenv("HUBD_URL", raising=False)
    monkeypatch.setenv("HUBD_CACHE_DIR", str(settings.cache_dir))
    yield d
    d.stop()


def test_import_loads_no_tensorflow_and_no_heavy_packages() -> None:
    code = (
        "import sys, hubd_client;"
        "heavy = {'tensorflow', 'keras', 'tf_keras', 'aiohttp', 'pydantic', 'numpy', 'diskcache', 'watchdog'};"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'client'}:{REPO}"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"


def test_resolve_asks_the_daemon(daemon: Daemon, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    resolved = hubd_client.resolve(f"https://tfhub.dev/{path}")
    assert Path(resolved, "saved_model.pb").is_file()
    assert upstream.requests(path) == 1


def test_resolve_over_loopback_tcp_with_hubd_url(
    settings: Settings, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = start_daemon(settings, tmp_path, "--listen", "127.0.0.1:0")
    try:
        monkeypatch.setenv("HUBD_SOCKET", str(tmp_path / "nothing-here.sock"))
        monkeypatch.setenv("HUBD_URL", d.tcp[0])
        resolved = hubd_client.resolve(f"https://tfhub.dev/{upstream.publish('reusable')}")
        assert Path(resolved, "saved_model.pb").is_file()
    finally:
        d.stop()


def test_local_paths_are_returned_as_they_are(tmp_path: Path) -> None:
    assert hubd_client.resolve(str(tmp_path)) == str(tmp_path.resolve())


def test_daemon_errors_keep_their_code_message_and_hint(daemon: Daemon) -> None:
    with pytest.raises(hubd_client.HubdClientError) as caught:
        hubd_client.resolve("https://tfhub.dev/nobody/nothing/1")
    assert caught.value.code == "not_found"
    assert "check the handle" in caught.value.hint


def test_daemon_down_falls_back_to_a_verified_cache_entry(
    daemon: Daemon, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = upstream.publish("reusable")
    cached = hubd_client.resolve(f"https://tfhub.dev/{path}")
    daemon.stop()
    assert hubd_client.resolve(f"https://tfhub.dev/{path}/") == cached
    with pytest.raises(hubd_client.DaemonUnavailable) as caught:
        hubd_client.resolve("https://tfhub.dev/other/model/1")
    message = str(caught.value)
    assert "not running" in message and str(daemon.socket_path) in message and "hubd serve" in message
    Path(cached, "saved_model.pb").chmod(0o644)
    Path(cached).chmod(0o755)
    Path(cached, "saved_model.pb").unlink()
    with pytest.raises(hubd_client.DaemonUnavailable):  # a damaged entry is never handed out
        hubd_client.resolve(f"https://tfhub.dev/{path}")


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs a mount namespace")
def test_container_sees_the_cache_at_another_mount_point(
    daemon: Daemon, upstream: Upstream, settings: Settings, tmp_path: Path
) -> None:
    """As in a container: the daemon's cache path is not visible; the same cache is mounted elsewhere."""
    path = upstream.publish("reusable")
    mount = tmp_path / "container-view"
    mount.mkdir()
    script = "import sys, hubd_client; print(hubd_client.resolve(sys.argv[1]))"
    shell = (
        f'mount --bind "{settings.cache_dir}" "{mount}" && mount -t tmpfs tmpfs "{settings.cache_dir}" '
        f'&& exec "{sys.executable}" -c "{script}" https://tfhub.dev/{path}'
    )
    env = {**os.environ, "HUBD_CACHE_DIR": str(mount), "PYTHONPATH": f"{REPO / 'client'}:{REPO}"}
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    seen = result.stdout.strip()
    assert seen.startswith(str(mount) + "/objects/")
    assert (settings.cache_dir / Path(seen).relative_to(mount) / "saved_model.pb").is_file()


def test_offline_in_the_client_process_never_causes_a_download(
    daemon: Daemon, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HUBD_OFFLINE=1 is per process (as HF_HUB_OFFLINE): the daemon is online, this process fetches nothing."""
    cached, uncached = upstream.publish("reusable"), upstream.publish("text_embedding")
    hubd_client.resolve(f"https://tfhub.dev/{cached}")
    monkeypatch.setenv("HUBD_OFFLINE", "1")
    assert Path(hubd_client.resolve(f"https://tfhub.dev/{cached}"), "saved_model.pb").is_file()
    with pytest.raises(hubd_client.HubdClientError) as refused:
        hubd_client.resolve(f"https://tfhub.dev/{uncached}")
    assert refused.value.code == "not_cached" and refused.value.hint
    assert upstream.requests(uncached) == 0
    monkeypatch.delenv("HUBD_OFFLINE")
    assert Path(hubd_client.resolve(f"https://tfhub.dev/{uncached}"), "saved_model.pb").is_file()
