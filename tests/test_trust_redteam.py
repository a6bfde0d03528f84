"""What a red-team pass after issue #9 still broke, each attack performed by an unprivileged local user against a
real daemon (or the client library), and shown to fail:

1. a cache directory another user made first (or could write), and an index whose rows are pickles;
2. a scheme-less tfhub.dev handle that exists as a directory under the current directory;
5. hosts whose characters NFKC-normalise to '/', '#', '?' or '@';
3. a download that fails its checks after its bytes arrived evicts nothing;
4. a keyed plain-http mirror's responses are all signed, over the handle too;
6. TCP connections cannot take the connection budget that socket users need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubd_client.errors import BadHandle, DisallowedHost
from hubd_client.handles import is_local, origin, parse_handle

from hubd.config import Settings
from tests.conftest import Upstream
from tests.daemon import start_daemon
from tests.test_engine import resolve
from tests.test_trust_origins import ask_as, shared_daemon
from tests.users import LocalUser, needs_root, shared_dir

pytestmark = [needs_root]

VICTIM_HANDLE = "https://tfhub.dev/google/victim/1"

# Run as the attacker: a complete layout-v2 cache at argv[1] in which argv[2] names the attacker's model, and an
# index (diskcache, SQLite) whose rows are pickles that would run `touch argv[3]` in whoever reads them.
PLANT = r"""
import hashlib, json, os, pickle, sqlite3, sys, time
from hubd_client.handles import AnyHost, parse_handle

root, handle, pwned = sys.argv[1:4]
source = parse_handle(handle, AnyHost())
data = b"EVIL: planted in a cache directory made first by " + os.environ["USER"].encode()
record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
digest = hashlib.sha256(
    b"hubd-tree-v2\n" + json.dumps(["f", "saved_model.pb", len(data), record["sha256"]]).encode() + b"\n"
).hexdigest()
for sub in ("objects/" + digest, "meta", "refs", "pins", "index"):
    os.makedirs(f"{root}/{sub}", exist_ok=True)
open(f"{root}/objects/{digest}/saved_model.pb", "wb").write(data)
open(f"{root}/layout-version", "w").write("2\n")
meta = {"digest": digest, "archive_sha256": "0" * 64, "size_bytes": len(data), "fetched_at": time.time(),
        "names": [source.canonical], "manifest": {"files": {"saved_model.pb": record}, "symlinks": {}, "dirs": []}}
json.dump(meta, open(f"{root}/meta/{digest}.json", "w"))
json.dump({"canonical": source.canonical, "handle": handle, "digest": digest, "archive_sha256": "0" * 64,
           "updated_at": time.time()}, open(f"{root}/refs/{source.ref_key}.json", "w"))

class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {pwned}",))

db = sqlite3.connect(f"{root}/index/cache.db")
db.execute("CREATE TABLE IF NOT EXISTS Settings (key TEXT NOT NULL UNIQUE, value)")
db.execute(
    "CREATE TABLE IF NOT EXISTS Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, store_time REAL,"
    " expire_time REAL, access_time REAL, access_count INTEGER DEFAULT 0, tag BLOB, size INTEGER DEFAULT 0,"
    " mode INTEGER DEFAULT 0, filename TEXT, value BLOB)"
)
db.execute("CREATE UNIQUE INDEX IF NOT EXISTS Cache_key_raw ON Cache(key, raw)")
for key in ("format", "built"):
    db.execute(
        "INSERT OR REPLACE INTO Cache (key, raw, store_time, access_time, mode, value) VALUES (?, 1, 0, 0, 4, ?)",
        (key, pickle.dumps(Payload())),
    )
db.commit()
db.close()
for folder, dirs, files in os.walk(root):
    os.chmod(folder, 0o755)
    for name in files:
        os.chmod(os.path.join(folder, name), 0o644)
print(digest)
"""


def plant(attacker: LocalUser, root: Path, pwned: Path) -> str:
    done = attacker.python(PLANT, str(root), VICTIM_HANDLE, str(pwned))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def serve_once(settings: Settings, workdir: Path) -> subprocess.CompletedProcess[str]:
    """`hubd serve` as root on `settings.cache_dir`, expected to refuse: it must exit by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "NOTIFY_", "LISTEN_"))}
    env.update(HUBD_CACHE_DIR=str(settings.cache_dir), HUBD_SOCKET=str(workdir / "hubd.sock"))
    return subprocess.run(
        [sys.executable, "-m", "hubd", "serve"], env=env, capture_output=True, text=True, timeout=60
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("hubd: error:")]
    assert "(hint: " in line, line
    return line


# -- 1. who owns the cache --------------------------------------------------------------------------------------


def test_daemon_refuses_a_cache_directory_another_user_made_first(
    settings: Settings, attacker: LocalUser, tmp_path: Path
) -> None:
    with shared_dir(mode=0o1777) as public:  # like /tmp: anyone may create the daemon's cache directory first
        cache, pwned = public / "cache", public / "pwned"
        plant(attacker, cache, pwned)
        before = sorted(str(p) for p in cache.rglob("*"))
        result = serve_once(settings.model_copy(update={"cache_dir": cache}), tmp_path)
        line = one_error_line(result)
        assert f"{cache} belongs to {attacker.name}" in line
        assert not pwned.exists()  # the index's pickles never ran
        assert sorted(str(p) for p in cache.rglob("*")) == before  # refused before it touched anything


@pytest.mark.parametrize("case", ["parent-writable", "subdir-writable"])
def test_daemon_refuses_a_cache_another_user_could_write(
    settings: Settings, attacker: LocalUser, tmp_path: Path, case: str
) -> None:
    with shared_dir(mode=0o777 if case == "parent-writable" else 0o755) as public:
        cache = public / "cache"
        (cache / "refs").mkdir(parents=True)
        if case == "subdir-writable":
            (cache / "refs").chmod(0o777)
        # what the attacker can do there: put a ref in refs/, or move the cache aside and put their own there
        attack = f"echo planted > {cache}/refs/x.json" if case == "subdir-writable" else f"mkdir {public}/cache2"
        done = attacker.run(["/bin/sh", "-c", attack])
        assert done.returncode == 0, done.stderr
        line = one_error_line(serve_once(settings.model_copy(update={"cache_dir": cache}), tmp_path))
        where = public if case == "parent-writable" else cache / "refs"
        assert f"{where} is writable by others (mode 0777)" in line


def test_an_index_of_pickles_is_never_unpickled(
    settings: Settings, attacker: LocalUser, tmp_path: Path, upstream: Upstream
) -> None:
    """The attacker made the cache first; an admin took it over (chown root, no write for others). The index the
    attacker left must be read as data, never as pickles: it is thrown away and rebuilt from the files."""
    with shared_dir(mode=0o1777) as public:
        cache, pwned = public / "cache", public / "pwned"
        plant(attacker, cache, pwned)
        subprocess.run(["chown", "-R", "root:root", str(cache)], check=True)
        subprocess.run(["chmod", "-R", "go-w", str(cache)], check=True)
        daemon = start_daemon(settings.model_copy(update={"cache_dir": cache}), tmp_path)
        try:
            models = daemon.request("GET", "/v1/models").json()["models"]
            assert [m["handles"] for m in models] == [[VICTIM_HANDLE.removeprefix("https://")]], models
            handle = f"https://tfhub.dev/{upstream.publish('reusable')}"
            assert daemon.request("POST", "/v1/resolve", {"handle": handle}).status == 200
        finally:
            daemon.stop()
        assert not pwned.exists()
        assert "Traceback" not in daemon.log()


# Run as the victim, with no daemon answering: the client's offline look-up in HUBD_CACHE_DIR.
OFFLINE = r"""
import json, sys, hubd_client
from hubd_client.errors import HubdClientError
try:
    print(json.dumps({"path": hubd_client.resolve(sys.argv[1])}))
except HubdClientError as exc:
    print(json.dumps({"code": exc.code, "message": exc.message}))
"""


def test_offline_reader_refuses_a_cache_another_user_made(attacker: LocalUser, victim: LocalUser) -> None:
    with shared_dir(mode=0o1777) as public:
        cache = public / "cache"
        digest = plant(attacker, cache, public / "pwned")
        env = {"HUBD_CACHE_DIR": str(cache), "HUBD_SOCKET": str(victim.home / "no-daemon.sock")}
        done = victim.python(OFFLINE, VICTIM_HANDLE, env=env)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer.get("code") == "cache_untrusted", answer
        assert f"{cache} belongs to {attacker.name}" in answer["message"]
        assert digest not in done.stdout


# -- 2. a scheme-less hub handle is never a local directory ------------------------------------------------------

SCHEME_LESS = r"""
import json, os, sys, hubd_client
from hubd_client.errors import HubdClientError
os.chdir(sys.argv[1])
try:
    print(json.dumps({"path": hubd_client.resolve(sys.argv[2])}))
except HubdClientError as exc:
    print(json.dumps({"code": exc.code, "message": exc.message}))
"""


def test_a_scheme_less_hub_handle_never_loads_a_directory_in_the_cwd(
    settings: Settings, upstream: Upstream, attacker: LocalUser, victim: LocalUser
) -> None:
    path = upstream.publish("reusable", path=f"google/nnlm-{os.getpid()}/2")
    handle = f"tfhub.dev/{path}"
    with shared_dir(mode=0o1777) as public:  # the victim works in a directory like /tmp
        planted = attacker.run(
            [
                "/bin/sh",
                "-c",
                f"mkdir -p {public}/{handle} && echo EVIL > {public}/saved_model.pb "
                f"&& chmod -R a+rX {public}/tfhub.dev",
            ]
        )
        assert planted.returncode == 0, planted.stderr
        assert not is_local(handle)
        with shared_daemon(settings, victim) as daemon:
            env = {"HUBD_SOCKET": str(daemon.socket_path), "HUBD_CACHE_DIR": str(victim.home / "none")}
            done = victim.python(SCHEME_LESS, str(public), handle, env=env)
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            assert answer.get("path"), answer  # never "": loading "" loads the attacker's saved_model.pb
            assert Path(answer["path"]).parent == daemon.socket_path.parent / "cache" / "objects"
            assert (Path(answer["path"]) / "saved_model.pb").read_bytes() != b"EVIL\n"
        without = victim.python(
            SCHEME_LESS, str(public), handle, env={"HUBD_SOCKET": str(victim.home / "no.sock")}
        )
        assert json.loads(without.stdout).get("code") == "daemon_unavailable", without.stdout


# -- 5. hosts that NFKC-normalise to URL delimiters ---------------------------------------------------------------

WEIRD = [
    "https://evil\uff0fx.googleusercontent.com/a/1",
    "https://evil.com\uff03.googleusercontent.com/a/1",
    "https://evil\uff1fx.example.com/a/1",
    "https://user\uff20evil.example.com/a/1",
    "https://[::1/a/1",
]


def test_hosts_that_normalise_to_delimiters_are_bad_handles(settings: Settings, attacker: LocalUser) -> None:
    for handle in WEIRD:
        with pytest.raises(BadHandle):
            parse_handle(handle)
        with pytest.raises(DisallowedHost):
            origin(handle)
    with shared_daemon(settings, attacker) as daemon:
        for handle in WEIRD:
            status, body = ask_as(attacker, daemon, "POST", "/v1/resolve", {"handle": handle})
            assert (status, body["error"]["code"]) == (400, "bad_handle"), (handle, body)
        env = {"HUBD_SOCKET": str(daemon.socket_path), "HUBD_CACHE_DIR": str(attacker.home / "none")}
        for handle in WEIRD[:2]:  # the client library's resolve, through the daemon
            done = attacker.python(SCHEME_LESS, str(attacker.home), handle, env=env)
            assert done.returncode == 0, done.stderr  # no raw ValueError
            assert json.loads(done.stdout).get("code") == "bad_handle", done.stdout
        assert "Traceback" not in daemon.log()


# -- 3. a request that fails evicts nothing ---------------------------------------------------------------------


def test_a_pin_that_can_never_match_evicts_nothing(
    settings: Settings, upstream: Upstream, attacker: LocalUser, tmp_path: Path
) -> None:
    """The attacker asks for a large model with a sha256 that can never match: it downloads in full, then fails
    409. Before, its bytes evicted the victims' models as they arrived; now nothing is evicted before publish."""
    victims = [upstream.publish(m) for m in ("reusable", "text_embedding")]
    scratch = settings.model_copy(update={"cache_dir": tmp_path / "scratch"})
    used = sum(resolve(scratch, f"https://tfhub.dev/{v}").size_bytes for v in victims)
    big = upstream.publish("large_4mb")
    quota = len(upstream.models["large_4mb"]) + used // 2  # its archive fits only if a victim goes
    with shared_daemon(settings, attacker, "--max-size", str(quota), env={"HUBD_GC_GRACE": "0"}) as daemon:
        entries = [
            daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{v}"}).json() for v in victims
        ]
        body = {"handle": f"https://tfhub.dev/{big}", "sha256": "0" * 64}
        status, error = ask_as(attacker, daemon, "POST", "/v1/resolve", body)
        assert (status, error["error"]["code"]) == (409, "checksum_mismatch"), error
        assert upstream.bytes_sent(big) == len(upstream.models["large_4mb"])  # it was downloaded in full
        for entry in entries:
            assert daemon.request("GET", f"/v1/models/{entry['id']}").status == 200
            assert Path(entry["path"]).is_dir()


# -- 4. a keyed plain-http mirror: every answer signed, for its own handle ----------------------------------------

# Run as the attacker: a man in the middle between a hubd and its keyed plain-http mirror. For argv[2] it replays
# the mirror's (signed) answer for argv[3]; for argv[4] it answers with its own archive argv[5], unsigned; the
# rest it passes through. Prints its port.
MITM = r"""
import http.server, sys, urllib.request

mirror, swap_from, swap_to, forge, forged = sys.argv[1:6]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path.strip("/") == forge:
            data, headers = open(forged, "rb").read(), {}
        else:
            if path.strip("/") == swap_from:
                path = "/" + swap_to
            with urllib.request.urlopen(mirror + path + "?" + query) as reply:
                data, headers = reply.read(), {k: v for k, v in reply.headers.items() if k.startswith("X-Hubd")}
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_a_keyed_mirrors_answers_cannot_be_forged_or_replayed(
    settings: Settings, upstream: Upstream, attacker: LocalUser, victim: LocalUser, tmp_path: Path
) -> None:
    key = tmp_path / "mirror.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    keyed = {"HUBD_MIRROR_KEY_FILE": str(key)}
    wanted, other, honest = (upstream.publish(m) for m in ("reusable", "text_embedding", "reusable"))
    forge = f"google/forged{os.getpid()}/1"
    (tmp_path / "m").mkdir()
    mirror = start_daemon(
        settings.model_copy(update={"cache_dir": tmp_path / "m" / "cache"}),
        tmp_path / "m",
        "--mirror-listen",
        "127.0.0.1:0",
        env_extra=keyed,
    )
    try:
        with shared_dir() as workdir:
            forged = workdir / "forged.tar.gz"
            forged.write_bytes(upstream.models["text_embedding"])
            forged.chmod(0o644)
            mitm = subprocess.Popen(
                ["/usr/bin/python3", "-c", MITM, mirror.mirrors[0], wanted, other, forge, str(forged)],
                user=attacker.uid,
                group=attacker.gid,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin", "HOME": str(attacker.home), "LANG": "C.UTF-8"},
                cwd=attacker.home,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert mitm.stdout is not None
                port = int(mitm.stdout.readline())
                lan = settings.model_copy(update={"mirror": f"http://127.0.0.1:{port}"})
                with shared_daemon(lan, victim, env=keyed) as daemon:
                    for path in (wanted, forge):  # a replayed signed answer, and an unsigned one
                        status, error = ask_as(
                            victim, daemon, "POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{path}"}
                        )
                        assert (status, error["error"]["code"]) == (502, "mirror_unsigned"), error
                    assert daemon.request("GET", "/v1/models").json()["models"] == []  # nothing was published
                    status, entry = ask_as(
                        victim, daemon, "POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{honest}"}
                    )
                    assert status == 200, entry  # what the mirror really said for the handle passes unchanged
            finally:
                mitm.kill()
                mitm.communicate()  # reaps it and closes its pipe
    finally:
        mirror.stop()


# -- 6. TCP clients cannot lock socket users out ---------------------------------------------------------------

# Run as the attacker: open argv[3] keep-alive connections to the daemon's loopback TCP listener, one request on
# each (so each is surely admitted or refused), print how many got in, then hold them until stdin closes.
HOLD_TCP = r"""
import http.client, sys
held, refused = [], 0
for _ in range(int(sys.argv[3])):
    conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=60)
    conn.request("GET", "/v1/health")
    reply = conn.getresponse()
    reply.read()
    if reply.status == 200:
        held.append(conn)
    else:
        refused += 1
print(len(held), refused, flush=True)
sys.stdin.read()
"""


def test_tcp_clients_cannot_take_the_connections_socket_users_need(
    settings: Settings, attacker: LocalUser, victim: LocalUser
) -> None:
    limit = 8
    env = {"HUBD_MAX_CONNECTIONS": str(limit), "HUBD_IDLE_TIMEOUT": "120", "HUBD_HEADER_TIMEOUT": "60"}
    with shared_daemon(settings, victim, "--listen", "127.0.0.1:0", env=env) as daemon:
        host, port = daemon.tcp[0].removeprefix("http://").rsplit(":", 1)
        holder = subprocess.Popen(
            ["/usr/bin/python3", "-c", HOLD_TCP, host, port, str(limit)],
            user=attacker.uid,
            group=attacker.gid,
            extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "HOME": str(attacker.home), "LANG": "C.UTF-8"},
            cwd=attacker.home,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            held, refused = map(int, holder.stdout.readline().split())
            assert (held, refused) == (limit // 2, limit - limit // 2)  # TCP gets its share, no more
            for _ in range(limit - held - 1):  # the socket's users still have all the rest
                status, body = ask_as(victim, daemon, "GET", "/v1/health")
                assert status == 200, body
        finally:
            holder.communicate(timeout=30)  # closes its stdin: it lets go
