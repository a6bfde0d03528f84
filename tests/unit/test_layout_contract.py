"""The cache layout as a contract (docs/cache-layout.md): the paths and file formats an older or newer hubd and
every hubd_client read, built in one place (`hubd_client.layout`) that the daemon's store and the client's
offline reader share. Changing anything pinned here means bumping LAYOUT_VERSION and writing a migration
(hubd/layout.py); see also tests/test_cache_layout.py (migration end to end, and refusal by the daemon)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hubd_client import layout
from hubd_client.errors import HubdClientError
from hubd_client.handles import AnyHost, parse_handle
from hubd_client.layout import CacheLayout
from hubd_client.offline import lookup

import hubd.layout
from hubd.layout import open_cache
from hubd.store import ObjectMeta, Ref, Store
from hubd.tfhub_view import TfhubView, link_name
from hubd.tree import FileRecord, TreeListing

HANDLE = "https://tfhub.dev/google/model/1"
DIGEST = "ab" * 32
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    cache = Store(tmp_path / "cache", fsync=False)
    open_cache(cache)
    return cache


def publish(store: Store) -> tuple[ObjectMeta, Ref]:
    """A minimal SavedModel published for HANDLE, as a fetch publishes it."""
    source = parse_handle(HANDLE, AnyHost())
    staging = store.new_staging()
    listing = TreeListing()
    for name, data in {"saved_model.pb": b"\x08\x01graph", "variables/variables.index": b"index"}.items():
        (staging.tree / name).parent.mkdir(parents=True, exist_ok=True)
        (staging.tree / name).write_bytes(data)
        listing.files[name] = FileRecord(len(data), hashlib.sha256(data).hexdigest())
    meta = ObjectMeta(listing.digest(), "cd" * 32, listing.total_bytes, 1_700_000_000.0, listing, [])
    ref = Ref(source.canonical, HANDLE, meta.digest, meta.archive_sha256, meta.fetched_at)
    store.publish_entry(staging.tree, meta, [(source.ref_key, ref)])
    staging.cleanup()
    return meta, ref


def test_the_daemon_and_the_client_share_one_layout_version() -> None:
    assert hubd.layout.LAYOUT_VERSION == layout.LAYOUT_VERSION == 2
    assert hubd.layout.VERSION_FILE == layout.VERSION_FILE == "layout-version"
    assert layout.LAYOUT_VERSION in layout.READABLE_VERSIONS  # a client always reads what its daemon writes


@pytest.mark.parametrize(
    ("path", "relative"),
    [
        (lambda c: c.object(DIGEST), f"objects/{DIGEST}"),
        (lambda c: c.meta(DIGEST), f"meta/{DIGEST}.json"),
        (lambda c: c.ref("k" * 32), f"refs/{'k' * 32}.json"),
        (lambda c: c.pin(DIGEST), f"pins/{DIGEST}.json"),
        (lambda c: c.lock("k" * 32), f"locks/{'k' * 32}.lock"),
        (lambda c: c.lock("gc"), "locks/gc.lock"),
        (lambda c: c.lock("layout"), "locks/layout.lock"),
        (lambda c: c.object_lock(DIGEST), f"locks/object-{DIGEST}.lock"),
        (lambda c: c.pending_intent("k"), "pending/k.json"),
        (lambda c: c.pending_meta("k"), "pending/k.meta.json"),
        (lambda c: c.staging_dir("1-ab"), "staging/1-ab"),
        (lambda c: c.staging_lock("1-ab"), "staging/1-ab.lock"),
        (lambda c: c.quarantined(DIGEST, 17), f"quarantine/{DIGEST}.17"),
        (lambda c: c.quarantine_reason(c.quarantined(DIGEST, 17)), f"quarantine/{DIGEST}.17.reason"),
        (lambda c: c.view_link("s" * 40), f"tfhub_modules/{'s' * 40}"),
        (lambda c: c.view_descriptor("s" * 40), f"tfhub_modules/{'s' * 40}.descriptor.txt"),
        (lambda c: c.index, "index"),
        (lambda c: c.partial, "partial"),
        (lambda c: c.users, "users"),
        (lambda c: c.user_record(DIGEST), f"users/{DIGEST}.json"),
        (lambda c: c.audit, "audit"),
        (lambda c: c.aliases, "aliases.json"),
        (lambda c: c.version_file, "layout-version"),
        (lambda c: c.cachedir_tag, "CACHEDIR.TAG"),
    ],
)
def test_every_path_under_the_cache_root_is_pinned(
    path: Callable[[CacheLayout], Path], relative: str, tmp_path: Path
) -> None:
    assert path(CacheLayout(tmp_path)) == tmp_path / relative
    assert layout.object_relpath(DIGEST) == f"objects/{DIGEST}"
    assert layout.view_target(DIGEST) == f"../objects/{DIGEST}"


def test_a_published_entry_is_these_files_in_these_formats(store: Store) -> None:
    """What an offline client, an older hubd and a migration read: the JSON keys are part of the layout."""
    source = parse_handle(HANDLE, AnyHost())
    meta, ref_written = publish(store)
    store.pin(meta.digest, source.canonical)
    TfhubView(store).link(ref_written)
    root = store.root

    assert source.ref_key == layout.ref_key(source.canonical) and len(source.ref_key) == 32
    assert sorted(os.listdir(root / "objects" / meta.digest)) == ["saved_model.pb", "variables"]
    stored = json.loads((root / "meta" / f"{meta.digest}.json").read_text())
    assert sorted(stored) == ["archive_sha256", "digest", "fetched_at", "manifest", "names", "size_bytes"]
    assert sorted(stored["manifest"]["files"]["saved_model.pb"]) == ["sha256", "size"]
    ref = json.loads((root / "refs" / f"{source.ref_key}.json").read_text())
    assert ref == {
        "archive_sha256": meta.archive_sha256,
        "canonical": source.canonical,
        "digest": meta.digest,
        "handle": HANDLE,
        "updated_at": meta.fetched_at,
    }
    assert json.loads((root / "pins" / f"{meta.digest}.json").read_text()) == {"names": [source.canonical]}
    assert os.readlink(root / "tfhub_modules" / link_name(HANDLE)) == f"../objects/{meta.digest}"
    assert (root / "layout-version").read_text() == f"{layout.LAYOUT_VERSION}\n"
    assert not os.listdir(root / "pending")  # a finished publish leaves no record


def test_the_offline_reader_finds_what_the_store_published_and_checks_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta, _ref = publish(store)
    monkeypatch.setenv("HUBD_CACHE_DIR", str(store.root))

    assert lookup(HANDLE) == (str(store.root / "objects" / meta.digest), store.root)
    os.chmod(store.root / "objects" / meta.digest, 0o755)
    (store.root / "objects" / meta.digest / "saved_model.pb").unlink()
    assert lookup(HANDLE)[0] is None  # the daemon's quick check, run by the client: never a damaged model


@pytest.mark.parametrize("written", ["3\n", "garbage\n", "0\n"])
def test_the_offline_reader_refuses_a_layout_it_does_not_know(
    written: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    (store.root / "layout-version").write_text(written)
    monkeypatch.setenv("HUBD_CACHE_DIR", str(store.root))
    with pytest.raises(HubdClientError) as refused:
        lookup(HANDLE)
    assert refused.value.code == "cache_layout_unsupported" and "upgrade hubd_client" in refused.value.hint


_NAMES = "|".join(
    re.escape(name)
    for name in (
        *layout.PUBLIC_DIRS,
        *layout.PRIVATE_DIRS,
        layout.INDEX,
        layout.VIEW,
        layout.PARTIAL,
        layout.USERS,
        layout.AUDIT,
        layout.ALIASES,
        layout.VERSION_FILE,
        layout.CACHEDIR_TAG,
    )
)
_JOINED = re.compile(rf'/ "({_NAMES})"')


def test_no_module_but_the_layout_joins_a_cache_directory_name_onto_a_path() -> None:
    found = set()
    for package in ("hubd", "client/hubd_client"):
        for path in sorted((REPO / package).rglob("*.py")):
            for match in _JOINED.finditer(path.read_text()):
                found.add((str(path.relative_to(REPO)), match.group(1)))
    assert found == set(), "build cache paths with hubd_client.layout.CacheLayout (store.layout)"
