"""hubd.index: the diskcache index of summaries, names, last-use times and totals, on a real cache directory."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import sqlite3
import time
from pathlib import Path

import diskcache
import pytest

from hubd.index import INDEX_FORMAT, Index
from hubd.store import ObjectMeta, Ref, Store
from hubd.tree import FileRecord, TreeListing


def published(store: Store, n: int, *names: str) -> ObjectMeta:
    """Publish a distinct one-file tree with refs for `names`, as a fetch leaves the files (no index update)."""
    staging = store.new_staging()
    data = f"graph {n}".encode()
    staging.tree.mkdir()
    (staging.tree / "saved_model.pb").write_bytes(data)
    listing = TreeListing(files={"saved_model.pb": FileRecord(len(data), hashlib.sha256(data).hexdigest())})
    digest = listing.digest()
    meta = ObjectMeta(
        digest, hashlib.sha256(data).hexdigest(), len(data), 1_700_000_000.0 + n, listing, list(names)
    )
    refs = [
        (_ref_key(name), Ref(name, f"https://{name}", digest, meta.archive_sha256, meta.fetched_at))
        for name in names
    ]
    store.publish_entry(staging.tree, meta, refs)
    staging.cleanup()
    return meta


def _ref_key(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@pytest.fixture
def index(store: Store) -> Index:
    opened = Index(store)
    opened.rebuild_if_needed()
    return opened


def test_a_recorded_entry_has_a_summary_and_counts_once_in_the_totals(store: Store, index: Index) -> None:
    meta = published(store, 1, "tfhub.dev/a/b/1")
    index.record(meta)
    index.record(meta)  # a second publisher of the same tree
    summary = index.summary(meta.digest)
    assert summary is not None
    assert (summary["size_bytes"], summary["names"], summary["users"]) == (
        meta.size_bytes,
        ["tfhub.dev/a/b/1"],
        [],
    )
    assert index.totals() == {"entries": 1, "size_bytes": meta.size_bytes, "users": {}}
    assert index.last_used(meta.digest) == meta.fetched_at


def test_names_are_looked_up_by_name_and_by_digest(store: Store, index: Index) -> None:
    first, second = published(store, 1, "tfhub.dev/a/one/1"), published(store, 2, "tfhub.dev/a/two/1")
    for meta in (first, second):
        index.record(meta)
        index.bind(meta.names[0], meta.digest)
    index.bind("kaggle.com/models/a/one/tensorFlow2/x/1", first.digest)
    assert index.digest_of("tfhub.dev/a/one/1") == first.digest
    assert index.names_of(first.digest) == ["tfhub.dev/a/one/1", "kaggle.com/models/a/one/tensorFlow2/x/1"]
    index.bind("kaggle.com/models/a/one/tensorFlow2/x/1", second.digest)  # the name moves to another entry
    assert index.names_of(first.digest) == ["tfhub.dev/a/one/1"]
    assert "kaggle.com/models/a/one/tensorFlow2/x/1" in index.names_of(second.digest)
    index.unbind("tfhub.dev/a/one/1")
    assert index.digest_of("tfhub.dev/a/one/1") is None
    assert index.names_of(first.digest) == []


def test_forgetting_an_entry_drops_its_rows_its_names_and_its_share_of_the_totals(
    store: Store, index: Index
) -> None:
    kept, gone = published(store, 1, "tfhub.dev/a/kept/1"), published(store, 2, "tfhub.dev/a/gone/1")
    for meta in (kept, gone):
        index.record(meta)
        index.bind(meta.names[0], meta.digest)
        index.attribute(meta.digest, 1000)
    index.bind("tfhub.dev/a/alias/1", gone.digest)
    index.touch(gone.digest)
    index.forget(gone.digest)
    assert index.summary(gone.digest) is None
    assert index.last_used(gone.digest) is None
    assert index.digest_of("tfhub.dev/a/gone/1") is None
    assert index.digest_of("tfhub.dev/a/alias/1") is None  # found by its tag: no scan of the names
    assert index.digest_of("tfhub.dev/a/kept/1") == kept.digest
    assert index.totals() == {
        "entries": 1,
        "size_bytes": kept.size_bytes,
        "users": {"1000": [1, kept.size_bytes]},
    }


def test_forget_all_drops_many_entries_and_unbinds_the_names_given(store: Store, index: Index) -> None:
    metas = [published(store, n, f"tfhub.dev/a/m{n}/1") for n in range(5)]
    for meta in metas:
        index.record(meta)
        index.bind(meta.names[0], meta.digest)
    index.bind("tfhub.dev/a/other/1", metas[4].digest)
    index.forget_all([m.digest for m in metas[:3]], names=["tfhub.dev/a/other/1"])
    assert [index.summary(m.digest) is not None for m in metas] == [False, False, False, True, True]
    assert [index.digest_of(m.names[0]) is not None for m in metas] == [False, False, False, True, True]
    assert index.digest_of("tfhub.dev/a/other/1") is None
    assert index.totals()["entries"] == 2


def test_users_are_counted_once_per_entry_and_uid(store: Store, index: Index) -> None:
    small, large = published(store, 1, "tfhub.dev/a/s/1"), published(store, 22222, "tfhub.dev/a/l/1")
    for meta in (small, large):
        index.record(meta)
    for digest, uid in ((small.digest, 1000), (small.digest, 1000), (large.digest, 1000), (large.digest, 0)):
        index.attribute(digest, uid)
    summary = index.summary(small.digest)
    assert summary is not None and summary["users"] == [1000]
    assert index.totals()["users"] == {
        "1000": [2, small.size_bytes + large.size_bytes],
        "0": [1, large.size_bytes],
    }


def test_last_use_is_kept_in_memory_until_a_flush_writes_it(store: Store, index: Index) -> None:
    meta = published(store, 1, "tfhub.dev/a/b/1")
    index.record(meta)
    before = time.time()
    index.touch(meta.digest)
    other = Index(store)  # another process's view: the use is not written yet
    assert other.last_used(meta.digest) == meta.fetched_at
    index.flush()
    used = other.last_used(meta.digest)
    assert used is not None and used >= before
    other.close()


def test_a_lost_index_is_rebuilt_from_the_files_with_names_and_users(store: Store, tmp_path: Path) -> None:
    metas = [published(store, n, f"tfhub.dev/a/m{n}/1") for n in range(3)]
    shutil.rmtree(store.root / "index", ignore_errors=True)
    users = {metas[0].digest: [1000, 0]}
    index = Index(store, users_of=lambda digest: users.get(digest, []))
    assert index.rebuild_if_needed() is True
    assert index.caught_up
    for meta in metas:
        assert index.digest_of(meta.names[0]) == meta.digest
        assert index.names_of(meta.digest) == meta.names
    assert index.totals() == {
        "entries": 3,
        "size_bytes": sum(m.size_bytes for m in metas),
        "users": {"0": [1, metas[0].size_bytes], "1000": [1, metas[0].size_bytes]},
    }


def test_an_entry_a_crash_left_unindexed_is_added_when_the_index_is_opened(store: Store, index: Index) -> None:
    recorded = published(store, 1, "tfhub.dev/a/recorded/1")
    index.record(recorded)
    index.close()
    unrecorded = published(store, 2, "tfhub.dev/a/unrecorded/1")  # the crash came before the index update
    reopened = Index(store)
    assert reopened.rebuild_if_needed() is False
    assert reopened.caught_up
    assert reopened.summary(unrecorded.digest) is not None
    assert reopened.digest_of("tfhub.dev/a/unrecorded/1") == unrecorded.digest
    assert reopened.totals()["entries"] == 2
    reopened.close()
    again = Index(store)
    again.rebuild_if_needed()
    assert not again.caught_up  # in step with the files: opening it read one listing and one row


def test_an_entry_a_crash_removed_without_its_index_update_is_dropped_and_counted_again_if_republished(
    store: Store, index: Index
) -> None:
    kept, removed = published(store, 1, "tfhub.dev/a/kept/1"), published(store, 2, "tfhub.dev/a/removed/1")
    index.record(kept)
    index.record(removed)
    index.close()
    store.remove_object(removed.digest)  # the crash came before the index forgot it
    reopened = Index(store)
    reopened.rebuild_if_needed()
    assert reopened.caught_up and reopened.summary(removed.digest) is None
    assert reopened.size_bytes() == kept.size_bytes
    again = published(store, 2, "tfhub.dev/a/removed/1")  # fetched again: a new entry, counted as one
    reopened.record(again)
    assert reopened.size_bytes() == kept.size_bytes + again.size_bytes  # agrees with meta/: the quota trusts it
    reopened.close()


def test_an_index_of_an_older_format_is_rebuilt(store: Store) -> None:
    meta = published(store, 1, "tfhub.dev/a/b/1")
    old = diskcache.Cache(str(store.root / "index"))
    old.set("format", INDEX_FORMAT - 1)
    old.set("built", time.time())
    old.set("name:tfhub.dev/a/b/1", meta.digest)  # untagged: forgetting it by tag would miss it
    old.close()
    index = Index(store)
    assert index.rebuild_if_needed() is True
    index.forget(meta.digest)
    assert index.digest_of("tfhub.dev/a/b/1") is None


def test_a_pickled_row_is_never_unpickled_and_the_index_is_rebuilt(store: Store, index: Index) -> None:
    meta = published(store, 1, "tfhub.dev/a/b/1")
    index.rebuild()
    index.close()
    with sqlite3.connect(store.root / "index" / "cache.db") as db:  # what someone else's diskcache would write
        db.execute(
            "UPDATE Cache SET mode = ?, value = ? WHERE key = ?",
            (diskcache.core.MODE_PICKLE, pickle.dumps({"evil": True}), f"entry:{meta.digest}"),
        )
    reopened = Index(store)
    summary = reopened.summary(meta.digest)
    assert summary is not None and summary["digest"] == meta.digest  # rebuilt from the files, not unpickled


def test_one_off_jobs_are_remembered_until_the_index_is_rebuilt(index: Index) -> None:
    assert index.last_run("forget-credentials") is None
    index.ran("forget-credentials", 1234.5)
    assert index.last_run("forget-credentials") == 1234.5
    index.rebuild()
    assert index.last_run("forget-credentials") is None


def test_the_meta_listing_sees_every_new_entry(store: Store) -> None:
    assert store.meta_digests() == ()
    first = published(store, 1, "tfhub.dev/a/one/1")
    assert store.meta_digests() == (first.digest,)
    second = published(store, 2, "tfhub.dev/a/two/1")  # within the same mtime tick, maybe: still seen
    assert store.meta_digests() == tuple(sorted([first.digest, second.digest]))
