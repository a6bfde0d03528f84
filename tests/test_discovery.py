"""Discovery (#13 item 1): with no settings, a user's client and CLI find the user's own daemon, else the system
daemon (/run/hubd/hubd.sock); the CLI says so on stderr when it works in-process instead, and `hubd status` names
the daemon or cache it used. Real users, real daemons, nothing configured on the user's side. And (item 3) a
flag the daemon cannot honour is refused, one it can is sent, and the admin token goes with requests over TCP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hubd_client.paths import SYSTEM_SOCKET

from hubd.config import Settings
from tests.conftest import Upstream, cli_env
from tests.daemon import Daemon, start_daemon
from tests.users import LocalUser, make_reachable, shared_dir
from tests.workstation import CLI, ensure_group, run_as_member, visible

RESOLVE = "import sys, hubd_client; print(hubd_client.resolve(sys.argv[1]))"


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


@contextmanager
def root_daemon(settings: Settings, socket: Path, workdir: Path, user: LocalUser) -> Iterator[Daemon]:
    """Root's daemon on `socket`, for a group holding `user`; its cache readable by the users."""
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    make_reachable(settings.cache_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"HUBD_SOCKET": str(socket), "HUBD_SOCKET_GROUP": ensure_group(user)}
    d = start_daemon(settings, workdir, env_extra=env)
    d.socket_path = socket
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def system_socket() -> Iterator[Path]:
    if SYSTEM_SOCKET.exists():
        pytest.skip(f"a hubd already serves {SYSTEM_SOCKET} on this machine")
    made = not SYSTEM_SOCKET.parent.exists()
    yield SYSTEM_SOCKET
    if made and SYSTEM_SOCKET.parent.exists() and not any(SYSTEM_SOCKET.parent.iterdir()):
        SYSTEM_SOCKET.parent.rmdir()


def plain_env(runtime: Path, user: LocalUser) -> dict[str, str]:
    """Nothing of hubd's configured. XDG_RUNTIME_DIR says where the user's own daemon's socket would be, and
    XDG_CACHE_HOME gives the user a fresh ~/.cache (so the default cache, if any is made, is this test's)."""
    cache_home = runtime / "cache-home"
    cache_home.mkdir(exist_ok=True)
    os.chown(cache_home, user.uid, user.gid)
    return {"XDG_RUNTIME_DIR": str(runtime), "XDG_CACHE_HOME": str(cache_home)}


@pytest.mark.slow
def test_with_no_settings_a_user_finds_the_system_daemon(
    settings: Settings, upstream: Upstream, victim: LocalUser, system_socket: Path, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    with shared_dir() as runtime, shared_dir() as public:
        settings = visible(settings, public)  # pytest's own tmp root is 0700 (and other sessions reset it)
        with root_daemon(settings, system_socket, tmp_path, victim) as d:
            env = plain_env(runtime, victim)  # the user's own socket would be here; no daemon of theirs runs
            client = run_as_member(victim, RESOLVE, tfhub(path), env=env)
            assert client.returncode == 0, client.stderr
            assert client.stdout.strip().startswith(str(settings.cache_dir))

            pulled = run_as_member(victim, CLI, "pull", tfhub(path), env=env)
            assert pulled.returncode == 0, pulled.stderr
            assert pulled.stdout.strip() == client.stdout.strip()
            assert "in this process" not in pulled.stderr

            status = run_as_member(victim, CLI, "status", "--json", env=env)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["via"] == f"the daemon at unix:{system_socket}"
            assert not (runtime / "cache-home" / "hubd").exists()  # no private cache was started on the side
        assert d.proc.returncode is not None


@pytest.mark.slow
def test_the_users_own_daemon_comes_before_the_system_daemon(
    settings: Settings, upstream: Upstream, victim: LocalUser, system_socket: Path, tmp_path: Path
) -> None:
    with shared_dir() as runtime, root_daemon(settings, system_socket, tmp_path / "system", victim) as system:
        own_settings = settings.model_copy(update={"cache_dir": tmp_path / "own-cache"})
        with root_daemon(own_settings, runtime / "hubd" / "hubd.sock", tmp_path / "own", victim):
            status = run_as_member(victim, CLI, "status", "--json", env=plain_env(runtime, victim))
            assert status.returncode == 0, status.stderr
            answer = json.loads(status.stdout)
            assert answer["cache_dir"] == str(own_settings.cache_dir)
            assert answer["via"] == f"the daemon at unix:{runtime / 'hubd' / 'hubd.sock'}"
        assert system.proc.poll() is None


def test_the_cli_says_when_it_works_in_process(victim: LocalUser) -> None:
    with shared_dir() as runtime:
        listed = run_as_member(victim, CLI, "ls", env=plain_env(runtime, victim))
        assert listed.returncode == 0, listed.stderr
        cache = runtime / "cache-home" / "hubd"
        assert listed.stderr.startswith("note: no hubd daemon answers at unix:"), listed.stderr
        assert str(SYSTEM_SOCKET) in listed.stderr and str(cache) in listed.stderr
        status = run_as_member(victim, CLI, "status", env=plain_env(runtime, victim))
        assert f"via       the cache {cache}, in this process" in status.stdout, status.stdout + status.stderr


# -- item 3: what the daemon can honour is sent; what it cannot is refused --------------------------------


def hubd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hubd", *args], env=env, capture_output=True, text=True)


def test_flags_the_daemon_cannot_honour_are_refused(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    d = start_daemon(settings, tmp_path)
    try:
        env = {**cli_env(settings), "HUBD_SOCKET": str(d.socket_path)}
        for flag in (["--mirror", "http://127.0.0.1:9"], ["--cache-dir", str(tmp_path / "mine")]):
            result = hubd("pull", tfhub(path), *flag, env=env)
            assert result.returncode == 1
            assert result.stderr.startswith(f"hubd: error: {flag[0]} cannot apply"), result.stderr
            assert len(result.stderr.splitlines()) == 1 and "(hint: " in result.stderr
        assert upstream.requests(path) == 0
        assert not (tmp_path / "mine").exists()
    finally:
        d.stop()


def test_offline_and_gc_max_size_are_sent_to_the_daemon(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    cached, uncached = upstream.publish("reusable"), upstream.publish("text_embedding")
    d = start_daemon(settings, tmp_path, env_extra={"HUBD_GC_GRACE": "0"})
    try:
        env = {**cli_env(settings), "HUBD_SOCKET": str(d.socket_path)}
        assert hubd("pull", tfhub(cached), env=env).returncode == 0
        refused = hubd("pull", "--offline", tfhub(uncached), env=env)
        assert refused.returncode == 1 and "offline" in refused.stderr, refused.stderr
        assert upstream.requests(uncached) == 0
        assert hubd("pull", "--offline", tfhub(cached), env=env).returncode == 0

        assert len(d.request("GET", "/v1/models").json()["models"]) == 1
        collected = hubd("gc", "--max-size", "1", env=env)
        assert collected.returncode == 0, collected.stderr
        assert d.request("GET", "/v1/models").json()["models"] == []  # the daemon has no quota of its own
    finally:
        d.stop()


def test_the_cli_sends_the_admin_token_over_tcp(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-tests\n")
    token.chmod(0o600)
    d = start_daemon(settings, tmp_path, "--listen", "127.0.0.1:0", "--token-file", str(token))
    try:
        entry = d.request("POST", "/v1/resolve", {"handle": tfhub(upstream.publish("reusable"))}).json()
        env = {**cli_env(settings), "HUBD_URL": d.tcp[0]}
        without = hubd("gc", "--dry-run", env=env)
        assert without.returncode == 1 and "admin token" in without.stderr, without.stderr
        assert hubd("gc", "--dry-run", "--token-file", str(token), env=env).returncode == 0
        removed = hubd("rm", entry["id"], env={**env, "HUBD_TOKEN_FILE": str(token)})
        assert removed.returncode == 0, removed.stderr
    finally:
        d.stop()


def test_hubd_offline_in_the_environment_is_sent_to_the_daemon(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    uncached = upstream.publish("reusable")
    d = start_daemon(settings, tmp_path)
    try:
        env = {**cli_env(settings), "HUBD_SOCKET": str(d.socket_path), "HUBD_OFFLINE": "1"}
        refused = hubd("pull", tfhub(uncached), env=env)
        assert refused.returncode == 1 and "offline" in refused.stderr, refused.stderr
        assert upstream.requests(uncached) == 0
    finally:
        d.stop()
