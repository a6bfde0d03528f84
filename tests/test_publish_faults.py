"""Publishing under faults: a daemon SIGKILLed between any two of publish's writes, a full disk at each write,
the index deleted or corrupted under a running daemon. After each the cache is consistent (every object has
its meta and refs, nothing pending or staged), the next resolve succeeds, and an object that reached objects/
before the crash is re-linked without downloading it again.

Crash and ENOSPC points are set with HUBD_TEST_FAULT (hubd/store.py), read once by the daemon at start."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from hubd.store import ObjectMeta, Ref, Store
from hubd.tree import FileRecord, TreeManifest
from hubd.verify import full_problems


def assert_cache_consistent(cache: Path) -> int:
    """Every object has a meta and passes a full re-hash, every meta an object, every name a ref to it and every
    ref an object; nothing pending, staged or half-written. Returns the number of objects."""
    store = Store(cache, fsync=False)
    objects = {p.name for p in store.objects.iterdir()}
    metas = {meta.digest: meta for meta in store.iter_meta()}
    assert objects == set(metas), (objects, set(metas))
    refs = {ref.canonical: ref.digest for ref in store.iter_refs()}
    for digest, meta in metas.items():
        assert full_problems(store.object_path(digest), meta.manifest) == [], digest
        assert meta.names and all(refs.get(name) == digest for name in meta.names), (meta.names, refs)
    assert set(refs.values()) <= objects, refs
    assert list(store.pending.iterdir()) == []
    assert [p.name for p in store.staging.iterdir() if not p.name.endswith(".lock")] == []
    assert [p for folder in (store.meta_dir, store.refs) for p in folder.iterdir() if p.name.startswith(".")] == []
    return len(objects)


def test_concurrent_publishers_of_one_object_keep_every_name(tmp_path: Path) -> None:
    """Racing publishers of equal content: one object, one meta whose names are the union, the first one's kept."""
    store = Store(tmp_path / "cache", fsync=False)
    store.ensure_layout()
    payload = b"graph"
    manifest = TreeManifest(
        files={"saved_model.pb": FileRecord(len(payload), hashlib.sha256(payload).hexdigest())}
    )
    digest = manifest.digest()
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def publisher(n: int) -> None:
        try:
            staging = store.new_staging()
            staging.tree.mkdir()
            (staging.tree / "saved_model.pb").write_bytes(payload)
            name = f"tfhub.dev/race/model-{n}/1"
            meta = ObjectMeta(digest, "0" * 64, len(payload), float(n), manifest, [name])
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
from hubd.store import ObjectMeta, Ref, Store
from hubd.tree import FileRecord, TreeManifest

store = Store(Path(sys.argv[1]), fsync=False)
store.ensure_layout()
payload = b"graph"
manifest = TreeManifest(files={"saved_model.pb": FileRecord(len(payload), hashlib.sha256(payload).hexdigest())})
staging = store.new_staging()
staging.tree.mkdir()
(staging.tree / "saved_model.pb").write_bytes(payload)
name = "tfhub.dev/crashed/model/1"
meta = ObjectMeta(manifest.digest(), "0" * 64, len(payload), 0.0, manifest, [name])
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
