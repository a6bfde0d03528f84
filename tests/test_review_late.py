"""A late review of the users lock (catalog.attribute), index/ made 0700 and the reconcile that drops stale rows:
what a local user can reach, and what a reconcile racing another process's publish does to the index."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubd.catalog import Catalog
from hubd.index import Index
from hubd.layout import open_cache
from hubd.store import ObjectMeta, Store
from tests.unit.test_index import published
from tests.users import LocalUser, shared_dir

DIGEST = "cd" * 32

# Opens the file read-only (all a flock or a POSIX read lock needs) and tries to lock it without waiting.
TRY_TO_LOCK = """
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    print("locked")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_a_local_user_can_lock_neither_the_users_lock_nor_the_index(attacker: LocalUser) -> None:
    """The users lock is taken on the daemon's event loop: a local user holding it would stall every request.
    locks/ is 0700 and the lock 0600, and index/ (SQLite's shared memory) is 0700: both out of reach."""
    with shared_dir() as public:
        cache = public / "cache"
        store = Store(cache, fsync=False)
        open_cache(store)
        catalog = Catalog(cache, fsync=False)
        catalog.load()
        catalog.attribute(DIGEST, 1001)
        index = Index(store)
        index.rebuild_if_needed()
        index.record(published(store, 1, "tfhub.dev/a/b/1"))
        try:
            for target in (store.layout.lock("users"), store.layout.index / "cache.db-shm"):
                assert target.exists()
                tried = attacker.run(["/usr/bin/python3", "-c", TRY_TO_LOCK, str(target)])
                assert tried.stdout.strip() == "PermissionError", (target, tried.stdout, tried.stderr)
        finally:
            index.close()


def test_a_reconcile_keeps_a_name_rebound_to_an_entry_that_is_present(tmp_path: Path) -> None:
    """The reconcile evicts a gone entry by its tag: a name once bound to it and since rebound is tagged with
    its new digest, so it stays."""
    store = Store(tmp_path, fsync=False)
    open_cache(store)
    index = Index(store)
    index.rebuild_if_needed()
    old, new = published(store, 1, "tfhub.dev/a/b/1"), published(store, 2)
    index.record(old)
    index.bind("tfhub.dev/a/b/1", old.digest)
    index.record(new)
    index.bind("tfhub.dev/a/b/1", new.digest)  # the name moved to a new version of the tree
    index.close()
    store.remove_object(old.digest)  # a crash came before the index forgot it
    reopened = Index(store)
    reopened.rebuild_if_needed()
    try:
        assert reopened.summary(old.digest) is None
        assert reopened.digest_of("tfhub.dev/a/b/1") == new.digest
        assert reopened.summary(new.digest) is not None
    finally:
        reopened.close()


def test_a_reconcile_keeps_the_rows_of_an_entry_another_process_published_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconcile runs when a process opens the index (a `hubd pull` in its own process, a daemon starting)
    while another process may be publishing: the daemon, or another pull."""
    store = Store(tmp_path, fsync=False)
    open_cache(store)
    first = Index(store)
    first.rebuild_if_needed()
    kept, removed = published(store, 1, "tfhub.dev/a/kept/1"), published(store, 2, "tfhub.dev/a/removed/1")
    first.record(kept)
    first.record(removed)
    first.close()
    store.remove_object(removed.digest)  # a crash came before the index forgot it: the counts now disagree

    other_store = Store(tmp_path, fsync=False)
    other = Index(other_store)  # the other process, publishing as it always does: files, then its index
    landed: list[ObjectMeta] = []
    listing = store.meta_digests

    def listing_then_a_publish_lands() -> tuple[str, ...]:
        digests = listing()
        if not landed:
            landed.append(published(other_store, 3, "tfhub.dev/a/new/1"))
            other.record(landed[0])
            other.bind("tfhub.dev/a/new/1", landed[0].digest)
        return digests

    monkeypatch.setattr(store, "meta_digests", listing_then_a_publish_lands)
    reconciling = Index(store)
    try:
        reconciling.rebuild_if_needed()
        assert landed and reconciling.caught_up
        assert store.read_meta(landed[0].digest) is not None  # present in the files...
        assert reconciling.summary(landed[0].digest) is not None  # ...so its rows must stay
        assert reconciling.digest_of("tfhub.dev/a/new/1") == landed[0].digest
    finally:
        reconciling.close()
        other.close()


def test_a_users_lock_that_cannot_be_opened_is_only_logged(tmp_path: Path) -> None:
    """attribute() promises that a failure to record is only logged: it runs on every resolve, hits included."""
    open_cache(Store(tmp_path, fsync=False))
    catalog = Catalog(tmp_path, fsync=False)
    catalog.load()
    catalog.layout.lock("users").mkdir()  # stands in for any open(2) failure of the lock file
    catalog.attribute(DIGEST, 1001)  # must not raise
    assert catalog.users(DIGEST) == [1001]


def test_the_users_lock_is_a_plain_0600_file_of_the_cache_owner(tmp_path: Path) -> None:
    """Who may open the users lock: its mode and the mode of locks/ (0700, as every cache has made it)."""
    open_cache(Store(tmp_path, fsync=False))
    catalog = Catalog(tmp_path, fsync=False)
    catalog.load()
    catalog.attribute(DIGEST, 1001)
    lock = catalog.layout.lock("users")
    assert (lock.stat().st_mode & 0o777, lock.parent.stat().st_mode & 0o777) == (0o600, 0o700)
