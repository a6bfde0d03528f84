"""A second red-team pass, after the route table, the CLI's backends, paginated listings, the bounded watcher,
parallel inflate and the index's totals landed. Each attack is performed against a real daemon (by an
unprivileged local user where the attack is theirs) and shown to fail:

1. a module planted in the daemon's working directory is never imported by the parallel-inflate child;
2. one user's models with many directories cannot take the watcher's inotify budget from everyone else's;
3. every admin route of the table refuses non-admins, for every method aiohttp answers, percent-encoded too (a
   regression check of the route table: it held).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from hubd import parallel_inflate
from hubd.config import Settings
from hubd.server.routes_table import ROUTES
from tests.daemon import start_daemon
from tests.hosting import HostingServer
from tests.test_trust_origins import SYSTEM_PYTHON, ask_as, shared_daemon
from tests.unit.trees import gzip_tar
from tests.users import LocalUser, needs_root

pytestmark = [needs_root]


archive = gzip_tar


SMALL_MODEL = {"saved_model.pb": b"\x08\x01graph"}


# -- 1. the parallel-inflate child's import path ----------------------------------------------------------------

# Run as the attacker: a directory holding a `rapidgzip` module that, when imported, records the uid it ran as
# next to itself (the daemon itself never imports rapidgzip: only its child does).
PLANT_MODULES = r"""
import os, sys
folder = sys.argv[1]
os.mkdir(folder, 0o755)
payload = (
    "import os\n"
    "open(os.path.join(os.path.dirname(__file__), 'PWNED-' + __name__), 'w').write(str(os.getuid()))\n"
)
with open(os.path.join(folder, "rapidgzip.py"), "w") as f:
    f.write(payload)
os.chmod(folder, 0o777)  # so the daemon (root here) can leave its marker; the attacker needs nothing of it
"""


@pytest.mark.skipif(not parallel_inflate.available(), reason="rapidgzip is not installed")
def test_the_inflate_child_never_imports_from_the_daemons_working_directory(
    settings: Settings, hosting: HostingServer, attacker: LocalUser, tmp_path: Path
) -> None:
    """`python -c` puts the working directory first on sys.path: a daemon (or `hubd pull` with no daemon) started
    in a directory another user can write would run that user's `rapidgzip.py` as itself on its next large
    download (on 4 cores or more, every announced download of 32 MiB or more takes the parallel path)."""
    planted = Path(f"/tmp/hubd-planted-{uuid.uuid4().hex[:8]}")
    done = attacker.python(PLANT_MODULES, str(planted))
    assert done.returncode == 0, done.stderr
    path = hosting.add(f"redteam2/{uuid.uuid4().hex[:8]}/1", archive(SMALL_MODEL))
    try:
        daemon = start_daemon(
            settings, tmp_path, env_extra={"HUBD_INFLATE_THREADS": "2"}, popen_extra={"cwd": str(planted)}
        )
        try:
            reply = daemon.request("POST", "/v1/resolve", {"handle": path})
        finally:
            daemon.stop()
        assert reply.status == 200, reply.body
        assert sorted(p.name for p in planted.iterdir() if p.name.startswith("PWNED")) == []
        assert "gave no verdict" not in daemon.log()  # the real rapidgzip inflated it
    finally:
        for child in planted.iterdir():
            child.unlink()
        planted.rmdir()


# -- 2. the watcher's inotify budget ----------------------------------------------------------------------------


def model_with_folders(count: int) -> bytes:
    """A model whose tree has `count` directories besides its top one (a file in each)."""
    files = {"saved_model.pb": b"\x08\x01graph" + uuid.uuid4().bytes}
    files.update({f"assets/d{i:04}/f": b"x" for i in range(count - 1)} if count else {})
    return archive(files)


def test_one_users_many_folders_cannot_take_the_watches_of_everyone_else(
    settings: Settings, hosting: HostingServer, attacker: LocalUser
) -> None:
    """The watcher used to stop placing watches for good once one entry did not fit its budget: a single model of
    more directories than HUBD_MAX_WATCHES (a few KiB of archive), resolved by any socket user, left every model
    published after it to the scrub (once an hour here, every 60 s by default). A few models that fit took the
    budget the same way. Now an entry past its share of the budget is left to the scrub alone, and a full budget
    moves the watches of the entries watched longest ago to the ones in use."""
    env = {"HUBD_MAX_WATCHES": "16", "HUBD_SCRUB_INTERVAL": "3600"}
    with shared_daemon(settings, attacker, env=env) as daemon:
        tag = uuid.uuid4().hex[:8]
        huge = hosting.add(f"redteam2/{tag}/huge/1", model_with_folders(40))
        fits = [hosting.add(f"redteam2/{tag}/fits{i}/1", model_with_folders(7)) for i in range(3)]
        for handle in [huge, *fits]:
            status, body = ask_as(attacker, daemon, "POST", "/v1/resolve", {"handle": handle})
            assert status == 200, body
        victims = hosting.add(f"redteam2/{tag}/victim/1", archive(SMALL_MODEL))
        entry = daemon.request("POST", "/v1/resolve", {"handle": victims}).json()
        graph = Path(entry["path"], "saved_model.pb")
        original = graph.read_bytes()
        graph.write_bytes(b"\0" * len(original))  # tampered (as root: only root or hubd could)
        path = victims.removeprefix(hosting.url + "/")
        assert hosting.wait_requests(path, 2), daemon.log()  # the watcher saw it and re-fetched the model
        healed = daemon.request("POST", "/v1/resolve", {"handle": victims}).json()
        assert Path(healed["path"], "saved_model.pb").read_bytes() == original


# -- 3. admin routes, every method and spelling -------------------------------------------------------------------

# Run as the attacker: each [method, path] of argv[2] on the socket argv[1]; prints [[method, path, status], ...].
ASK_ALL = r"""
import http.client, json, socket, sys

class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])

answers = []
for method, path in json.loads(sys.argv[2]):
    conn = Unix("localhost", timeout=60)
    conn.request(method, path, body=b"{}", headers={"Content-Type": "application/json"})
    answers.append([method, path, conn.getresponse().status])
    conn.close()
print(json.dumps(answers))
"""


def admin_requests() -> list[tuple[str, str]]:
    """Each admin route of the table with each method aiohttp answers on it (a GET answers HEAD too), as written
    and with its first letter after /v1/ percent-encoded (aiohttp decodes before matching)."""
    asked = []
    for route in ROUTES:
        if not route.admin:
            continue
        path = route.path.replace("{id}", "a" * 64)
        encoded = f"{path[:4]}%{ord(path[4]):02x}{path[5:]}"
        for method in [route.method, "HEAD"] if route.method == "GET" else [route.method]:
            asked += [(method, path), (method, encoded)]
    return asked


def test_every_admin_route_refuses_non_admins_whatever_the_method_or_spelling(
    settings: Settings, attacker: LocalUser
) -> None:
    asked = admin_requests()
    assert ("HEAD", "/v1/audit") in asked and ("DELETE", "/v1/models/" + "a" * 64) in asked
    with shared_daemon(settings, attacker, "--listen", "127.0.0.1:0") as daemon:
        done = attacker.run([str(SYSTEM_PYTHON), "-c", ASK_ALL, str(daemon.socket_path), json.dumps(asked)])
        assert done.returncode == 0, done.stderr
        over_socket = {(method, path): status for method, path, status in json.loads(done.stdout)}
        over_tcp = {}
        for method, path in asked:
            conn = daemon.http()
            conn.request(method, path, body=b"{}", headers={"Content-Type": "application/json"})
            over_tcp[(method, path)] = conn.getresponse().status
            conn.close()
    assert set(over_socket.values()) == {403}, over_socket
    assert set(over_tcp.values()) == {403}, over_tcp
