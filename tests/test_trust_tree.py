"""#9 items 4 and 5, performed by an unprivileged local user against a real daemon: a symlink chain that climbs
out of the tree, and a tree forged to take a public model's digest. Both must be refused (422), and the
victim's real model must still resolve to its true tree."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hubd.config import Settings
from hubd.tree import FileRecord, TreeListing
from tests import hostile
from tests.conftest import Upstream
from tests.daemon import Daemon, start_daemon
from tests.users import LocalUser, shared_dir

# The attacker has the system's Python and its standard library, nothing of hubd's.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"

# The attacker's own hosting server: stdlib only, run as the attacker, serving one archive for any path.
ATTACKER_SERVER = r"""
import http.server, sys
archive = open(sys.argv[1], "rb").read()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(archive)))
        self.end_headers()
        self.wfile.write(archive)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

# The attacker asks the daemon over its Unix socket, with nothing but the standard library.
ATTACKER_RESOLVE = r"""
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])
conn = Conn("localhost", timeout=120)
conn.request("POST", "/v1/resolve", json.dumps({"handle": sys.argv[2]}), {"Content-Type": "application/json"})
reply = conn.getresponse()
print(json.dumps({"status": reply.status, "body": json.loads(reply.read())}))
"""


@contextmanager
def attacker_server(attacker: LocalUser, archive: bytes, where: Path) -> Iterator[int]:
    """Serve `archive` as the attacker from 127.0.0.1; yields the port, read from the server's ready line."""
    path = where / "forged.tar.gz"
    path.write_bytes(archive)
    path.chmod(0o644)
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", ATTACKER_SERVER, str(path)],
        user=attacker.uid,
        group=attacker.gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "HOME": str(attacker.home)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.communicate()  # reaps it and closes its pipe


@contextmanager
def daemon_trusting(settings: Settings, attacker: LocalUser, where: Path, port: int) -> Iterator[Daemon]:
    """A daemon that allows the attacker's server as an upstream (as it would any allowed host whose content
    an attacker controls), with its socket in a shared directory and the attacker in the socket's group."""
    allowed = settings.model_copy(update={"http_hosts": [*settings.http_hosts, f"127.0.0.1:{port}"]})
    daemon = start_daemon(allowed, where, env_extra={"HUBD_SOCKET_GROUP": attacker.name})
    try:
        yield daemon
    finally:
        daemon.stop()


def attack(attacker: LocalUser, daemon: Daemon, handle: str) -> dict[str, object]:
    result = attacker.run([SYSTEM_PYTHON, "-c", ATTACKER_RESOLVE, str(daemon.socket_path), handle])
    assert result.returncode == 0, result.stderr
    reply: dict[str, object] = json.loads(result.stdout)
    return reply


def tree_digest(archive: bytes) -> TreeListing:
    """The listing a correct extraction of `archive` records (regular files only)."""
    files = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive))) as tar:
        for member in tar:
            if member.isreg():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                files[member.name] = FileRecord(len(data), hashlib.sha256(data).hexdigest())
    return TreeListing(files=files)


def assert_no_link_leaves(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            if path.is_symlink():
                real = os.path.realpath(path)
                top = os.path.realpath(root / "objects" / path.relative_to(root / "objects").parts[0])
                assert os.path.commonpath([top, real]) == top, f"{path} -> {real}"


def test_symlink_chain_out_of_the_tree_is_refused(
    attacker: LocalUser,
    upstream: Upstream,
    models: dict[str, bytes],
    settings: Settings,
) -> None:
    with (
        shared_dir() as where,
        attacker_server(attacker, hostile.symlink_chain(), where) as port,
        daemon_trusting(settings, attacker, where, port) as daemon,
    ):
        reply = attack(attacker, daemon, f"http://127.0.0.1:{port}/mallory/chain/1")
        victim = upstream.publish("reusable")
        resolved = daemon.request("POST", "/v1/resolve", {"handle": upstream.handle(victim)})
    assert reply["status"] == 422, reply
    error = reply["body"]["error"]  # type: ignore[index]
    assert error["code"] == "unsafe_archive" and "leaves the model directory" in error["message"]
    assert_no_link_leaves(settings.cache_dir / "objects")
    assert resolved.status == 200, resolved.body
    assert resolved.json()["id"] == tree_digest(models["reusable"]).digest()
    assert [p.name for p in (settings.cache_dir / "objects").iterdir()] == [resolved.json()["id"]]


def victim_model() -> tuple[bytes, dict[str, bytes]]:
    files = {
        "saved_model.pb": b"\x08\x01the victim's graph",
        "variables/variables.data-00000-of-00001": b"weights" * 100,
        "variables/variables.index": b"index of the weights",
    }
    return hostile._tar([hostile._file(name, data) for name, data in files.items()]), files


def forged_twin(files: dict[str, bytes]) -> bytes:
    """Two files whose version-1 lines, joined, spell the victim's three: the second file's *name* carries the
    middle line and the start of the last (its size and sha256 come from re-using the public file's bytes)."""
    (first, first_data), *middle, (last, last_data) = sorted(files.items())
    lines = [f"{p} {len(d)} {hashlib.sha256(d).hexdigest()}" for p, d in middle]
    name = "\nf ".join([*lines, last])
    return hostile._tar([hostile._file(first, first_data), hostile._file(name, last_data)])


def test_forged_twin_of_a_public_model_cannot_take_its_digest(
    attacker: LocalUser, upstream: Upstream, settings: Settings
) -> None:
    real_archive, files = victim_model()
    forged = forged_twin(files)
    real = TreeListing(files={p: FileRecord(len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()})
    assert tree_digest(forged).legacy_digest() == real.legacy_digest()  # a true collision under version 1
    assert tree_digest(forged).digest() != real.digest()  # and none under version 2

    with (
        shared_dir() as where,
        attacker_server(attacker, forged, where) as port,
        daemon_trusting(settings, attacker, where, port) as daemon,
    ):
        reply = attack(attacker, daemon, f"http://127.0.0.1:{port}/mallory/twin/1")
        published = list((settings.cache_dir / "objects").iterdir())
        victim = upstream.publish(real_archive)
        resolved = daemon.request("POST", "/v1/resolve", {"handle": upstream.handle(victim)})
    assert reply["status"] == 422, reply
    assert "control character" in reply["body"]["error"]["message"]  # type: ignore[index]
    assert published == []
    assert resolved.status == 200, resolved.body
    assert resolved.json()["id"] == real.digest()
    tree = Path(resolved.json()["path"])
    assert {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()} == set(files)
    assert (tree / "variables" / "variables.index").read_bytes() == files["variables/variables.index"]


def test_version_2_digest_separates_records_that_version_1_ran_together() -> None:
    _archive, files = victim_model()
    forged = tree_digest(forged_twin(files))
    real = TreeListing(files={p: FileRecord(len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()})
    assert forged.legacy_digest() == real.legacy_digest()
    assert forged.digest() != real.digest()
    spaced = TreeListing(files={"a b": FileRecord(1, "0" * 64)})
    split = TreeListing(files={"a": FileRecord(1, "0" * 64)}, symlinks={"b": "x"})
    assert len({spaced.digest(), split.digest(), TreeListing().digest()}) == 3
    assert forged.name_problems() and not real.name_problems()


def test_verify_rechecks_links_against_the_real_tree(tmp_path: Path) -> None:
    """A link recorded as staying inside is reported once the tree around it is changed to lead outside."""
    from hubd.verify import full_problems, quick_problems

    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "saved_model.pb").write_bytes(b"\x08\x01graph")
    (tree / "d" / "passwd").write_bytes(b"x")
    os.symlink("d/passwd", tree / "alias")
    listing = TreeListing(
        files={
            "saved_model.pb": FileRecord(7, hashlib.sha256(b"\x08\x01graph").hexdigest()),
            "d/passwd": FileRecord(1, hashlib.sha256(b"x").hexdigest()),
        },
        symlinks={"alias": "d/passwd"},
        dirs={"d"},
    )
    assert quick_problems(tree, listing) == [] and full_problems(tree, listing) == []
    os.rename(tree / "d", tree / "d.moved")
    os.symlink("/etc", tree / "d")
    assert "alias: link resolves outside the model" in quick_problems(tree, listing)


def test_full_verify_finds_a_file_added_deep_in_a_large_tree(tmp_path: Path) -> None:
    from hubd.verify import full_problems

    tree = tmp_path / "tree"
    files = {"saved_model.pb": b"\x08\x01graph", **{f"assets/a/b/f{i}": b"" for i in range(5000)}}
    listing = TreeListing(files={p: FileRecord(len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()})
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    assert full_problems(tree, listing) == []
    (tree / "assets" / "a" / "c").mkdir()
    (tree / "assets" / "a" / "c" / "new").write_bytes(b"!")
    assert full_problems(tree, listing) == [
        "assets/a/c: added after publishing",
        "assets/a/c/new: added after publishing",
    ]


@pytest.mark.parametrize("name", sorted(hostile.more_hostile("/x")))
def test_hostile_archives_are_422_through_the_daemon(
    settings: Settings, upstream: Upstream, tmp_path: Path, name: str
) -> None:
    """Each once gave a 500 (a 5,000-character name, a 25x200-character path, a hard link over a member, ...)."""
    daemon = start_daemon(settings, tmp_path)
    try:
        path = upstream.publish(hostile.more_hostile(str(tmp_path / "outside"))[name])
        reply = daemon.request("POST", "/v1/resolve", {"handle": upstream.handle(path)})
    finally:
        daemon.stop()
    assert reply.status == 422, reply.body
    assert reply.json()["error"]["code"] == "unsafe_archive" and reply.json()["error"]["hint"]
