"""Attacks on what the shared cache trusts (issue #9, items 1, 2, 6 and 9), each performed by an unprivileged
local user against a real daemon, and shown to fail.

- refs: a handle's ref is written only by a fetch of that handle from its own origin; a Kaggle twin only comes
  from Kaggle itself or the configured mirror (scheme, host and port); a cached ref never changes its model;
- pins: a `sha256` pin is checked against bytes hubd hashed itself, or a mirror's signed (or https) word;
- quota: nothing is evicted for a download that cannot fit, nor for bytes a server only announced;
- secrets: a handle carrying credentials is refused, so none is stored or listed.

The attacker talks to the daemon over its socket (the socket's group is the attacker's, as for any user allowed
to use the cache) and runs servers of its own on 127.0.0.1 ports, as any local user can.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hubd_client.handles import Source

from hubd.config import Settings
from hubd.store import Ref, Store
from tests.conftest import Upstream
from tests.daemon import Daemon, start_daemon
from tests.hosting import Behaviour
from tests.test_engine import resolve
from tests.users import LocalUser, needs_root, shared_dir

SYSTEM_PYTHON = Path("/usr/bin/python3")  # what an unprivileged user runs: the attacks need only the stdlib
pytestmark = [needs_root, pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs /usr/bin/python3")]

# An HTTP/1.1 request over the daemon's Unix socket: prints {"status", "body"}.
CLIENT = r"""
import http.client, json, socket, sys

class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])

conn = Unix("localhost", timeout=120)
conn.request(sys.argv[2], sys.argv[3], body=sys.argv[4] or None, headers={"Content-Type": "application/json"})
response = conn.getresponse()
print(json.dumps({"status": response.status, "body": response.read().decode()}))
"""

# The attacker's server: routes from a JSON file ({path: [kind, ...]}); prints its port, then one line per request.
SERVER = r"""
import http.server, json, sys

routes = json.load(open(sys.argv[1]))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("GET", self.path, flush=True)
        kind, *args = routes.get(self.path.split("?")[0], ["missing"])
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", args[0].replace("{port}", str(port)))
            self.end_headers()
        elif kind == "file":
            data = open(args[0], "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            for name, value in args[1].items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        elif kind == "lie":  # announce a huge archive, send a few bytes, hang up
            self.send_response(200)
            self.send_header("Content-Length", str(args[0]))
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + bytes(args[1] - 2))
            self.close_connection = True
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
port = server.server_address[1]
print(port, flush=True)
server.serve_forever()
"""


class AttackServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[str] = []
        """Filled in when the server has stopped: every request it got."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def attacker_server(user: LocalUser, workdir: Path, routes: dict[str, list[Any]]) -> Iterator[AttackServer]:
    """Run SERVER as `user`; ready when it prints its port (no sleeps); stopped, and its log read, at the end."""
    routes_file = workdir / f"routes-{len(list(workdir.glob('routes-*')))}.json"
    routes_file.write_text(json.dumps(routes))
    routes_file.chmod(0o644)
    proc = subprocess.Popen(
        [str(SYSTEM_PYTHON), "-c", SERVER, str(routes_file)],
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "HOME": str(user.home), "LANG": "C.UTF-8"},
        cwd=user.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            proc.kill()
            raise RuntimeError(f"the attacker's server did not start: {line}{proc.communicate()[1]}")
        server = AttackServer(int(line))
        yield server
    finally:
        proc.terminate()
        out, _err = proc.communicate(timeout=30)
    server.requests = [line for line in out.splitlines() if line.startswith("GET")]


@contextmanager
def shared_daemon(
    settings: Settings, user: LocalUser, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Daemon]:
    """A daemon on a cache and socket in a directory other users can reach; `user` may use its socket."""
    with shared_dir() as shared:
        daemon = start_daemon(
            settings.model_copy(update={"cache_dir": shared / "cache"}), shared, *extra, env_extra=env
        )
        try:
            os.chown(daemon.socket_path, -1, user.gid)  # the attacker is a legitimate user of the cache
            daemon.socket_path.chmod(0o660)
            yield daemon
        finally:
            daemon.stop()


def ask_as(user: LocalUser, daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """`method path` on the daemon's socket, sent by `user`: (status, JSON body)."""
    payload = json.dumps(body) if body is not None else ""
    done = user.run([str(SYSTEM_PYTHON), "-c", CLIENT, str(daemon.socket_path), method, path, payload])
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    return reply["status"], json.loads(reply["body"])


def resolve_in(daemon: Daemon, handle: str, sha256: str | None = None) -> tuple[int, Any]:
    body = {"handle": handle, **({"sha256": sha256} if sha256 else {})}
    reply = daemon.request("POST", "/v1/resolve", body)
    return reply.status, reply.json()


def view_link(daemon: Daemon, handle: str) -> str:
    """Where the tensorflow_hub cache view sends an unmodified tensorflow_hub for `handle`."""
    cache = Path(daemon.log_path.parent, "cache")
    return os.readlink(cache / "tfhub_modules" / hashlib.sha1(handle.encode()).hexdigest())


def shared_file(daemon: Daemon, name: str, data: bytes) -> Path:
    path = daemon.log_path.parent / name
    path.write_bytes(data)
    path.chmod(0o644)
    return path


def _owner(request: pytest.FixtureRequest) -> str:
    return "acme" + hashlib.sha1(request.node.name.encode()).hexdigest()[:8]


# -- 1. refs ---------------------------------------------------------------------------------------------


def test_ref_cannot_be_repointed_by_a_server_on_another_local_port(
    settings: Settings, upstream: Upstream, attacker: LocalUser, request: pytest.FixtureRequest
) -> None:
    owner = _owner(request)
    upstream.publish("reusable", path=f"models/{owner}/net/tensorflow2/small/1")
    kaggle = f"https://www.kaggle.com/models/{owner}/net/TensorFlow2/small/1"
    long_path = f"models/{owner}/net/frameworks/tensorflow2/variations/small/versions/1"
    with shared_daemon(settings, attacker) as daemon:
        status, cached = resolve_in(daemon, kaggle)
        assert status == 200, cached
        link = view_link(daemon, kaggle)
        forged = shared_file(daemon, "forged.tar.gz", upstream.models["text_embedding"])
        routes: dict[str, list[Any]] = {
            "/evil/net/1": ["redirect", f"http://127.0.0.1:{{port}}/{long_path}?tf-hub-format=compressed"],
            f"/{long_path}": ["file", str(forged), {}],
        }
        with attacker_server(attacker, daemon.log_path.parent, routes) as evil:
            # The mirror's host name on another port is another server: not allowed over plain http...
            status, error = ask_as(attacker, daemon, "POST", "/v1/resolve", {"handle": f"{evil.url}/evil/net/1"})
            assert (status, error["error"]["code"]) == (400, "disallowed_host"), error
            # ...and an allowed server's redirect to it is refused before it is followed.
            upstream.publish("reusable", Behaviour(redirect_to=f"{evil.url}/{long_path}"), path=f"{owner}/hop/1")
            status, error = ask_as(
                attacker, daemon, "POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{owner}/hop/1"}
            )
            assert (status, error["error"]["code"]) == (400, "disallowed_host"), error
        assert evil.requests == []  # the daemon never contacted the attacker's port
        assert resolve_in(daemon, kaggle)[1]["id"] == cached["id"]
        assert view_link(daemon, kaggle) == link


def test_a_twin_never_replaces_a_cached_ref(
    settings: Settings, upstream: Upstream, attacker: LocalUser, request: pytest.FixtureRequest
) -> None:
    owner = _owner(request)
    upstream.publish("reusable", path=f"models/{owner}/net/tensorflow2/small/1")
    kaggle = f"https://www.kaggle.com/models/{owner}/net/TensorFlow2/small/1"
    # The long spelling of the same Kaggle name serves other files; a tfhub.dev handle redirects there.
    long_path = f"models/{owner}/net/frameworks/tensorflow2/variations/small/versions/1"
    upstream.publish("text_embedding", path=long_path)
    upstream.publish("reusable", Behaviour(redirect_to=f"{upstream.server.url}/{long_path}"), path=f"{owner}/a/1")
    with shared_daemon(settings, attacker) as daemon:
        cached = resolve_in(daemon, kaggle)[1]
        link = view_link(daemon, kaggle)
        status, other = ask_as(
            attacker, daemon, "POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{owner}/a/1"}
        )
        assert status == 200, other
        assert other["id"] != cached["id"]
        assert (
            f"kaggle.com/models/{owner}/net/tensorflow2/small/1"
            not in daemon.request("GET", f"/v1/models/{other['id']}").json()["handles"]
        )
        assert resolve_in(daemon, kaggle)[1]["id"] == cached["id"]
        assert view_link(daemon, kaggle) == link


def test_a_cached_handle_never_silently_changes_its_model(
    settings: Settings, upstream: Upstream, attacker: LocalUser
) -> None:
    path = upstream.publish("reusable")
    handle = f"https://tfhub.dev/{path}"
    with shared_daemon(settings, attacker) as daemon:
        cached = resolve_in(daemon, handle)[1]
        upstream.server.add(path, upstream.models["text_embedding"])  # the same name now serves another model
        status, error = ask_as(
            attacker, daemon, "POST", "/v1/resolve", {"handle": handle, "sha256": upstream.server.sha256(path)}
        )
        assert (status, error["error"]["code"]) == (409, "ref_conflict"), error
        assert "hubd rm" in error["error"]["hint"]
        assert resolve_in(daemon, handle)[1]["id"] == cached["id"]


# -- 2. pins through a mirror -------------------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "wrong-signature"])
def test_a_lying_mirror_cannot_satisfy_a_sha256_pin(
    settings: Settings, upstream: Upstream, attacker: LocalUser, tmp_path: Path, keyed: bool
) -> None:
    pinned = upstream.publish("reusable")
    original = upstream.server.sha256(pinned)
    # The digest hubd gives the forged tree, so the lie about it is exact.
    forged_digest = resolve(
        settings.model_copy(update={"cache_dir": tmp_path / "scratch"}),
        f"https://tfhub.dev/{upstream.publish('text_embedding')}",
    ).tree_digest
    key = tmp_path / "mirror.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    with shared_dir() as workdir:
        forged = workdir / "forged.tar.gz"
        forged.write_bytes(upstream.models["text_embedding"])
        forged.chmod(0o644)
        claim = {
            "X-Hubd-Archive-Sha256": original,
            "X-Hubd-Tree-Digest": forged_digest,
            "X-Hubd-Claim-Signature": "0" * 64,
        }
        with attacker_server(attacker, workdir, {f"/{pinned}": ["file", str(forged), claim]}) as mirror:
            lan = settings.model_copy(update={"mirror": mirror.url})
            env = {"HUBD_MIRROR_KEY_FILE": str(key)} if keyed else None
            with shared_daemon(lan, attacker, env=env) as daemon:
                status, error = resolve_in(daemon, f"https://tfhub.dev/{pinned}", sha256=original)
                if keyed:  # with a shared key, no answer from the mirror is taken without its valid signature
                    assert (status, error["error"]["code"]) == (502, "mirror_unsigned"), error
                else:
                    assert (status, error["error"]["code"]) == (409, "checksum_mismatch"), error
                    assert "HUBD_MIRROR_KEY_FILE" in error["error"]["hint"]
                assert daemon.request("GET", "/v1/models").json()["models"] == []
        assert mirror.requests  # the forged archive was served, and refused


# -- 6. cache wipe ----------------------------------------------------------------------------------------


VICTIMS = ("reusable", "text_embedding")


def _victims(daemon: Daemon, upstream: Upstream) -> list[dict[str, Any]]:
    return [resolve_in(daemon, f"https://tfhub.dev/{upstream.publish(m)}")[1] for m in VICTIMS]


def _still_cached(daemon: Daemon, entries: list[dict[str, Any]]) -> bool:
    return all(
        daemon.request("GET", f"/v1/models/{e['id']}").status == 200 and Path(e["path"]).is_dir() for e in entries
    )


def test_a_model_that_can_never_fit_evicts_nothing(
    settings: Settings, upstream: Upstream, attacker: LocalUser, models: dict[str, bytes]
) -> None:
    quota = 3 * 2**20  # the victims fit; the 4 MiB model never can, even in an empty cache
    assert len(models["large_4mb"]) > quota
    with shared_daemon(settings, attacker, "--max-size", str(quota), env={"HUBD_GC_GRACE": "0"}) as daemon:
        victims = _victims(daemon, upstream)
        big = f"https://tfhub.dev/{upstream.publish('large_4mb')}"
        status, error = ask_as(attacker, daemon, "POST", "/v1/resolve", {"handle": big})
        assert (status, error["error"]["code"]) == (507, "over_quota"), error
        assert _still_cached(daemon, victims)


def test_a_lying_content_length_evicts_nothing(
    settings: Settings, upstream: Upstream, attacker: LocalUser, tmp_path: Path
) -> None:
    scratch = settings.model_copy(update={"cache_dir": tmp_path / "scratch"})
    used = sum(resolve(scratch, f"https://tfhub.dev/{upstream.publish(m)}").size_bytes for m in VICTIMS)
    quota = used + 64 * 1024  # room for 64 KiB more; the lie says the download needs all of the quota
    with (
        shared_dir() as workdir,
        attacker_server(attacker, workdir, {"/liar/1": ["lie", quota - 1, 4096]}) as liar,
    ):
        env = {
            "HUBD_GC_GRACE": "0",
            "HUBD_RETRIES": "0",
            "HUBD_HTTP_HOSTS": f"127.0.0.1:{liar.port}",  # an allowed upstream, that lies
        }
        with shared_daemon(settings, attacker, "--max-size", str(quota), env=env) as daemon:
            victims = _victims(daemon, upstream)
            status, error = ask_as(attacker, daemon, "POST", "/v1/resolve", {"handle": f"{liar.url}/liar/1"})
            assert status >= 400, error
            assert _still_cached(daemon, victims)
    assert liar.requests  # the lie was told, and cost nobody a model


# -- 9. secrets ------------------------------------------------------------------------------------------------

FIND_SECRET = r"""
import os, sys
found = []
for folder, _dirs, files in os.walk(sys.argv[1]):
    for name in files:
        try:
            if sys.argv[2].encode() in open(os.path.join(folder, name), "rb").read():
                found.append(os.path.join(folder, name))
        except OSError:
            pass
print("\n".join(found))
"""


def test_credentials_in_a_handle_are_never_stored_or_listed(
    settings: Settings, upstream: Upstream, attacker: LocalUser
) -> None:
    path = upstream.publish("reusable")
    with shared_daemon(settings, attacker) as daemon:
        for handle in (
            f"http://alice:s3cret@127.0.0.1:{upstream.server.port}/{path}",
            f"https://tfhub.dev/{path}?token=s3cret",
            f"https://tfhub.dev/{path}#s3cret",
        ):
            status, error = resolve_in(daemon, handle)
            assert (status, error["error"]["code"]) == (400, "bad_handle"), error
            assert error["error"]["hint"] and "s3cret" not in json.dumps(error)
        assert resolve_in(daemon, f"https://tfhub.dev/{path}")[0] == 200  # the handle without them works
        status, listed = ask_as(attacker, daemon, "GET", "/v1/models")
        assert status == 200 and len(listed["models"]) == 1 and "s3cret" not in json.dumps(listed)
        cache = daemon.log_path.parent / "cache"
        found = attacker.run([str(SYSTEM_PYTHON), "-c", FIND_SECRET, str(cache), "s3cret"])
        assert found.returncode == 0 and found.stdout.strip() == "", found


def test_credentials_an_older_hubd_stored_are_forgotten_at_start(
    settings: Settings, upstream: Upstream, attacker: LocalUser
) -> None:
    path = upstream.publish("reusable")
    with shared_dir() as workdir:
        cache = settings.model_copy(update={"cache_dir": workdir / "cache"})
        entry = resolve(cache, f"https://tfhub.dev/{path}")
        store = Store(cache.cache_dir)
        leaked = [  # what an older hubd wrote for these two handles
            (f"alice:s3cret@127.0.0.1:{upstream.server.port}/{path}", f"http://alice:s3cret@127.0.0.1:1/{path}"),
            (f"tfhub.dev/{path}", f"https://tfhub.dev/{path}?token=s3cret"),
        ]
        for canonical, handle in leaked:
            key = Source("url", handle, canonical).ref_key
            store.write_ref(key, Ref(canonical, handle, entry.id, entry.archive_sha256, 0.0))
        daemon = start_daemon(cache, workdir)
        try:
            os.chown(daemon.socket_path, -1, attacker.gid)
            daemon.socket_path.chmod(0o660)
            status, listed = ask_as(attacker, daemon, "GET", "/v1/models")
            assert status == 200 and "s3cret" not in json.dumps(listed)
            found = attacker.run([str(SYSTEM_PYTHON), "-c", FIND_SECRET, str(cache.cache_dir), "s3cret"])
            assert found.returncode == 0 and found.stdout.strip() == "", found
        finally:
            daemon.stop()
