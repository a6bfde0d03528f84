"""The cache's layout version: old caches (version 1 digests) migrate at start-up, crash-safely; newer ones are
refused with a remedy, by the daemon and by the client's offline reader alike. The paths and file formats
themselves are pinned as a contract in tests/unit/test_layout_contract.py (one definition, hubd_client.layout,
for the daemon and the client)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hubd_client.handles import AnyHost, parse_handle

from hubd.config import Settings
from hubd.errors import LayoutTooNew
from hubd.extract import SafeExtractor
from hubd.index import Index
from hubd.inflate import GzipReader
from hubd.layout import LAYOUT_VERSION, VERSION_FILE, open_cache
from hubd.store import ObjectMeta, Ref, Store
from hubd.tfhub_view import TfhubView, link_name
from hubd.tree import FileRecord, TreeListing
from tests import hostile
from tests.conftest import Upstream
from tests.daemon import start_daemon

USED_AT = 1_700_000_000.0


def write_v1_entry(root: Path, archive: bytes, handle: str, pin: bool = False) -> tuple[str, str]:
    """Publish `archive` for `handle` the way hubd did before layout versions: objects named by the v1 digest,
    no version file. Returns (v1 digest, v2 digest)."""
    store = Store(root, fsync=False)
    for sub in ("objects", "meta", "refs", "pins", "staging", "quarantine", "locks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tree = root / "staging" / f"tree-{len(list((root / 'meta').iterdir()))}"
    tree.mkdir()
    chunks = iter([archive])
    listing = SafeExtractor(tree, 2**30, 10_000, fsync=False).extract_stream(
        GzipReader(lambda: next(chunks, b""), 2**31)
    )
    return publish_v1(store, tree, listing, archive, handle, pin)


def publish_v1(
    store: Store, tree: Path, listing: TreeListing, archive: bytes, handle: str, pin: bool = False
) -> tuple[str, str]:
    old = listing.legacy_digest()
    meta = ObjectMeta(old, hashlib.sha256(archive).hexdigest(), listing.total_bytes, time.time(), listing, [])
    source = parse_handle(handle, AnyHost())
    meta.names = [source.canonical]
    store.publish(tree, meta)
    ref = Ref(source.canonical, handle, old, meta.archive_sha256, time.time())
    store.write_ref(source.ref_key, ref)
    if pin:
        store.pin(old, source.canonical)
    TfhubView(store).link(ref)
    index = Index(store)
    index.rebuild()
    index._cache.set("used:" + old, USED_AT)
    index.close()
    return old, listing.digest()


def test_an_old_cache_migrates_at_start_and_its_entries_still_resolve(
    settings: Settings, upstream: Upstream, models: dict[str, bytes], tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    handle = upstream.handle(path)
    old, new = write_v1_entry(settings.cache_dir, models["reusable"], handle, pin=True)
    assert old != new and not (settings.cache_dir / VERSION_FILE).exists()

    daemon = start_daemon(settings, tmp_path)
    try:
        reply = daemon.request("POST", "/v1/resolve", {"handle": handle})
        listed = daemon.request("GET", "/v1/models")
    finally:
        daemon.stop()
    assert reply.status == 200, reply.body
    assert reply.json()["id"] == new
    assert reply.json()["path"] == str(settings.cache_dir / "objects" / new)
    assert upstream.requests(path) == 0  # migrated, not fetched again
    assert [e["id"] for e in listed.json()["models"]] == [new]
    root = settings.cache_dir
    assert (root / VERSION_FILE).read_text().strip() == str(LAYOUT_VERSION)
    assert not (root / "objects" / old).exists() and not (root / "meta" / f"{old}.json").exists()
    assert json.loads((root / "meta" / f"{new}.json").read_text())["digest"] == new
    assert (root / "pins" / f"{new}.json").exists() and not (root / "pins" / f"{old}.json").exists()
    assert os.readlink(root / "tfhub_modules" / link_name(handle)) == f"../objects/{new}"


@pytest.mark.parametrize("crash_after", ["new_meta_written", "tree_renamed", "refs_rewritten"])
def test_a_migration_cut_short_finishes_on_the_next_start(
    tmp_path: Path, models: dict[str, bytes], crash_after: str
) -> None:
    root = tmp_path / "cache"
    handle = "https://tfhub.dev/google/example/1"
    old, new = write_v1_entry(root, models["reusable"], handle)
    store = Store(root, fsync=False)
    # The state a crash leaves at each step (hubd/layout.py writes these in this order).
    meta = store.read_meta(old)
    assert meta is not None
    meta.digest = new
    store.write_meta(meta)
    if crash_after in ("tree_renamed", "refs_rewritten"):
        os.rename(root / "objects" / old, root / "objects" / new)
    if crash_after == "refs_rewritten":
        ref_key = parse_handle(handle, AnyHost()).ref_key
        ref = store.read_ref(ref_key)
        assert ref is not None
        ref.digest = new
        store.write_ref(ref_key, ref)

    open_cache(store)

    assert sorted(p.name for p in (root / "objects").iterdir()) == [new]
    assert sorted(p.name for p in (root / "meta").glob("*.json")) == [f"{new}.json"]
    assert [r.digest for r in store.iter_refs()] == [new]
    assert (root / VERSION_FILE).read_text().strip() == "2"
    meta_after = store.read_meta(new)
    assert meta_after is not None and meta_after.names == ["tfhub.dev/google/example/1"]
    index = Index(store)
    assert index.last_used(new) == USED_AT  # last-use times survive the re-digesting
    index.close()


def test_an_old_object_that_breaks_the_new_rules_is_quarantined_not_migrated(tmp_path: Path) -> None:
    """A tree published before links were judged against the tree: its chain reaches /etc/passwd."""
    root = tmp_path / "cache"
    root.mkdir()
    store = Store(root, fsync=False)
    write_v1_entry(root, hostile._tar(hostile.saved_model_members()), "https://tfhub.dev/google/ok/1")
    tree = root / "staging" / "evil"
    (tree / "d").mkdir(parents=True)
    (tree / "saved_model.pb").write_bytes(b"\x08\x01graph")
    os.symlink("..", tree / "d" / "l")
    os.symlink(hostile.chain_escape_target(), tree / "assets.txt")
    listing = TreeListing(
        files={"saved_model.pb": FileRecord(7, hashlib.sha256(b"\x08\x01graph").hexdigest())},
        symlinks={"d/l": "..", "assets.txt": hostile.chain_escape_target()},
        dirs={"d"},
    )
    _old, new = publish_v1(store, tree, listing, b"evil", "https://tfhub.dev/mallory/evil/1")

    open_cache(store)

    assert not (root / "objects" / new).exists()
    assert [p.name.split(".")[0] for p in (root / "quarantine").iterdir() if p.is_dir()] == [new]
    reason = next((root / "quarantine").glob("*.reason")).read_text()
    assert "leaves the model directory" in reason
    assert len(list((root / "objects").iterdir())) == 1  # the healthy entry migrated


def test_a_newer_layout_is_refused_with_a_remedy(tmp_path: Path, models: dict[str, bytes]) -> None:
    root = tmp_path / "cache"
    old, _new = write_v1_entry(root, models["reusable"], "https://tfhub.dev/google/example/1")
    (root / VERSION_FILE).write_text("3\n")

    with pytest.raises(LayoutTooNew, match="layout version 3") as caught:
        open_cache(Store(root))
    assert "upgrade hubd" in caught.value.hint
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "NOTIFY_", "LISTEN_"))}
    env.update(HUBD_CACHE_DIR=str(root), HUBD_SOCKET=str(tmp_path / "hubd.sock"))
    served = subprocess.run(
        [sys.executable, "-m", "hubd", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert served.returncode != 0
    assert "layout version 3" in served.stderr and "upgrade hubd" in served.stderr
    assert (root / "objects" / old).is_dir()  # nothing was touched


def test_the_offline_reader_understands_old_layouts_and_refuses_newer_ones(
    tmp_path: Path, models: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubd_client.errors import HubdClientError
    from hubd_client.offline import lookup

    root = tmp_path / "cache"
    handle = "https://tfhub.dev/google/example/1"
    old, new = write_v1_entry(root, models["reusable"], handle)
    monkeypatch.setenv("HUBD_CACHE_DIR", str(root))
    assert lookup(handle)[0] == str(root / "objects" / old)
    open_cache(Store(root, fsync=False))
    assert lookup(handle)[0] == str(root / "objects" / new)
    (root / VERSION_FILE).write_text("3\n")
    with pytest.raises(HubdClientError) as caught:
        lookup(handle)
    assert caught.value.code == "cache_layout_unsupported"
    assert "upgrade hubd_client" in caught.value.hint


def test_import_hubd_client_stays_stdlib_only() -> None:
    code = "import sys, hubd_client; print(sorted(m for m in sys.modules if m.startswith(('hubd.', 'diskcache'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "hubd.store" not in out and "diskcache" not in out and "hubd.layout" not in out
