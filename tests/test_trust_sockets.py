"""The socket and API trust boundary (#9 items 3, 7, 8; #13 item 2), attacked by real unprivileged users.

- Socket hijack: another user pre-creates /tmp/hubd-UID with a fake server; the victim's daemon refuses to start
  there and the victim's client refuses to talk to it.
- Socket modes: a user's socket is 0600 in a 0700 directory of their own; root's is 0660 for its group.
- Path probing: every local path gets one fixed answer from the API, whatever exists on the daemon's disk.
- Container root: uid 0 in another user or PID namespace is not an admin of the host's cache.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubd.config import Settings
from tests.conftest import Upstream
from tests.daemon import Daemon, start_daemon
from tests.users import REPO, LocalUser, shared_dir

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare(1)"
)

#: A fake hubd, run by the attacker: makes the directory, serves its own "model" path to whoever asks.
FAKE_SERVER = r"""
import json, os, socket, sys
directory, evil = sys.argv[1], sys.argv[2]
os.makedirs(evil, exist_ok=True)
os.makedirs(directory, exist_ok=True)
os.chmod(directory, 0o777)
path = os.path.join(directory, "hubd.sock")
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    print("REQUEST", conn.recv(65536).split(b"\r\n", 1)[0].decode(), flush=True)
    body = json.dumps({"path": evil, "relpath": "", "id": "0" * 64}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
    conn.sendall(head % len(body) + body)
    conn.close()
"""

#: One raw HTTP request over a Unix socket; prints the status line's code and the body.
RAW_REQUEST = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
body = sys.argv[4].encode()
head = f"{sys.argv[2]} {sys.argv[3]} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
data = b""
while chunk := sock.recv(65536):
    data += chunk
head, _, payload = data.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": payload.decode()}))
"""

#: The same, for many POSTs in one process (one interpreter start-up as the user, not one per request).
RAW_REQUESTS = r"""
import json, socket, sys
for route, body in json.loads(sys.argv[2]):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    body = body.encode()
    head = f"POST {route} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    print(json.dumps({"status": int(head.split()[1]), "body": payload.decode()}))
"""
ROUTES_TAKING_HANDLES = ("/v1/resolve", "/v1/pull", "/v1/verify")


#: Runs Python code as another user with this interpreter and its packages, which may live where that user cannot
#: read (a venv under /root): what the code needs is imported first, then the process drops to the user for good.
AS_USER = """
import os, sys
uid, gid, groups, code = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
import http.client, json, socket, struct, asyncio, ctypes, logging.handlers, concurrent.futures.thread
import hubd.cli, hubd.server.daemon, hubd.api_client, hubd.engine, hubd.watch, aiohttp.web
import hubd_client, hubd_client.resolver, hubd_client.offline, hubd_client.transport
os.setgroups([int(g) for g in groups.split(",") if g])
os.setgid(gid)
os.setuid(uid)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: as any process the user starts (setuid cleared it)
sys.argv = ["-c", *sys.argv[5:]]
exec(compile(code, "<as-user>", "exec"))
"""


def _user_env(user: LocalUser, env: dict[str, str] | None) -> dict[str, str]:
    """A minimal environment (no XDG_RUNTIME_DIR, no HUBD_* settings of root's) plus `env`."""
    base = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(user.home),
        "USER": user.name,
        "LANG": "C.UTF-8",
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'client'}",
        "PYTHONUNBUFFERED": "1",
    }
    return {**base, **(env or {})}


def _as_user_args(user: LocalUser, code: str, argv: tuple[str, ...], groups: tuple[int, ...] = ()) -> list[str]:
    return [sys.executable, "-c", AS_USER, str(user.uid), str(user.gid), ",".join(map(str, groups)), code, *argv]


def run_as(
    user: LocalUser, code: str, *argv: str, env: dict[str, str] | None = None, groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run Python `code` as `user` (see AS_USER), with supplementary `groups`, and wait for it."""
    args = _as_user_args(user, code, argv, groups)
    return subprocess.run(
        args, env=_user_env(user, env), capture_output=True, text=True, cwd=user.home, timeout=120
    )


def spawn(
    user: LocalUser, code: str, *argv: str, env: dict[str, str] | None = None, groups: tuple[int, ...] = ()
) -> subprocess.Popen[str]:
    """Start Python `code` as `user`, stdout and stderr on one pipe."""
    return subprocess.Popen(
        _as_user_args(user, code, argv, groups),
        env=_user_env(user, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=user.home,
    )


HUBD_CLI = "import sys, hubd.cli\nsys.exit(hubd.cli.main(sys.argv[1:]))"


def wait_for_line(proc: subprocess.Popen[str], marker: str) -> None:
    """Read the process's output until a line containing `marker` (its readiness), or fail with what it said."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"{marker!r} never came; output:\n{''.join(seen)}")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    return out


@pytest.fixture
def victim_default_dir(victim: LocalUser) -> Iterator[Path]:
    """/tmp/hubd-<victim uid>: the default socket directory of the victim without XDG_RUNTIME_DIR."""
    path = Path(f"/tmp/hubd-{victim.uid}")
    shutil.rmtree(path, ignore_errors=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_server(attacker: LocalUser, victim_default_dir: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The attacker's server on the victim's default socket, in a directory the attacker made first."""
    evil = Path(f"/tmp/hubd-evil-{uuid.uuid4().hex[:8]}")
    proc = spawn(attacker, FAKE_SERVER, str(victim_default_dir), str(evil))
    try:
        wait_for_line(proc, "ready")
        yield proc, evil
    finally:
        stop(proc)
        shutil.rmtree(evil, ignore_errors=True)


# -- item 3: socket hijack ------------------------------------------------------------------------------


def test_users_daemon_refuses_a_socket_directory_another_user_made(
    victim: LocalUser,
    attacker: LocalUser,
    fake_server: tuple[subprocess.Popen[str], Path],
    victim_default_dir: Path,
) -> None:
    cache = victim.home / f"cache-{uuid.uuid4().hex[:8]}"
    try:
        result = run_as(victim, HUBD_CLI, "serve", env={"HUBD_CACHE_DIR": str(cache)})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("hubd: error:")]
    assert f"{victim_default_dir} belongs to {attacker.name}" in line and "hint:" in line
    assert (victim_default_dir / "hubd.sock").exists()  # the daemon neither used nor removed the attacker's socket
    assert not cache.exists()  # refused before it touched anything
    assert "REQUEST" not in stop(fake_server[0])


@pytest.mark.parametrize("case", ["writable-by-others", "not-writable"])
def test_users_daemon_explains_an_unusable_socket_directory_in_one_line(victim: LocalUser, case: str) -> None:
    with shared_dir(mode=0o755) as public:  # root's: the victim may not create anything in it
        folder = public / case
        if case == "writable-by-others":
            folder.mkdir()
            os.chown(folder, victim.uid, victim.gid)
            folder.chmod(0o777)
        env = {"HUBD_SOCKET": str(folder / "hubd.sock"), "HUBD_CACHE_DIR": str(victim.home / "never-made")}
        result = run_as(victim, HUBD_CLI, "serve", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("hubd: error:") and "(hint: " in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    expected = "is writable by others (mode 0777)" if case == "writable-by-others" else "Permission denied"
    assert expected in result.stderr


def test_users_client_refuses_the_attackers_socket_and_never_loads_its_model(
    victim: LocalUser, attacker: LocalUser, fake_server: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, evil = fake_server
    code = (
        "import sys, hubd_client\n"
        "try:\n    print('LOADED', hubd_client.resolve(sys.argv[1]))\n"
        "except hubd_client.DaemonUnavailable as exc:\n    print('REFUSED', exc)\n"
    )
    empty_cache = str(victim.home / "no-cache")
    result = run_as(victim, code, "https://tfhub.dev/google/nnlm-en-dim50/2", env={"HUBD_CACHE_DIR": empty_cache})
    assert str(evil) not in result.stdout, result.stdout
    assert result.stdout.startswith("REFUSED"), result.stdout + result.stderr
    assert "refusing the hubd socket" in result.stdout and f"belongs to {attacker.name}" in result.stdout
    # the CLI says so too, as one line, instead of silently working on a cache of its own
    cli = run_as(victim, HUBD_CLI, "pull", "https://tfhub.dev/google/nnlm-en-dim50/2")
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert cli.stderr.startswith("hubd: error: refusing the hubd socket"), cli.stderr
    assert "REQUEST" not in stop(proc)  # the fake daemon was never even asked


def test_client_refuses_a_listener_run_by_another_user_even_in_a_trusted_directory(
    victim: LocalUser, attacker: LocalUser
) -> None:
    """Root made the directory and bound the socket, but the attacker listens on it: the kernel names the
    listener (SO_PEERCRED), so the client still refuses."""
    with shared_dir(mode=0o755) as public:
        import socket

        path = public / "hubd.sock"
        bound = socket.socket(socket.AF_UNIX)
        bound.bind(str(path))
        path.chmod(0o666)
        listen = (
            "import socket, sys\ns = socket.socket(fileno=3)\ns.listen(8)\nprint('ready', flush=True)\n"
            "while True:\n    s.accept()[0].close()\n"
        )
        proc = subprocess.Popen(
            _as_user_args(attacker, listen, ()),
            env=_user_env(attacker, None),
            pass_fds=(3,),
            preexec_fn=lambda: os.dup2(bound.fileno(), 3),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for_line(proc, "ready")
            code = "import sys\nfrom hubd_client import transport\ntransport.request('GET', '/v1/health')"
            result = run_as(victim, code, env={"HUBD_SOCKET": str(path)})
        finally:
            stop(proc)
            bound.close()
    assert result.returncode != 0
    assert "Untrusted" in result.stderr and f"served by {attacker.name}" in result.stderr, result.stderr


def test_users_daemon_makes_a_private_directory_and_a_0600_socket(
    victim: LocalUser, attacker: LocalUser, victim_default_dir: Path
) -> None:
    cache = victim.home / f"cache-{uuid.uuid4().hex[:8]}"
    proc = spawn(victim, HUBD_CLI, "serve", env={"HUBD_CACHE_DIR": str(cache)})
    try:
        wait_for_line(proc, "hubd ready")
        info, sock = victim_default_dir.stat(), (victim_default_dir / "hubd.sock").stat()
        assert (info.st_uid, info.st_mode & 0o777) == (victim.uid, 0o700)
        assert (sock.st_uid, sock.st_mode & 0o777) == (victim.uid, 0o600)
        ok = run_as(victim, "from hubd_client import transport; print(transport.request('GET', '/v1/health')[0])")
        assert ok.stdout.strip() == "200", ok.stderr
        other = run_as(attacker, RAW_REQUEST, str(victim_default_dir / "hubd.sock"), "GET", "/v1/health", "")
        assert other.returncode != 0 and "PermissionError" in other.stderr
    finally:
        stop(proc)
        shutil.rmtree(cache, ignore_errors=True)


def _ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=False, capture_output=True)
        return grp.getgrnam(name).gr_gid


def test_roots_socket_is_for_the_hubd_users_group_only(
    settings: Settings, victim: LocalUser, attacker: LocalUser
) -> None:
    gid = _ensure_group("hubd-users")
    with shared_dir(mode=0o755) as public:
        d = start_daemon(settings, public)
        try:
            info = d.socket_path.stat()
            assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, gid, 0o660)
            outsider = run_as(attacker, RAW_REQUEST, str(d.socket_path), "GET", "/v1/health", "")
            assert outsider.returncode != 0 and "PermissionError" in outsider.stderr
            member = run_as(victim, RAW_REQUEST, str(d.socket_path), "GET", "/v1/health", "", groups=(gid,))
            assert json.loads(member.stdout)["status"] == 200, member.stderr
        finally:
            d.stop()


# -- item 7: path probing -------------------------------------------------------------------------------


def test_local_paths_all_get_one_answer_whatever_exists(
    settings: Settings, attacker: LocalUser, upstream: Upstream
) -> None:
    with shared_dir(mode=0o755) as public:
        d = start_daemon(settings, public, env_extra={"HUBD_SOCKET_GROUP": grp.getgrgid(attacker.gid).gr_name})
        try:
            probes = [
                "/etc",
                "/etc/no-such-dir",
                "/root",
                "/root/.ssh",
                "./tests",
                "./no-such",
                "../main",
                "~root",
                "~nosuchuser/x",
                "file:///etc",
                "file:///nope",
                "tests",  # exists relative to the daemon's working directory
                "no-such-relative",
                ".",
                "..",
            ]
            requests = [
                (route, json.dumps({"handle": probe})) for route in ROUTES_TAKING_HANDLES for probe in probes
            ]
            result = run_as(attacker, RAW_REQUESTS, str(d.socket_path), json.dumps(requests))
            assert result.returncode == 0, result.stderr
            answers = result.stdout.splitlines()
            assert len(answers) == len(requests)
            distinct = set(answers)
            assert len(distinct) == 1, distinct
            reply = json.loads(distinct.pop())
            assert reply["status"] == 400 and json.loads(reply["body"])["error"]["code"] == "bad_handle"
            remote = json.dumps({"handle": upstream.handle(upstream.publish("reusable"))})
            fetched = run_as(attacker, RAW_REQUEST, str(d.socket_path), "POST", "/v1/resolve", remote)
            assert json.loads(fetched.stdout)["status"] == 200  # remote handles still work for the same user
        finally:
            d.stop()


# -- item 8: container root -----------------------------------------------------------------------------


def _as_root_in(namespace: list[str], d: Daemon, method: str, path: str) -> int:
    """A request by uid 0, run inside `unshare <namespace>` (or on the host when empty)."""
    args = [*namespace, sys.executable, "-c", RAW_REQUEST, str(d.socket_path), method, path, "{}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["status"])


CONTAINERS = {
    "user-namespace": ["unshare", "--user", "--map-root-user"],
    "pid-namespace": ["unshare", "--pid", "--fork"],
}


@needs_unshare
@pytest.mark.parametrize("container", list(CONTAINERS), ids=list(CONTAINERS))
def test_root_in_a_container_is_not_an_admin(
    settings: Settings, upstream: Upstream, tmp_path: Path, container: str
) -> None:
    d = start_daemon(settings, tmp_path)
    try:
        ids = [
            d.request("POST", "/v1/resolve", {"handle": upstream.handle(upstream.publish(m))}).json()["id"]
            for m in ("reusable", "text_embedding")
        ]
        namespace = CONTAINERS[container]
        assert _as_root_in(namespace, d, "GET", "/v1/models") == 200  # it may still use the cache
        assert _as_root_in(namespace, d, "DELETE", f"/v1/models/{ids[0]}") == 403
        assert _as_root_in(namespace, d, "POST", "/v1/gc") == 403
        assert d.request("GET", f"/v1/models/{ids[0]}").status == 200
        assert _as_root_in([], d, "DELETE", f"/v1/models/{ids[0]}") == 200  # the same uid on the host
        assert _as_root_in([], d, "POST", "/v1/gc") == 200
    finally:
        d.stop()


@needs_unshare
def test_foreign_namespaces_are_trusted_only_when_configured(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    d = start_daemon(settings, tmp_path, env_extra={"HUBD_TRUST_FOREIGN_NAMESPACES": "1"})
    try:
        model_id = d.request("POST", "/v1/resolve", {"handle": upstream.handle(upstream.publish("reusable"))})
        path = f"/v1/models/{model_id.json()['id']}"
        assert _as_root_in(CONTAINERS["user-namespace"], d, "DELETE", path) == 200
    finally:
        d.stop()


#: RAW_REQUEST, first moved into a user namespace of its own where the caller is root, as in a rootless container.
IN_USER_NAMESPACE = (
    r"""
import ctypes, os, sys
uid, gid = os.getuid(), os.getgid()
if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
    with open(f"/proc/self/{name}", "w") as file:
        file.write(text)
assert os.getuid() == 0
"""
    + RAW_REQUEST
)


def test_an_unprivileged_daemon_tells_a_container_from_the_host_without_ptrace(
    settings: Settings, upstream: Upstream, victim: LocalUser, attacker: LocalUser
) -> None:
    """As the system service runs (as `hubd`, no capabilities): the daemon cannot read other users'
    /proc/PID/ns links, and still refuses an admin-group member who connects from a user namespace."""
    group = grp.getgrgid(attacker.gid).gr_name
    folder = Path(tempfile.mkdtemp(prefix="hubd-victim-", dir="/tmp"))
    os.chown(folder, victim.uid, victim.gid)
    folder.chmod(0o755)
    env = {
        "HUBD_SOCKET": str(folder / "hubd.sock"),
        "HUBD_SOCKET_GROUP": group,
        "HUBD_ADMIN_GROUP": group,
        "HUBD_CACHE_DIR": str(victim.home / f"cache-{uuid.uuid4().hex[:8]}"),
        "HUBD_MIRROR": settings.mirror or "",
        "HUBD_HTTP_HOSTS": "127.0.0.1",
    }
    proc = spawn(victim, HUBD_CLI, "serve", env=env, groups=(attacker.gid,))
    try:
        wait_for_line(proc, "hubd ready")
        handle = json.dumps({"handle": upstream.handle(upstream.publish("reusable"))})
        resolved = run_as(victim, RAW_REQUEST, env["HUBD_SOCKET"], "POST", "/v1/resolve", handle)
        model = f"/v1/models/{json.loads(json.loads(resolved.stdout)['body'])['id']}"
        contained = run_as(attacker, IN_USER_NAMESPACE, env["HUBD_SOCKET"], "DELETE", model, "")
        assert json.loads(contained.stdout)["status"] == 403, contained.stdout + contained.stderr
        on_host = run_as(attacker, RAW_REQUEST, env["HUBD_SOCKET"], "DELETE", model, "")
        assert json.loads(on_host.stdout)["status"] == 200, on_host.stdout + on_host.stderr
    finally:
        stop(proc)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(env["HUBD_CACHE_DIR"], ignore_errors=True)
