"""hubd.store: the on-disk cache (publish, refs, pins, quarantine, crash recovery), on a real directory."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

import pytest
from hubd_client.handles import AnyHost, parse_handle

from hubd.errors import UntrustedCache
from hubd.layout import open_cache
from hubd.store import ObjectMeta, Store
from tests.unit.trees import meta_of, ref_to, write_tree

HANDLE = "https://tfhub.dev/google/model/1"
SOURCE = parse_handle(HANDLE, AnyHost())


def staged(store: Store, *names: str) -> tuple[Path, ObjectMeta]:
    """A minimal SavedModel written into a staging directory, as an extraction leaves it, and its meta."""
    staging = store.new_staging()
    return staging.tree, meta_of(write_tree(staging.tree), *names)


def test_a_fresh_cache_has_its_layout_a_version_and_a_cachedir_tag(store: Store) -> None:
    for public in ("objects", "meta", "refs", "pins"):
        assert stat.S_IMODE((store.root / public).stat().st_mode) == 0o755
    for private in ("staging", "quarantine", "locks", "pending"):
        assert stat.S_IMODE((store.root / private).stat().st_mode) == 0o700
    assert (store.root / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert (store.root / "layout-version").read_text() == "2\n"


def test_the_index_directory_is_the_daemons_alone_also_on_a_cache_an_older_hubd_made(tmp_path: Path) -> None:
    (tmp_path / "index").mkdir(mode=0o755)  # as diskcache made it: others could lock SQLite's shared memory
    (tmp_path / "index").chmod(0o755)
    open_cache(Store(tmp_path, fsync=False))
    assert stat.S_IMODE((tmp_path / "index").stat().st_mode) == 0o700
    fresh = tmp_path / "fresh"
    open_cache(Store(fresh, fsync=False))
    assert stat.S_IMODE((fresh / "index").stat().st_mode) == 0o700


def test_a_cache_others_could_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable and not sticky: anyone could plant a model
    with pytest.raises(UntrustedCache) as refused:
        open_cache(Store(shared / "cache", fsync=False))
    assert not (shared / "cache").exists()
    assert "another user could choose the models" in refused.value.message


@pytest.mark.parametrize("digest", ["../../etc", "A" * 64, "a" * 63, "g" * 64, ""])
def test_object_paths_are_only_for_tree_digests(store: Store, digest: str) -> None:
    with pytest.raises(ValueError, match="not a tree digest"):
        store.object_path(digest)


def test_publish_makes_a_sealed_object_its_meta_and_its_refs(store: Store) -> None:
    staging = store.new_staging()
    meta = meta_of(write_tree(staging.tree), SOURCE.canonical)
    store.publish_entry(staging.tree, meta, [(SOURCE.ref_key, ref_to(meta, SOURCE.canonical, HANDLE))])
    staging.cleanup()

    obj = store.object_path(meta.digest)
    assert not staging.tree.exists()
    assert stat.S_IMODE(obj.stat().st_mode) == 0o555
    assert stat.S_IMODE((obj / "variables").stat().st_mode) == 0o555
    assert stat.S_IMODE((obj / "saved_model.pb").stat().st_mode) == 0o444
    assert store.read_meta(meta.digest) == meta
    ref = store.read_ref(SOURCE.ref_key)
    assert ref is not None and ref.digest == meta.digest and ref.handle == HANDLE
    assert list(store.pending.iterdir()) == []  # the pending record is dropped once the refs are written
    assert store.object_digests() == {meta.digest}


def test_an_equal_tree_published_again_keeps_the_first_and_adds_its_names(store: Store) -> None:
    first, meta = staged(store, "tfhub.dev/a/model/1")
    digest = store.publish(first, meta).name
    inode = store.object_path(digest).stat().st_ino
    second, again = staged(store, "kaggle.com/b/model/1")
    merged = store.publish_entry(second, again, [])
    assert merged.names == ["tfhub.dev/a/model/1", "kaggle.com/b/model/1"]
    assert store.object_path(digest).stat().st_ino == inode  # the existing object won
    assert not second.exists()


def test_a_failed_publish_leaves_nothing_behind(store: Store) -> None:
    """A full disk mid-publish (here: the refs directory cannot be written) undoes every step already made."""
    tree, meta = staged(store, SOURCE.canonical)
    digest = meta.digest
    os.rmdir(store.refs)
    store.refs.write_bytes(b"not a directory")  # writing a ref into it fails with an OSError
    with pytest.raises(OSError):
        store.publish_entry(tree, meta, [(SOURCE.ref_key, ref_to(meta, SOURCE.canonical))])
    assert not store.object_path(digest).exists()
    assert store.read_meta(digest) is None
    assert list(store.pending.iterdir()) == []


def test_an_interrupted_publish_is_finished_from_its_pending_record(store: Store) -> None:
    """A crash after the object was renamed into place, before its meta and ref: the next start completes it."""
    tree, meta = staged(store, SOURCE.canonical)
    digest = meta.digest
    ref = ref_to(meta, SOURCE.canonical, HANDLE)
    store._write_pending(SOURCE.ref_key, meta, [(SOURCE.ref_key, ref)])
    os.rename(tree, store.objects / digest)  # the publish got this far, then the process died

    assert store.recover_pending() == [digest]
    assert store.read_ref(SOURCE.ref_key) == ref
    recovered = store.read_meta(digest)
    assert recovered is not None and recovered.names == [SOURCE.canonical]
    assert list(store.pending.iterdir()) == []


def test_a_pending_record_whose_object_never_arrived_is_dropped(store: Store) -> None:
    _tree, meta = staged(store, SOURCE.canonical)
    store._write_pending(SOURCE.ref_key, meta, [(SOURCE.ref_key, ref_to(meta, SOURCE.canonical))])
    assert store.recover_pending() == []
    assert list(store.pending.iterdir()) == []
    assert store.read_ref(SOURCE.ref_key) is None


def test_an_interrupted_publish_of_a_damaged_object_is_quarantined_not_linked(store: Store) -> None:
    tree, meta = staged(store, SOURCE.canonical)
    digest = meta.digest
    store._write_pending(SOURCE.ref_key, meta, [(SOURCE.ref_key, ref_to(meta, SOURCE.canonical))])
    (tree / "saved_model.pb").write_bytes(b"torn")  # the crash left a file short
    os.rename(tree, store.objects / digest)
    assert store.recover_pending() == []
    assert store.read_ref(SOURCE.ref_key) is None
    assert not (store.objects / digest).exists()
    assert any(p.name.startswith(digest) for p in store.quarantine_dir.iterdir())


def test_a_pending_record_held_by_a_live_publisher_is_left_alone(store: Store) -> None:
    tree, meta = staged(store, SOURCE.canonical)
    digest = meta.digest
    store._write_pending(SOURCE.ref_key, meta, [(SOURCE.ref_key, ref_to(meta, SOURCE.canonical))])
    os.rename(tree, store.objects / digest)
    fd = os.open(store.lock_path(SOURCE.ref_key), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the publisher is alive and holds its handle's lock
        assert store.recover_pending() == []
        assert (store.pending / f"{SOURCE.ref_key}.json").exists()
    finally:
        os.close(fd)
    assert store.recover_pending() == [digest]


def test_stale_staging_of_a_dead_owner_is_removed_a_live_ones_kept(store: Store) -> None:
    live = store.new_staging()
    write_tree(live.tree)
    dead = store.staging / "12345-deadbeef"
    write_tree(dead / "tree")
    (store.staging / "12345-deadbeef.lock").touch()  # its owner died: nobody holds the flock
    orphan = store.staging / "no-lock-file"
    orphan.mkdir()
    assert store.clean_stale_staging() == 2
    assert live.tree.is_dir() and not dead.exists() and not orphan.exists()
    live.cleanup()
    assert list(store.staging.iterdir()) == []


def test_quarantine_moves_the_object_aside_with_its_reason_and_keeps_the_meta(store: Store) -> None:
    tree, meta = staged(store)
    digest = store.publish(tree, meta).name
    moved = store.quarantine(digest, "sha256 mismatch")
    assert moved is not None and moved.parent == store.quarantine_dir and moved.is_dir()
    assert (store.quarantine_dir / f"{moved.name}.reason").read_text() == "sha256 mismatch\n"
    assert digest not in store.object_digests()
    assert store.read_meta(digest) is not None
    assert store.quarantine(digest, "again") is None  # nothing left to move


def test_remove_object_takes_the_tree_its_meta_and_its_pin(store: Store) -> None:
    tree, meta = staged(store)
    digest = store.publish(tree, meta).name
    store.pin(digest, "manifest.toml")
    store.remove_object(digest)
    assert not store.object_path(digest).exists()
    assert store.read_meta(digest) is None
    assert not store.is_pinned(digest)
    assert [p for p in store.staging.iterdir() if p.name.startswith("deleted-")] == []


def test_pins_collect_names_and_are_listed_in_one_go(store: Store) -> None:
    digest = "c" * 64
    store.pin(digest, "a.toml")
    store.pin(digest, "b.toml")
    store.pin(digest, "a.toml")
    assert store.pin_names(digest) == ["a.toml", "b.toml"]
    assert store.pinned_digests() == {digest} and store.is_pinned(digest)
    store.unpin(digest)
    assert store.pinned_digests() == set() and store.pin_names(digest) == []


def test_unreadable_refs_and_metas_are_skipped_not_fatal(store: Store) -> None:
    tree, meta = staged(store, SOURCE.canonical)
    digest = meta.digest
    store.publish_entry(tree, meta, [(SOURCE.ref_key, ref_to(meta, SOURCE.canonical))])
    (store.refs / "torn.json").write_text('{"canonical": "x", "hand')
    (store.meta_dir / f"{'d' * 64}.json").write_text(json.dumps({"digest": "d" * 64}))
    assert [key for key, _ref in store.ref_items()] == [SOURCE.ref_key]
    assert [m.digest for m in store.iter_meta()] == [digest]


def test_atomic_writes_leave_no_temp_file_when_they_fail(store: Store) -> None:
    target = store.refs / "x.json"
    target.mkdir()  # os.replace onto a directory fails after the temp file was written
    with pytest.raises(OSError):
        store.write_file(target, b"{}")
    assert [p.name for p in store.refs.iterdir()] == ["x.json"]
