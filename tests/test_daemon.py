"""The daemon as a real process: API v1 over a Unix socket and loopback TCP, guards, lifecycle, watching."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hubd.config import Settings
from tests.conftest import Upstream, cli_env, run_on_terminal
from tests.daemon import Daemon, UnixHTTPConnection, call, start_daemon
from tests.hosting import Behaviour


@pytest.fixture
def daemon(settings: Settings, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(settings, tmp_path, "--listen", "127.0.0.1:0")
    yield d
    d.stop()


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def test_health_reports_version_cache_and_offline(daemon: Daemon, settings: Settings) -> None:
    reply = daemon.request("GET", "/v1/health")
    assert reply.status == 200
    assert reply.json()["cache_dir"] == str(settings.cache_dir)
    assert reply.json()["offline"] is False


def test_resolve_returns_a_ready_entry(daemon: Daemon, upstream: Upstream, settings: Settings) -> None:
    path = upstream.publish("reusable")
    reply = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)})
    assert reply.status == 200, reply.body
    entry = reply.json()
    assert Path(entry["path"], "saved_model.pb").is_file()
    assert settings.cache_dir / entry["relpath"] == Path(entry["path"])
    assert {"id", "size_bytes", "archive_sha256", "tree_digest"} <= entry.keys()


def test_concurrent_resolves_share_one_download(daemon: Daemon, upstream: Upstream) -> None:
    path = upstream.publish("large_4mb", Behaviour(throttle_chunk=256 * 1024, throttle_delay=0.01))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(
            pool.map(lambda _: daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)}), range(16))
        )
    assert {r.status for r in replies} == {200}
    assert len({r.json()["path"] for r in replies}) == 1
    assert upstream.requests(path) == 1
    assert upstream.bytes_sent(path) == len(upstream.models["large_4mb"])


def test_pull_streams_progress_then_the_entry(daemon: Daemon, upstream: Upstream) -> None:
    path = upstream.publish("large_4mb", Behaviour(throttle_chunk=256 * 1024, throttle_delay=0.01))
    reply = daemon.request("POST", "/v1/pull", {"handle": tfhub(path)})
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    events = reply.ndjson()
    downloads = [e for e in events if e["event"] == "progress" and e["phase"] == "download"]
    assert len(downloads) >= 2
    assert downloads[-1]["done"] == downloads[-1]["total"] == len(upstream.models["large_4mb"])
    assert [e["phase"] for e in events if e["event"] == "progress"][-2:] == ["verify", "publish"]
    assert events[-1]["event"] == "done" and Path(events[-1]["entry"]["path"]).is_dir()


def test_pull_client_that_disconnects_does_not_cancel_the_fetch(daemon: Daemon, upstream: Upstream) -> None:
    size = len(upstream.models["large_4mb"])
    path = upstream.publish("large_4mb", Behaviour(throttle_chunk=128 * 1024, throttle_delay=0.02))
    conn = daemon.unix()
    conn.request(
        "POST", "/v1/pull", body=f'{{"handle": "{tfhub(path)}"}}', headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    response.readline()
    assert upstream.server.wait_sent(path, size // 4)
    conn.close()  # gone mid-download
    reply = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)})
    assert reply.status == 200
    assert upstream.requests(path) == 1


def test_bad_input_gets_4xx_json_errors(daemon: Daemon) -> None:
    cases = [
        ("POST", "/v1/resolve", b"{not json", 400, "bad_request"),
        ("POST", "/v1/resolve", b'{"handle": "x", "surprise": 1}', 400, "bad_request"),
        ("POST", "/v1/resolve", b'{"handle": "not-a-handle"}', 400, "bad_handle"),
        ("POST", "/v1/resolve", b'{"handle": "https://tfhub.dev/a/b/1", "sha256": "zz"}', 400, "bad_request"),
        ("POST", "/v1/resolve", b"[1, 2]", 400, "bad_request"),
        ("POST", "/v1/resolve", b'{"handle": "' + b"a" * (5 * 2**20) + b'"}', 413, "request_entity_too_large"),
        ("POST", "/v1/resolve", b'{"handle": "/etc"}', 400, "bad_handle"),
        ("POST", "/v1/pull", b'{"handle": "/root"}', 400, "bad_handle"),
        ("GET", "/v1/models/nothex", None, 400, "bad_request"),
        ("GET", "/v1/models/" + "a" * 64, None, 404, "unknown_model"),
        ("GET", "/v1/nowhere", None, 404, "not_found"),
        ("PUT", "/v1/resolve", b"{}", 405, "method_not_allowed"),
    ]
    for method, path, raw, status, code in cases:
        reply = call(daemon.unix(), method, path, raw=raw)
        assert (reply.status, reply.json()["error"]["code"]) == (status, code), (path, raw and raw[:40])
        assert reply.json()["error"]["message"]


def test_unknown_model_upstream_is_404_and_dead_upstream_is_502(daemon: Daemon, upstream: Upstream) -> None:
    missing = daemon.request("POST", "/v1/resolve", {"handle": tfhub("nobody/nothing/1")})
    assert missing.status == 404 and missing.json()["error"]["code"] == "not_found"
    path = upstream.publish("reusable", Behaviour(status=500))
    dead = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)})
    assert dead.status == 502 and "cached models still work" in dead.json()["error"]["hint"]


def test_checksum_mismatch_is_409(daemon: Daemon, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    reply = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path), "sha256": "0" * 64})
    assert reply.status == 409 and reply.json()["error"]["code"] == "checksum_mismatch"


def test_models_list_get_and_verify(daemon: Daemon, upstream: Upstream) -> None:
    path = upstream.publish("text_embedding")
    entry = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()
    listed = daemon.request("GET", "/v1/models").json()["models"]
    assert [m["id"] for m in listed] == [entry["id"]]
    assert daemon.request("GET", f"/v1/models/{entry['id']}").json()["path"] == entry["path"]
    assert daemon.request("GET", f"/v1/models/{entry['id'][:12]}").json()["id"] == entry["id"]
    results = daemon.request("POST", "/v1/verify", {}).json()["results"]
    assert results == [{"id": entry["id"], "handles": entry["handles"], "problems": [], "healed": False}]


def test_metrics_count_hits_misses_and_bytes(daemon: Daemon, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    for _ in range(3):
        daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)})
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(daemon.request("GET", "/metrics").body.decode())
        for s in family.samples
    }
    assert samples[("hubd_cache_hits_total", ())] == 2
    assert samples[("hubd_cache_misses_total", ())] == 1
    assert samples[("hubd_fetched_bytes_total", (("source", "mirror"),))] == len(upstream.models["reusable"])
    assert samples[("hubd_cache_entries", ())] == 1
    assert samples[("hubd_requests_total", (("code", "200"), ("method", "POST"), ("route", "/v1/resolve")))] == 3


def test_openapi_document_describes_every_route(daemon: Daemon) -> None:
    doc = daemon.request("GET", "/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/health", "/v1/resolve", "/v1/pull", "/v1/models/{id}", "/v1/prefetch", "/metrics"} <= doc[
        "paths"
    ].keys()
    assert "ResolveRequest" in doc["components"]["schemas"]


# -- browsers and admins ------------------------------------------------------------------------------


def test_tcp_refuses_foreign_host_and_any_origin(daemon: Daemon) -> None:
    port = daemon.tcp[0].rsplit(":", 1)[1]
    assert call(daemon.http(), "GET", "/v1/health", headers={"Host": f"127.0.0.1:{port}"}).status == 200
    assert call(daemon.http(), "GET", "/v1/health", headers={"Host": f"localhost:{port}"}).status == 200
    rebinding = call(daemon.http(), "GET", "/v1/health", headers={"Host": f"attacker.example:{port}"})
    assert rebinding.status == 400 and rebinding.json()["error"]["code"] == "bad_host"
    cross_site = call(daemon.http(), "GET", "/v1/health", headers={"Origin": "https://attacker.example"})
    assert cross_site.status == 403
    assert daemon.request("GET", "/v1/health", headers={"Origin": "null"}).status == 403


def test_delete_is_for_admins_only(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    d = start_daemon(settings, tmp_path, "--listen", "127.0.0.1:0", "--token-file", str(token_file))
    try:
        ids = []
        for model in ("reusable", "text_embedding"):
            ids.append(d.request("POST", "/v1/resolve", {"handle": tfhub(upstream.publish(model))}).json()["id"])
        assert call(d.http(), "DELETE", f"/v1/models/{ids[0]}").status == 403
        wrong = call(d.http(), "DELETE", f"/v1/models/{ids[0]}", headers={"Authorization": "Bearer nope"})
        assert wrong.status == 403
        right = call(d.http(), "DELETE", f"/v1/models/{ids[0]}", headers={"Authorization": "Bearer s3cret-token"})
        assert right.status == 200
        assert d.request("DELETE", f"/v1/models/{ids[1]}").status == 200  # the daemon's own uid, on the socket
    finally:
        d.stop()


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/python3").exists(), reason="needs root to act as nobody"
)
def test_admin_group_members_may_delete(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    import grp
    import pwd

    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    public = Path(tempfile.mkdtemp(prefix="hubd-public-"))
    public.chmod(0o755)
    try:
        d = start_daemon(
            settings,
            tmp_path,
            "--socket",
            str(public / "hubd.sock"),
            "--admin-group",
            group,
            env_extra={"HUBD_SOCKET_GROUP": group},  # root's socket is 0660: nobody reaches it through its group
        )
        d.socket_path = public / "hubd.sock"
        try:
            model_id = d.request("POST", "/v1/resolve", {"handle": tfhub(upstream.publish("reusable"))}).json()[
                "id"
            ]
            args = [
                "/usr/bin/python3",
                "-c",
                NOBODY_DELETE,
                str(d.socket_path),
                "DELETE",
                f"/v1/models/{model_id}",
            ]
            result = subprocess.run(
                args, user="nobody", group=group, extra_groups=[], capture_output=True, text=True, check=True
            )
            assert result.stdout.strip() == "200"
        finally:
            d.stop()
    finally:
        shutil.rmtree(public, ignore_errors=True)


SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY_DELETE = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(f"{sys.argv[2]} {sys.argv[3]} HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Length: 0\\r\\n\\r\\n".encode())
print(s.recv(100).split()[1].decode())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root to act as nobody")
def test_other_users_may_resolve_but_not_delete(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    import grp
    import pwd

    public = Path(tempfile.mkdtemp(prefix="hubd-public-"))
    public.chmod(0o755)
    try:
        group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
        env = {"HUBD_SOCKET_GROUP": group}  # root's socket is 0660: nobody reaches it through its group
        d = start_daemon(settings, tmp_path, "--socket", str(public / "hubd.sock"), env_extra=env)
        d.socket_path = public / "hubd.sock"
        try:
            model_id = d.request("POST", "/v1/resolve", {"handle": tfhub(upstream.publish("reusable"))}).json()[
                "id"
            ]

            def as_nobody(method: str, path: str) -> str:
                args = [str(SYSTEM_PYTHON), "-c", NOBODY_DELETE, str(d.socket_path), method, path]
                return subprocess.run(
                    args, user="nobody", group=group, extra_groups=[], capture_output=True, text=True, check=True
                ).stdout.strip()

            assert as_nobody("GET", "/v1/models") == "200"
            assert as_nobody("DELETE", f"/v1/models/{model_id}") == "403"
            assert as_nobody("POST", "/v1/gc") == "403"
            assert as_nobody("POST", "/v1/verify") == "403"  # every model: admins only
            assert d.request("GET", f"/v1/models/{model_id}").status == 200
        finally:
            d.stop()
    finally:
        shutil.rmtree(public, ignore_errors=True)


# -- lifecycle --------------------------------------------------------------------------------------


def test_non_loopback_listen_is_refused(settings: Settings, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hubd", "serve", "--listen", "0.0.0.0:0", "--socket", str(tmp_path / "s.sock")],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "not a loopback address" in result.stderr


def test_second_daemon_on_the_same_socket_is_refused(daemon: Daemon, settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hubd", "serve", "--socket", str(daemon.socket_path)],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "already serving" in result.stderr


@pytest.mark.slow
def test_sigterm_drains_cleans_staging_and_removes_the_socket(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    size = len(upstream.models["large_4mb"])
    path = upstream.publish("large_4mb", Behaviour(throttle_chunk=64 * 1024, throttle_delay=0.02))
    d = start_daemon(settings, tmp_path)
    conn = d.unix()
    conn.request(
        "POST", "/v1/resolve", body=f'{{"handle": "{tfhub(path)}"}}', headers={"Content-Type": "application/json"}
    )
    assert upstream.server.wait_sent(path, size // 4)
    d.proc.send_signal(signal.SIGTERM)
    with contextlib.closing(conn), conn.getresponse() as response:  # in flight: finished, or aborted cleanly
        assert response.status in (200, 500, 503) or response.status >= 400
    assert d.proc.wait(60) == 0
    assert not d.socket_path.exists()
    assert list((settings.cache_dir / "staging").iterdir()) == []
    objects = list((settings.cache_dir / "objects").iterdir())
    assert all((o / "saved_model.pb").is_file() for o in objects)
    assert "hubd stopped" in d.log()


def test_restart_offline_serves_the_cache(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    path = upstream.publish("reusable")
    first = start_daemon(settings, tmp_path)
    entry = first.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()
    assert first.stop() == 0
    upstream.server.reset_counts()
    offline = start_daemon(settings, tmp_path, "--offline", "--mirror", "http://127.0.0.1:9")
    try:
        assert offline.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()["path"] == entry["path"]
        missing = offline.request("POST", "/v1/resolve", {"handle": tfhub("other/model/1")})
        assert missing.status == 503 and missing.json()["error"]["code"] == "not_cached"
        assert "hubd pull" in missing.json()["error"]["hint"]
        assert sum(upstream.server.requests.values()) == 0
    finally:
        offline.stop()


def test_socket_activation_with_a_passed_fd(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    activated = tmp_path / "activated.sock"
    listener.bind(str(activated))
    listener.listen(16)
    fd = listener.fileno()

    def as_systemd(cmd: list[str]) -> list[str]:  # systemd sets LISTEN_PID to the service's own pid
        return ["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *cmd]

    d = start_daemon(
        settings,
        tmp_path,
        wrap=as_systemd,
        popen_extra={"pass_fds": (3,), "preexec_fn": lambda: os.dup2(fd, 3)},
    )
    try:
        assert f"unix:{activated}" in d.status
        path = upstream.publish("reusable")
        reply = call(UnixHTTPConnection(str(activated)), "POST", "/v1/resolve", {"handle": tfhub(path)})
        assert reply.status == 200
        assert not d.socket_path.exists()  # it used the socket it was given, not one of its own
    finally:
        d.stop()
        listener.close()


# -- watching -------------------------------------------------------------------------------------


def test_tampering_is_caught_by_the_watcher_and_healed(daemon: Daemon, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    entry = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()
    shard = Path(entry["path"], "variables", "variables.data-00000-of-00001")
    original = shard.read_bytes()
    shard.parent.chmod(0o755)
    shard.chmod(0o644)
    shard.write_bytes(b"\0" * len(original))  # same size: only a re-hash can tell
    assert upstream.server.wait_requests(path, 2), daemon.log()  # the watcher re-fetched it
    healed = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)}).json()
    assert healed["path"] == entry["path"]
    assert Path(healed["path"], "variables", "variables.data-00000-of-00001").read_bytes() == original
    assert "changed on disk" in daemon.log()


def test_watched_manifest_is_prefetched_and_changes_are_picked_up(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    first, second = upstream.publish("reusable"), upstream.publish("text_embedding")
    manifest = tmp_path / "models.toml"
    manifest.write_text(f'[[model]]\nhandle = "{tfhub(first)}"\npin = true\n')
    d = start_daemon(settings, tmp_path, "--manifest", str(manifest))
    try:
        assert upstream.server.wait_requests(first, 1)
        manifest.write_text(manifest.read_text() + f'\n[[model]]\nhandle = "{tfhub(second)}"\n')
        assert upstream.server.wait_requests(second, 1), d.log()
        entry = d.request("POST", "/v1/resolve", {"handle": tfhub(first)}).json()
        assert entry["pinned"] is True
    finally:
        d.stop()


# -- the CLI against the daemon --------------------------------------------------------------------------


def daemon_env(settings: Settings, daemon: Daemon, tmp_path: Path) -> dict[str, str]:
    env = cli_env(settings)
    env["HUBD_SOCKET"] = str(daemon.socket_path)
    env["HUBD_CACHE_DIR"] = str(tmp_path / "not-the-daemons-cache")  # proves the answers come from the daemon
    return env


def test_cli_goes_through_the_running_daemon(
    daemon: Daemon, settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    env = daemon_env(settings, daemon, tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hubd", *args], env=env, capture_output=True, text=True)

    pulled = run("pull", tfhub(path))
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().startswith(str(settings.cache_dir))
    assert tfhub(path).removeprefix("https://") in run("ls").stdout
    assert run("verify").stdout.startswith("ok")
    assert run("rm", tfhub(path)).stdout.startswith("removed")
    assert not (tmp_path / "not-the-daemons-cache").exists()


def test_prefetch_manifest_with_one_bad_entry(
    daemon: Daemon, settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    good, other = upstream.publish("reusable"), upstream.publish("text_embedding")
    manifest = tmp_path / "course.toml"
    manifest.write_text(
        f'[[model]]\nhandle = "{tfhub(good)}"\nname = "small"\npin = true\n\n'
        f'[[model]]\nhandle = "{tfhub(other)}"\nsha256 = "{upstream.server.sha256(other)}"\n\n'
        '[[model]]\nhandle = "https://tfhub.dev/nobody/missing/1"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "hubd", "prefetch", str(manifest)],
        env=daemon_env(settings, daemon, tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert tfhub(good) in lines, (result.stdout, result.stderr)
    assert lines[tfhub(good)].startswith("ok") and lines[tfhub(other)].startswith("ok")
    assert lines["https://tfhub.dev/nobody/missing/1"].startswith("FAILED")
    assert "2 ok, 1 failed" in result.stderr
    assert f"{tfhub(good)}: download" in result.stderr  # plain progress lines when not a terminal


def test_prefetch_manifest_errors_point_at_the_entry(settings: Settings, tmp_path: Path) -> None:
    manifest = tmp_path / "bad.toml"
    manifest.write_text('[[model]]\nhandle = "https://tfhub.dev/a/b/1"\n\n[[model]]\nsha256 = "abc"\n')
    result = subprocess.run(
        [sys.executable, "-m", "hubd", "prefetch", str(manifest), "--no-daemon"],
        env=cli_env(settings),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "model[1].handle: Field required" in result.stderr
    assert "model[1].sha256" in result.stderr


def test_prefetch_says_when_no_daemon_runs(settings: Settings, tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text('[[model]]\nhandle = "https://tfhub.dev/a/b/1"\n')
    result = subprocess.run(
        [sys.executable, "-m", "hubd", "prefetch", str(manifest)],
        env=cli_env(settings),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "no hubd daemon answers" in result.stderr and "--no-daemon" in result.stderr


def test_prefetch_without_daemon_runs_in_process(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    path = upstream.publish("reusable")
    manifest = tmp_path / "m.json"
    manifest.write_text(f'{{"model": [{{"handle": "{tfhub(path)}"}}]}}')
    result = subprocess.run(
        [sys.executable, "-m", "hubd", "prefetch", str(manifest), "--no-daemon"],
        env=cli_env(settings),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1] == "ok"


def test_prefetch_draws_one_bar_per_model_on_a_terminal(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    slow = Behaviour(throttle_chunk=256 * 1024, throttle_delay=0.01)
    handles = [tfhub(upstream.publish("large_4mb", slow)), tfhub(upstream.publish("reusable"))]
    manifest = tmp_path / "m.toml"
    manifest.write_text("".join(f'[[model]]\nhandle = "{h}"\n' for h in handles))
    code, drawn, _ = run_on_terminal(
        [sys.executable, "-m", "hubd", "prefetch", str(manifest), "--no-daemon"], cli_env(settings)
    )
    assert code == 0
    assert b"\x1b[1A\x1b[2K" in drawn and "━".encode() in drawn  # lines redrawn in place
    assert all(h[-20:].encode() in drawn for h in handles) and b"done" in drawn  # long handles: their end


def test_an_unexpected_error_ends_the_stream_with_an_error_event(settings: Settings) -> None:
    """Found by the 64-client load test: a bug in one resolve (a ValueError) escaped the NDJSON stream after its
    headers were sent, and four clients waited for their 120 s timeout. Now the stream ends with an error event."""
    import asyncio

    from hubd.engine import Engine
    from hubd.manifest import ManifestEntry
    from hubd.prefetch import resolve_many

    class Failing(Engine):
        async def resolve(self, handle: str, *args: Any, **kwargs: Any) -> Any:
            raise ValueError("max() arg is an empty sequence")

    async def events() -> list[Any]:
        engine = Failing(settings)
        return [event async for event in resolve_many(engine, [ManifestEntry(handle="https://tfhub.dev/a/b/1")])]

    streamed = asyncio.run(events())
    assert [event.event for event in streamed] == ["error", "summary"]
    assert streamed[0].error.code == "internal_error" and "ValueError" in streamed[0].error.message
