"""Publishing under faults: a daemon SIGKILLed between any two of publish's writes, a full disk at each write,
the index deleted or corrupted under a running daemon. After each the cache is consistent (every object has
its meta and refs, nothing pending or staged), the next resolve succeeds, and an object that reached objects/
before the crash is re-linked without downloading it again.

Crash and ENOSPC points are set with HUBD_TEST_FAULT (hubd/store.py), read once by the daemon at start."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
from pathlib import Path

import pytest

from hubd.config import Settings
from hubd.layout import open_cache
from hubd.store import ObjectMeta, Ref, Store
from hubd.tree import FileRecord, TreeListing
from hubd.verify import full_problems
from tests.conftest import Upstream
from tests.daemon import Daemon, start_daemon

AFTER_OBJECT = ["object", "meta", "ref", "done", "index"]
"""Kill points after which the object is in objects/: the next fetch must not download it again."""


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def assert_cache_consistent(cache: Path) -> int:
    """Every object has a meta and passes a full re-hash, every meta an object, every name a ref to it and every
    ref an object; nothing pending, staged or half-written. Returns the number of objects."""
    store = Store(cache, fsync=False)
    objects = {p.name for p in store.objects.iterdir()}
    metas = {meta.digest: meta for meta in store.iter_meta()}
    assert objects == set(metas), (objects, set(metas))
    refs = {ref.canonical: ref.digest for ref in store.iter_refs()}
    for digest, meta in metas.items():
        assert full_problems(store.object_path(digest), meta.listing) == [], digest
        assert meta.names and all(refs.get(name) == digest for name in meta.names), (meta.names, refs)
    assert set(refs.values()) <= objects, refs
    assert list(store.pending.iterdir()) == []
    assert [p.name for p in store.staging.iterdir() if not p.name.endswith(".lock")] == []
    assert [p for folder in (store.meta_dir, store.refs) for p in folder.iterdir() if p.name.startswith(".")] == []
    return len(objects)


def _resolve(daemon: Daemon, handle: str) -> tuple[int, dict[str, object]]:
    reply = daemon.request("POST", "/v1/resolve", {"handle": handle})
    return reply.status, reply.json()


def _resolve_into_a_crash(daemon: Daemon, handle: str) -> None:
    """Resolve while the daemon kills itself at its fault point; returns once it is dead."""
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        daemon.request("POST", "/v1/resolve", {"handle": handle})
    assert daemon.proc.wait(60) == -9


def _all_ok(daemon: Daemon) -> list[str]:
    return [m["state"] for m in daemon.request("GET", "/v1/models").json()["models"] if m["state"] != "ok"]


@pytest.mark.parametrize("step", ["pending", *AFTER_OBJECT])
def test_sigkill_after_each_publish_step_recovers_and_never_downloads_twice(
    settings: Settings, upstream: Upstream, tmp_path: Path, step: str
) -> None:
    path = upstream.publish("reusable")
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_TEST_FAULT": f"kill:{step}"})
    _resolve_into_a_crash(daemon, tfhub(path))
    downloads = upstream.requests(path)
    daemon = start_daemon(settings, tmp_path)  # recovers at start
    try:
        assert assert_cache_consistent(settings.cache_dir) == (step in AFTER_OBJECT)
        status, entry = _resolve(daemon, tfhub(path))
        assert status == 200, entry
        assert (upstream.requests(path) == downloads) == (step in AFTER_OBJECT), "downloaded again"
        assert _all_ok(daemon) == []  # never shown as quarantined
        verified = daemon.request("POST", "/v1/verify", {}).json()["results"]
        assert [r["problems"] for r in verified] == [[]]
        assert assert_cache_consistent(settings.cache_dir) == 1
    finally:
        daemon.stop()
    recovered = "finished the publish" in daemon.log()
    assert recovered == (step in ("object", "meta", "ref")), daemon.log()


@pytest.mark.parametrize("step", ["pending", "object", "meta", "ref"])
def test_disk_full_at_each_publish_step_is_507_and_leaves_nothing(
    settings: Settings, upstream: Upstream, tmp_path: Path, step: str
) -> None:
    path = upstream.publish("reusable")
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_TEST_FAULT": f"enospc:{step}"})
    try:
        status, body = _resolve(daemon, tfhub(path))
        assert (status, body["error"]["code"]) == (507, "disk_full"), body  # type: ignore[index]
        assert assert_cache_consistent(settings.cache_dir) == 0
    finally:
        daemon.stop()
    daemon = start_daemon(settings, tmp_path)
    try:
        assert _resolve(daemon, tfhub(path))[0] == 200
        assert assert_cache_consistent(settings.cache_dir) == 1
    finally:
        daemon.stop()


@pytest.mark.parametrize("step", ["meta", "ref"])
def test_disk_full_while_adding_a_name_keeps_the_existing_entry_whole(
    settings: Settings, upstream: Upstream, tmp_path: Path, step: str
) -> None:
    first, second = upstream.publish("reusable"), upstream.publish("reusable")  # one content, two handles
    daemon = start_daemon(settings, tmp_path)
    try:
        assert _resolve(daemon, tfhub(first))[0] == 200
    finally:
        daemon.stop()
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_TEST_FAULT": f"enospc:{step}"})
    try:
        assert _resolve(daemon, tfhub(second))[0] == 507
        status, entry = _resolve(daemon, tfhub(first))
        assert status == 200 and entry["handles"] == [f"tfhub.dev/{first}"], entry
        assert assert_cache_consistent(settings.cache_dir) == 1
    finally:
        daemon.stop()


def test_disk_full_on_the_index_is_logged_and_the_fetch_succeeds(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_TEST_FAULT": "enospc:index"})
    try:
        status, entry = _resolve(daemon, tfhub(path))
        assert status == 200, entry
        assert [m["id"] for m in daemon.request("GET", "/v1/models").json()["models"]] == [entry["id"]]
        assert assert_cache_consistent(settings.cache_dir) == 1
    finally:
        daemon.stop()
    assert "rebuilding it from meta/ and refs/" in daemon.log()


def _garbage(index: Path) -> None:
    (index / "cache.db").write_bytes(b"not a database\n" * 512)


def _delete_file(index: Path) -> None:
    (index / "cache.db").unlink()


def _delete_dir(index: Path) -> None:
    import shutil

    shutil.rmtree(index)


@pytest.mark.parametrize(
    "damage", [_garbage, _delete_file, _delete_dir], ids=["corrupted", "db deleted", "deleted"]
)
def test_index_damaged_while_running_is_rebuilt_and_every_resolve_succeeds(
    settings: Settings, upstream: Upstream, tmp_path: Path, damage: object
) -> None:
    cached, new = upstream.publish("reusable"), upstream.publish("text_embedding")
    daemon = start_daemon(settings, tmp_path)
    try:
        first = _resolve(daemon, tfhub(cached))[1]
        damage(settings.cache_dir / "index")  # type: ignore[operator]
        status, again = _resolve(daemon, tfhub(cached))
        assert status == 200 and again["path"] == first["path"], again
        status, entry = _resolve(daemon, tfhub(new))
        assert status == 200, entry
        listed = {m["id"] for m in daemon.request("GET", "/v1/models").json()["models"]}
        assert listed == {first["id"], entry["id"]}
        assert assert_cache_consistent(settings.cache_dir) == 2
    finally:
        daemon.stop()
    assert daemon.log().count("rebuilding it from meta/ and refs/") == 1, daemon.log()


def test_concurrent_publishers_of_one_object_keep_every_name(tmp_path: Path) -> None:
    """Racing publishers of equal content: one object, one meta whose names are the union, the first one's kept."""
    store = Store(tmp_path / "cache", fsync=False)
    open_cache(store)
    payload = b"graph"
    listing = TreeListing(files={"saved_model.pb": FileRecord(len(payload), hashlib.sha256(payload).hexdigest())})
    digest = listing.digest()
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def publisher(n: int) -> None:
        try:
            staging = store.new_staging()
            staging.tree.mkdir()
            (staging.tree / "saved_model.pb").write_bytes(payload)
            name = f"tfhub.dev/race/model-{n}/1"
            meta = ObjectMeta(digest, "0" * 64, len(payload), float(n), listing, [name])
            ref = Ref(name, f"https://{name}", digest, "0" * 64, 0.0)
            barrier.wait()
            store.publish_entry(staging.tree, meta, [(f"{n:032x}", ref)])
            staging.cleanup()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    meta = store.read_meta(digest)
    assert meta is not None and sorted(meta.names) == sorted(f"tfhub.dev/race/model-{n}/1" for n in range(8))
    assert meta.names[0] == f"tfhub.dev/race/model-{int(meta.fetched_at)}/1"  # the winner's meta, names added
    assert assert_cache_consistent(store.root) == 1
    assert json.loads((store.refs / f"{3:032x}.json").read_text())["digest"] == digest


CRASHING_PUBLISHER = """
import hashlib, sys
from pathlib import Path
from hubd.layout import open_cache
from hubd.store import ObjectMeta, Ref, Store
from hubd.tree import FileRecord, TreeListing

store = Store(Path(sys.argv[1]), fsync=False)
open_cache(store)
payload = b"graph"
listing = TreeListing(files={"saved_model.pb": FileRecord(len(payload), hashlib.sha256(payload).hexdigest())})
staging = store.new_staging()
staging.tree.mkdir()
(staging.tree / "saved_model.pb").write_bytes(payload)
name = "tfhub.dev/crashed/model/1"
meta = ObjectMeta(listing.digest(), "0" * 64, len(payload), 0.0, listing, [name])
try:
    store.publish_entry(staging.tree, meta, [("0" * 32, Ref(name, "https://" + name, meta.digest, "0" * 64, 0.0))])
except OSError as exc:
    staging.cleanup()
    sys.exit(exc.errno)
"""


@pytest.mark.parametrize("step", ["pending", "object", "meta"])
def test_a_fetch_finishes_the_publish_another_process_crashed_in(tmp_path: Path, step: str) -> None:
    """No restart: the next fetch of the handle (holding its flock) re-links what a crashed CLI left."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = {**os.environ, "HUBD_TEST_FAULT": f"kill:{step}"}
    crashed = subprocess.run([sys.executable, "-c", CRASHING_PUBLISHER, str(cache)], env=env, check=False)
    assert crashed.returncode == -9
    store = Store(cache, fsync=False)
    assert store.read_ref("0" * 32) is None and list(store.pending.glob("*.json"))
    store.clean_stale_staging()
    recovered = store.recover_pending("0" * 32, held=True)
    assert (recovered != []) == (step != "pending")
    ref = store.read_ref("0" * 32)
    assert (ref is not None) == (step != "pending")
    assert list(store.pending.iterdir()) == []
    assert assert_cache_consistent(cache) == (step != "pending")


@pytest.mark.parametrize("step", ["pending", "object", "meta", "ref"])
def test_a_full_disk_at_any_publish_step_undoes_the_whole_publish(tmp_path: Path, step: str) -> None:
    import errno
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = {**os.environ, "HUBD_TEST_FAULT": f"enospc:{step}"}
    failed = subprocess.run([sys.executable, "-c", CRASHING_PUBLISHER, str(cache)], env=env, check=False)
    assert failed.returncode == errno.ENOSPC
    assert assert_cache_consistent(cache) == 0
    assert list((cache / "refs").iterdir()) == [] and list((cache / "meta").iterdir()) == []
