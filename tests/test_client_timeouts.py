"""Issue #10, client: a daemon that accepts but never answers costs seconds, then the offline fallback or a clear
error; a long fetch is never cut short by those limits; the CLI never hangs.

The silent daemon is a real listening Unix socket whose connections are accepted and held, never answered.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import hubd_client
import pytest
from hubd_client.errors import DaemonUnavailable

from hubd.config import Settings
from hubd.engine import Engine
from tests.conftest import REPO, Upstream, cli_env, run
from tests.daemon import start_daemon
from tests.hosting import Behaviour
from tests.raw_http import read_request


class SilentDaemon:
    """Accepts every connection, reads what comes, answers nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent(tmp_path: Path) -> Iterator[SilentDaemon]:
    daemon = SilentDaemon(tmp_path / "silent.sock")
    yield daemon
    daemon.close()


def _client_env(monkeypatch: pytest.MonkeyPatch, socket_path: Path, cache: Path, **limits: str) -> None:
    monkeypatch.setenv("HUBD_SOCKET", str(socket_path))
    monkeypatch.delenv("HUBD_URL", raising=False)
    monkeypatch.setenv("HUBD_CACHE_DIR", str(cache))
    for name, value in limits.items():
        monkeypatch.setenv(name, value)


def test_resolve_falls_back_to_the_cache_when_the_daemon_never_answers(
    settings: Settings, upstream: Upstream, silent: SilentDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = upstream.handle(upstream.publish("reusable"))

    async def fill() -> str:
        engine = Engine(settings)
        await engine.start()
        try:
            return (await engine.resolve(handle)).path
        finally:
            await engine.close()

    cached = run(fill())
    _client_env(monkeypatch, silent.path, settings.cache_dir, HUBD_CLIENT_TIMEOUT="1")
    started = time.monotonic()
    path = hubd_client.resolve(handle)
    elapsed = time.monotonic() - started
    assert Path(path) == Path(cached) and Path(path, "saved_model.pb").is_file()
    assert 1 <= elapsed < 5, elapsed  # it did wait for the daemon, for the first-byte limit and no longer
    assert silent.held  # the request really reached the silent daemon


def test_resolve_of_an_uncached_model_from_a_silent_daemon_is_a_clear_error(
    settings: Settings, silent: SilentDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.cache_dir.mkdir(parents=True)
    _client_env(monkeypatch, silent.path, settings.cache_dir, HUBD_CLIENT_TIMEOUT="1")
    started = time.monotonic()
    with pytest.raises(DaemonUnavailable) as caught:
        hubd_client.resolve("https://tfhub.dev/google/never-cached/1")
    assert time.monotonic() - started < 5
    assert caught.value.code == "daemon_not_answering"
    assert "does not answer (no answer within 1 s" in caught.value.message
    assert "not in the cache" in caught.value.message and "HUBD_CLIENT_TIMEOUT" in caught.value.hint


def test_a_daemon_that_accepts_nothing_at_all_is_not_waited_for(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener whose backlog is full (a daemon stuck before accept): connecting itself is bounded."""
    path = tmp_path / "stuck.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    while True:  # fill the backlog: the next blocking connect() waits until someone accepts
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            break
        queued.append(sock)
    settings.cache_dir.mkdir(parents=True)
    _client_env(monkeypatch, path, settings.cache_dir, HUBD_CLIENT_CONNECT_TIMEOUT="1")
    try:
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable) as caught:
            hubd_client.resolve("https://tfhub.dev/google/never-cached/1")
        assert time.monotonic() - started < 5
        assert caught.value.code == "daemon_not_answering"
        assert "the listen backlog is full" in caught.value.message
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def test_a_fetch_longer_than_the_first_byte_limit_still_resolves(
    settings: Settings, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client asks for a progress stream: its first line comes at once, however long the download takes."""
    size = len(upstream.models["reusable"])
    path = upstream.publish("reusable", Behaviour(throttle_chunk=max(1, size // 8), throttle_delay=0.3))
    daemon = start_daemon(settings, tmp_path)
    try:
        _client_env(monkeypatch, daemon.socket_path, settings.cache_dir, HUBD_CLIENT_TIMEOUT="1")
        started = time.monotonic()
        resolved = hubd_client.resolve(f"https://tfhub.dev/{path}")
        assert time.monotonic() - started > 1  # longer than the first-byte limit, and not cut short
        assert Path(resolved, "saved_model.pb").is_file()
    finally:
        daemon.stop()


def test_a_quiet_fetch_is_kept_alive_past_the_idle_limit(
    settings: Settings, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a fetch makes no progress, the daemon's blank keep-alive lines keep the client's idle limit away."""
    path = upstream.publish("reusable", Behaviour(pause_after=1000))
    handle = f"https://tfhub.dev/{path}"
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_STREAM_HEARTBEAT": "0.1"})
    try:
        _client_env(monkeypatch, daemon.socket_path, settings.cache_dir, HUBD_CLIENT_IDLE_TIMEOUT="1")
        result: dict[str, object] = {}

        def resolve() -> None:
            try:
                result["path"] = hubd_client.resolve(handle)
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        client = threading.Thread(target=resolve)
        client.start()
        # Watch the same fetch's stream: once it has been silent but for 20 keep-alives (2 s, twice the client's
        # idle limit), let the upstream go on.
        conn = daemon.unix()
        conn.request("POST", "/v1/pull", body=f'{{"handle": "{handle}"}}', headers={"Content-Type": "x"})
        response = conn.getresponse()
        blanks = 0
        while blanks < 20:
            line = response.readline()
            assert line, "the stream ended while the upstream was paused"
            blanks = blanks + 1 if line == b"\n" else 0
        upstream.server.release(path)
        response.read()
        conn.close()
        client.join(60)
        assert "error" not in result, result
        assert Path(str(result["path"]), "saved_model.pb").is_file()
    finally:
        daemon.stop()


def test_hubd_ls_against_a_silent_daemon_exits_with_an_error_within_seconds(
    settings: Settings, silent: SilentDaemon
) -> None:
    env = {**cli_env(settings), "HUBD_SOCKET": str(silent.path), "HUBD_CLIENT_TIMEOUT": "1"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{REPO / 'client'}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hubd", "ls"], env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 1, result
    assert result.stderr.startswith("hubd: error: the hubd daemon at"), result.stderr
    assert "sent nothing for 1 s" in result.stderr and "HUBD_CLIENT_TIMEOUT" in result.stderr


# -- a daemon that answers, but wrongly (red team #10 item 5) -------------------------------------------------


class CannedDaemon:
    """Answers every request with `head`, then `body`, then (with `keepalive`) a blank line every 50 ms for
    as long as the client listens."""

    def __init__(self, path: Path, head: bytes, body: bytes, keepalive: bool = False) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.path, self.head, self.body, self.keepalive = path, head, body, keepalive
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    read_request(conn)
                    conn.sendall(self.head + self.body)
                    while self.keepalive:
                        conn.sendall(b"\n")
                        time.sleep(0.05)  # pacing the keep-alives, as the daemon's heartbeat does
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n"


def test_a_stream_of_keep_alives_alone_is_a_stuck_daemon_after_the_stall_limit(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep-alives used to reset the idle limit for ever: a stuck daemon held resolve with no fallback."""
    from hubd_client import transport

    settings.cache_dir.mkdir(parents=True)
    stuck = CannedDaemon(tmp_path / "stuck.sock", STREAM_HEAD, b'{"event":"progress"}\n', keepalive=True)
    try:
        _client_env(monkeypatch, stuck.path, settings.cache_dir, HUBD_CLIENT_IDLE_TIMEOUT="60")
        monkeypatch.setattr(transport, "STALL_TIMEOUT", 1.0)
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable) as caught:
            hubd_client.resolve("https://tfhub.dev/google/never-cached/1")
        assert 1 <= time.monotonic() - started < 10
        assert caught.value.code == "daemon_not_answering" and "only keep-alives" in caught.value.message
    finally:
        stuck.close()


@pytest.mark.parametrize(
    ("head", "body", "what"),
    [
        (STREAM_HEAD, b"<html>not hubd</html>\n", "not JSON"),
        (STREAM_HEAD, b"{" + b" " * (2 << 20) + b"}\n", "longer than"),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 8\r\nConnection: close\r\n\r\n", b"<h1>502!", "not JSON"),
    ],
    ids=["html-stream", "huge-line", "html-error"],
)
def test_an_answer_that_is_not_hubds_is_a_clear_error(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: bytes, body: bytes, what: str
) -> None:
    from hubd_client.errors import HubdClientError

    settings.cache_dir.mkdir(parents=True)
    odd = CannedDaemon(tmp_path / "odd.sock", head, body)
    try:
        _client_env(monkeypatch, odd.path, settings.cache_dir)
        with pytest.raises(HubdClientError) as caught:
            hubd_client.resolve("https://tfhub.dev/google/never-cached/1")
        assert caught.value.code == "bad_answer" and what in caught.value.message
        assert len(str(caught.value)) < 1000
    finally:
        odd.close()
