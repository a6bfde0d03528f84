"""hubd.layout: the cache's layout version; a newer one is refused, an older one (version 1) migrated."""

from __future__ import annotations

import dataclasses

import pytest
from hubd_client.handles import AnyHost, parse_handle

from hubd.errors import LayoutTooNew
from hubd.layout import LAYOUT_VERSION, VERSION_FILE, open_layout, read_version
from hubd.store import ObjectMeta, Store
from tests.unit.trees import meta_of, ref_to, write_tree

HANDLE = "https://tfhub.dev/google/model/1"


def publish_v1(store: Store, files: dict[str, bytes] | None = None, handle: str = HANDLE) -> ObjectMeta:
    """An entry as hubd wrote it before layout versions: the object named by the version 1 digest."""
    staging = store.new_staging()
    listing = write_tree(staging.tree, files)
    source = parse_handle(handle, AnyHost())
    meta = dataclasses.replace(meta_of(listing, source.canonical), digest=listing.legacy_digest())
    store.publish(staging.tree, meta)
    staging.cleanup()
    store.write_ref(source.ref_key, ref_to(meta, source.canonical, handle))
    return meta


def version_1(store: Store) -> None:
    (store.root / VERSION_FILE).unlink()


def test_an_empty_cache_is_the_current_version(store: Store) -> None:
    version_1(store)  # no file, and nothing in the cache: nothing to migrate
    assert read_version(store) == LAYOUT_VERSION
    assert open_layout(store) is None
    assert (store.root / VERSION_FILE).read_text() == f"{LAYOUT_VERSION}\n"


def test_a_newer_layout_is_refused_and_left_untouched(store: Store) -> None:
    (store.root / VERSION_FILE).write_text(f"{LAYOUT_VERSION + 1}\n")
    with pytest.raises(LayoutTooNew, match="understands up to") as refused:
        open_layout(store)
    assert "upgrade hubd" in refused.value.hint and refused.value.code == "cache_layout_unsupported"
    assert (store.root / VERSION_FILE).read_text() == f"{LAYOUT_VERSION + 1}\n"


def test_a_version_file_that_is_not_a_number_is_refused_with_a_remedy(store: Store) -> None:
    (store.root / VERSION_FILE).write_text("garbage\n")
    with pytest.raises(LayoutTooNew, match="not a layout version") as refused:
        open_layout(store)
    assert "HUBD_CACHE_DIR" in refused.value.hint


def test_a_cache_with_entries_and_no_version_file_is_version_1(store: Store) -> None:
    publish_v1(store)
    version_1(store)
    assert read_version(store) == 1


def test_version_1_objects_refs_and_pins_move_to_their_version_2_digest(store: Store) -> None:
    old = publish_v1(store)
    store.pin(old.digest, "team.toml")
    version_1(store)

    migration = open_layout(store)

    new = old.listing.digest()
    assert migration is not None and migration.renamed == {old.digest: new}
    assert store.object_digests() == {new}
    assert store.read_meta(old.digest) is None
    meta = store.read_meta(new)
    assert meta is not None and meta.names == old.names
    ref = store.read_ref(parse_handle(HANDLE, AnyHost()).ref_key)
    assert ref is not None and ref.digest == new
    assert store.pin_names(new) == ["team.toml"] and not store.is_pinned(old.digest)
    assert (store.root / VERSION_FILE).read_text() == f"{LAYOUT_VERSION}\n"
    assert open_layout(store) is None  # done once: the next start has nothing to do


def test_two_version_1_objects_with_one_version_2_tree_become_one(store: Store) -> None:
    """Version 1 digests could differ for the same tree's twins; version 2 merges them, keeping both names."""
    first = publish_v1(store, handle=HANDLE)
    staging = store.new_staging()
    listing = write_tree(staging.tree)
    twin = dataclasses.replace(meta_of(listing, "kaggle.com/models/g/m/tensorflow2/v/1"), digest="e" * 64)
    store.publish(staging.tree, twin)
    staging.cleanup()
    version_1(store)

    open_layout(store)

    new = first.listing.digest()
    assert store.object_digests() == {new}
    meta = store.read_meta(new)
    assert meta is not None and set(meta.names) == {*first.names, *twin.names}


def test_version_1_objects_that_break_version_2_rules_are_quarantined(store: Store) -> None:
    bad = publish_v1(store, {"saved_model.pb": b"g", "assets/new\nline": b"x"})
    version_1(store)
    migration = open_layout(store)
    assert migration is not None and migration.quarantined == [bad.listing.digest()]
    assert store.object_digests() == set()
