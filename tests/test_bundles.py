"""Air-gapped bundles (#15 item 2): `hubd export` writes verified trees with their digests and refs into one file;
`hubd import` publishes them on a machine without network, each checked against its digest, with or without a
daemon. A damaged entry is refused by name while the rest stays valid; hostile members never leave staging."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hubd.bundle import HEADER, HEADER_SUM, import_bundle, plan_export, write_bundle
from hubd.config import Settings
from hubd.engine import Engine
from hubd.errors import NotCached, VerificationFailed
from hubd.store import Store
from hubd.tree import TreeListing
from hubd.verify import full_problems
from tests.conftest import Upstream, cli_env, run
from tests.daemon import start_daemon
from tests.hosting import HostingServer
from tests.users import LocalUser, shared_dir
from tests.workstation import cli_as, request_as, workstation


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def savedmodel_archive(seed: int, size: int = 64 * 1024) -> bytes:
    """A tar.gz laid out like a SavedModel (hubd checks structure, never loads it), with a link inside it."""
    noise = hashlib.sha256(str(seed).encode()).digest()
    members = {
        "saved_model.pb": b"graph %d" % seed,
        "variables/variables.index": b"index %d" % seed,
        "variables/variables.data-00000-of-00001": noise * (size // len(noise)),
        "assets/vocab.txt": b"a\nb\n",
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("assets/current.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "vocab.txt"
        archive.addfile(link)
    return gzip.compress(raw.getvalue(), mtime=0)


@pytest.fixture
def upstream(hosting: HostingServer) -> Upstream:
    """The hosting server, serving only archives these tests make (no TensorFlow-built models needed)."""
    return Upstream(hosting, {})


def hubd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubd", *args], env=env, capture_output=True, text=True, timeout=120
    )


def offline_settings(root: Path) -> Settings:
    """A machine with no network at all: no mirror, and --offline."""
    return Settings(cache_dir=root / "cache", offline=True, mirror=None, http_hosts=[])


def offline_env(settings: Settings) -> dict[str, str]:
    return {**cli_env(settings), "HUBD_MIRROR": "", "HUBD_OFFLINE": "1"}


def cached(settings: Settings, upstream: Upstream, count: int) -> tuple[list[str], list[str]]:
    """`count` models fetched into `settings`' cache in this process: (handles, ids)."""
    handles = [tfhub(upstream.publish(savedmodel_archive(seed))) for seed in range(count)]

    async def fetch() -> list[str]:
        engine = Engine(settings)
        await engine.start()
        try:
            return [(await engine.resolve(handle)).id for handle in handles]
        finally:
            await engine.close()

    return handles, run(fetch())


def export(settings: Settings, ids: list[str], bundle: Path) -> None:
    async def write() -> None:
        engine = Engine(settings)
        await engine.start()
        try:
            with open(bundle, "wb") as out:
                write_bundle(engine, plan_export(engine, ids), out)
        finally:
            await engine.close()

    run(write())


@pytest.mark.slow
def test_bundle_carries_models_from_one_daemon_to_another_without_network(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    handles = [tfhub(upstream.publish(savedmodel_archive(seed))) for seed in (1, 2)]
    bundle = tmp_path / "models.hubd.tar"
    (tmp_path / "a").mkdir()
    source = start_daemon(settings, tmp_path / "a")
    try:
        ids = [source.request("POST", "/v1/resolve", {"handle": h}).json()["id"] for h in handles]
        exported = hubd(
            {**cli_env(settings), "HUBD_SOCKET": str(source.socket_path)}, "export", str(bundle), *handles
        )
    finally:
        source.stop()
    assert exported.returncode == 0, exported.stderr
    assert "in this process" not in exported.stderr  # through GET /v1/export
    assert [line.split()[0] for line in exported.stdout.splitlines()] == [i[:12] for i in ids]

    airgapped = offline_settings(tmp_path / "b")
    (tmp_path / "b").mkdir(exist_ok=True)
    target = start_daemon(airgapped, tmp_path / "b", env_extra={"HUBD_OFFLINE": "1"})
    try:
        env = {**offline_env(airgapped), "HUBD_SOCKET": str(target.socket_path)}
        imported = hubd(env, "import", str(bundle))
        assert imported.returncode == 0, imported.stderr
        assert "in this process" not in imported.stderr  # through POST /v1/import
        assert "[1/2] imported" in imported.stderr and "[2/2] imported" in imported.stderr
        for handle, model_id in zip(handles, ids, strict=True):
            entry = target.request("POST", "/v1/resolve", {"handle": handle}).json()
            assert entry["id"] == model_id and entry["state"] == "ok"
            assert not full_problems(Path(entry["path"]), _listing(airgapped, model_id))
        trail = target.request("GET", "/v1/audit?action=import").json()["records"]
        assert [(r["model_id"], r["outcome"], r["uid"]) for r in trail] == [(i, "ok", os.getuid()) for i in ids]
    finally:
        target.stop()


def _listing(settings: Settings, model_id: str) -> TreeListing:
    meta = Store(settings.cache_dir).read_meta(model_id)
    assert meta is not None
    return meta.listing


def test_a_flipped_byte_refuses_that_entry_and_keeps_the_one_before(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    handles, ids = cached(settings, upstream, 2)
    bundle = tmp_path / "models.hubd.tar"
    export(settings, ids, bundle)
    with tarfile.open(bundle) as archive:  # the second entry's largest file, half-way through
        member = max(
            (m for m in archive.getmembers() if m.name.startswith(f"objects/{ids[1]}/") and m.isreg()),
            key=lambda m: m.size,
        )
    with open(bundle, "r+b") as damaged:
        damaged.seek(member.offset_data + member.size // 2)
        byte = damaged.read(1)
        damaged.seek(-1, os.SEEK_CUR)
        damaged.write(bytes([byte[0] ^ 0x01]))

    airgapped = offline_settings(tmp_path / "b")
    result = hubd(offline_env(airgapped), "import", str(bundle))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("hubd: error:")]
    assert len(errors) == 1 and handles[1] in errors[0] and ids[1][:12] in errors[0], result.stderr
    assert "does not match its digest" in errors[0]
    assert result.stdout.split() == [ids[0], handles[0]]

    async def check() -> None:
        engine = Engine(airgapped)
        await engine.start()
        try:
            entry = await engine.resolve(handles[0])
            assert entry.id == ids[0] and not full_problems(Path(entry.path), _listing(airgapped, ids[0]))
            with pytest.raises(NotCached):
                await engine.resolve(handles[1])
            assert not (airgapped.cache_dir / "objects" / ids[1]).exists()
            assert [p for p in (airgapped.cache_dir / "staging").iterdir()] == []
        finally:
            await engine.close()

    run(check())


def hostile_bundle(path: Path, hostile: tarfile.TarInfo) -> str:
    """A bundle whose one entry holds a real-looking SavedModel file and then `hostile`; returns its digest."""
    digest = "ab" * 32
    header = {
        "format": "hubd-bundle",
        "format_version": 1,
        "hubd_version": "0",
        "layout_version": 2,
        "created_at": 0.0,
        "entries": [
            {
                "digest": digest,
                "archive_sha256": "cd" * 32,
                "size_bytes": 10,
                "refs": [{"canonical": "tfhub.dev/evil/model/1", "handle": "https://tfhub.dev/evil/model/1"}],
                "manifest": {"files": {}, "symlinks": {}, "dirs": []},
            }
        ],
    }
    raw = json.dumps(header).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in (
            (HEADER, raw),
            (HEADER_SUM, hashlib.sha256(raw).hexdigest().encode()),
            (f"objects/{digest}/saved_model.pb", b"graph"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        hostile.name = hostile.name.format(digest=digest)
        archive.addfile(hostile, io.BytesIO(b"x" * hostile.size) if hostile.isreg() else None)
    return digest


def _member(name: str, linkname: str | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    if linkname is None:
        info.size = 1
    else:
        info.type, info.linkname = tarfile.SYMTYPE, linkname
    return info


@pytest.mark.parametrize(
    "hostile",
    [
        _member("objects/{digest}/../../../escaped.txt"),
        _member("objects/{digest}/evil", "../../../../../../etc"),
        _member("objects/{digest}/variables", "/etc"),
    ],
    ids=["path-traversal", "symlink-out", "absolute-symlink"],
)
def test_hostile_members_are_refused_and_nothing_leaves_staging(tmp_path: Path, hostile: tarfile.TarInfo) -> None:
    bundle = tmp_path / "evil.hubd.tar"
    digest = hostile_bundle(bundle, hostile)
    airgapped = offline_settings(tmp_path / "b")

    async def attempt() -> None:
        engine = Engine(airgapped)
        await engine.start()
        try:
            with open(bundle, "rb") as stream:
                [result] = import_bundle(engine, stream, None, lambda _r: None)
            assert not result.ok and result.code == "unsafe_archive", result
            assert "tfhub.dev/evil/model/1" in result.message and digest[:12] in result.message
            with pytest.raises(NotCached):
                await engine.resolve("https://tfhub.dev/evil/model/1")
        finally:
            await engine.close()

    run(attempt())
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (airgapped.cache_dir / "objects" / digest).exists()
    assert list((airgapped.cache_dir / "staging").iterdir()) == []


def test_import_over_the_socket_is_for_admins_only(settings: Settings, attacker: LocalUser) -> None:
    with workstation(settings, attacker) as d, shared_dir() as public:
        reply = request_as(attacker, d, "POST", "/v1/import", {})
        assert reply.status == 403 and reply.json()["error"]["code"] == "forbidden", reply.body
        bundle = public / "planted.hubd.tar"
        bundle.write_bytes(os.urandom(8 << 20))  # refused before the daemon reads a byte of it
        bundle.chmod(0o644)
        denied = cli_as(attacker, d, "import", str(bundle))
        assert denied.returncode == 1 and "may not change the shared cache" in denied.stderr, denied.stderr
        assert d.request("GET", "/v1/audit?action=import").json()["records"] == []


def test_round_trip_without_a_daemon(settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    handle = tfhub(upstream.publish(savedmodel_archive(7)))
    pulled = hubd(cli_env(settings), "pull", handle)
    assert pulled.returncode == 0, pulled.stderr
    bundle = tmp_path / "one.hubd.tar"
    exported = hubd(cli_env(settings), "export", str(bundle), handle)
    assert exported.returncode == 0, exported.stderr  # no daemon answers at cli_env's socket: in-process

    airgapped = offline_settings(tmp_path / "b")
    imported = hubd(offline_env(airgapped), "import", str(bundle))
    assert imported.returncode == 0, imported.stderr
    again = hubd(offline_env(airgapped), "pull", handle)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()).name == Path(pulled.stdout.strip()).name
    assert Path(again.stdout.strip()).parent == airgapped.cache_dir / "objects"
    assert os.readlink(Path(again.stdout.strip()) / "assets" / "current.txt") == "vocab.txt"
    twice = hubd(offline_env(airgapped), "import", str(bundle))  # the same models again: nothing changes
    assert twice.returncode == 0, twice.stderr


def test_a_cache_entry_that_changed_is_refused_not_exported(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    _handles, [model_id] = cached(settings, upstream, 1)
    weights = settings.cache_dir / "objects" / model_id / "variables" / "variables.data-00000-of-00001"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size: a cache hit's quick check cannot see it, the re-hash does
    with pytest.raises(VerificationFailed, match="content changed"):
        export(settings, [model_id], tmp_path / "never.hubd.tar")


def test_a_handle_never_silently_changes_model_on_import(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    path = upstream.publish(savedmodel_archive(1))
    handle = tfhub(path)
    here = offline_settings(tmp_path / "b").model_copy(update={"offline": False, "mirror": settings.mirror})
    bundle = tmp_path / "old.hubd.tar"

    async def scenario() -> None:
        source, target = Engine(settings), Engine(here)
        await source.start()
        await target.start()
        try:
            exported = await source.resolve(handle)
            with open(bundle, "wb") as out:
                write_bundle(source, plan_export(source, [exported.id]), out)
            upstream.publish(savedmodel_archive(2), path=path)  # upstream now serves another model
            kept = await target.resolve(handle)
            assert kept.id != exported.id
            with open(bundle, "rb") as stream:
                [result] = import_bundle(target, stream, None, lambda _r: None)
            assert not result.ok and result.code == "ref_conflict" and kept.id[:12] in result.message
            assert (await target.resolve(handle)).id == kept.id  # a cache hit: the cached model kept
        finally:
            await source.close()
            await target.close()

    run(scenario())


def test_a_file_that_is_not_a_bundle_is_refused_whole(settings: Settings, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(gzip.compress(b"not a tar at all"))
    result = hubd(cli_env(settings), "import", str(junk))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("hubd: error: not a hubd bundle"), result.stderr
