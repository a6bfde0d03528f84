"""The engine end to end against the real hosting server: fetch once, verify, publish, serve, heal."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from hubd.config import Settings
from hubd.engine import Engine
from hubd.entry import Entry
from hubd.errors import (
    ChecksumMismatch,
    DisallowedHost,
    NotAnArchive,
    NotCached,
    NotFoundUpstream,
    UpstreamError,
    VerificationFailed,
)
from hubd.store import Ref
from tests import hostile
from tests.conftest import Upstream, run
from tests.hosting import Behaviour

T = TypeVar("T")


def with_engine(settings: Settings, body: Callable[[Engine], Awaitable[T]]) -> T:
    async def go() -> T:
        engine = Engine(settings)
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.close()

    return run(go())


def resolve(settings: Settings, handle: str, sha256: str | None = None) -> Entry:
    return with_engine(settings, lambda engine: engine.resolve(handle, sha256=sha256))


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def test_resolve_fetches_verifies_and_publishes_read_only(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    tree = Path(entry.path)
    assert (tree / "saved_model.pb").is_file()
    assert entry.relpath == f"objects/{entry.id}"
    assert settings.cache_dir / entry.relpath == tree
    assert entry.archive_sha256 == upstream.server.sha256(path)
    assert entry.handles == [f"tfhub.dev/{path}"]
    for file in tree.rglob("*"):
        mode = stat.S_IMODE(file.stat().st_mode)
        assert mode == (0o555 if file.is_dir() else 0o444)
    assert stat.S_IMODE(tree.stat().st_mode) == 0o555


def test_no_worker_threads_outlive_a_fetch(settings: Settings, upstream: Upstream) -> None:
    import threading

    for model in ("reusable", "large_4mb"):
        resolve(settings, tfhub(upstream.publish(model)))
    with pytest.raises(NotAnArchive):
        resolve(settings, tfhub(upstream.publish("reusable", Behaviour(html_200=True))))
    # The bounded pools of hubd.executors keep their idle workers by design; every other thread must be gone.
    pools = ("hubd-hit", "hubd-hash", "hubd-wait")
    names = [t.name for t in threading.enumerate() if t.name.startswith("hubd-")]
    assert [n for n in names if not n.startswith(pools)] == []
    assert len([n for n in names if n.startswith(pools)]) <= 4 + 4 + 64


def test_second_resolve_is_served_from_the_cache(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    first = resolve(settings, tfhub(path))
    second = resolve(settings, tfhub(path) + "/")
    assert second.path == first.path
    assert upstream.requests(path) == 1


def test_concurrent_cold_resolves_in_one_process_download_once(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("large_4mb", Behaviour(throttle_chunk=256 * 1024, throttle_delay=0.005))

    async def body(engine: Engine) -> list[Entry]:
        return await asyncio.gather(*(engine.resolve(tfhub(path)) for _ in range(8)))

    entries = with_engine(settings, body)
    assert len({e.path for e in entries}) == 1
    assert upstream.requests(path) == 1
    assert upstream.bytes_sent(path) == len(upstream.models["large_4mb"])


def test_dropped_connection_resumes_with_range_and_verifies(settings: Settings, upstream: Upstream) -> None:
    size = len(upstream.models["large_4mb"])
    path = upstream.publish("large_4mb", Behaviour(drop_after=size // 2, drops=1))
    entry = resolve(settings, tfhub(path))
    assert entry.archive_sha256 == upstream.server.sha256(path)
    assert upstream.server.range_requests[path] == 1
    # Resumed where the client's bytes stopped, never from zero. (What the server counts as sent before the drop
    # can exceed what arrived: aborting its connection throws away what its socket buffer still held.)
    [start] = upstream.server.range_starts[path]
    assert 0 < start <= size // 2
    assert upstream.bytes_sent(path) - size // 2 == size - start  # after the drop: only the rest


def test_dropped_connection_without_range_support_restarts_cleanly(settings: Settings, upstream: Upstream) -> None:
    size = len(upstream.models["large_4mb"])
    path = upstream.publish("large_4mb", Behaviour(drop_after=size // 2, drops=2, ranges=False))
    entry = resolve(settings, tfhub(path))
    assert entry.archive_sha256 == upstream.server.sha256(path)
    assert upstream.requests(path) == 3
    assert list((settings.cache_dir / "staging").iterdir()) == []


def test_expected_sha256_is_enforced(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    with pytest.raises(ChecksumMismatch, match="expected 0000"):
        resolve(settings, tfhub(path), sha256="0" * 64)
    assert list((settings.cache_dir / "objects").iterdir()) == []
    assert list((settings.cache_dir / "refs").iterdir()) == []
    good = resolve(settings, tfhub(path), sha256=upstream.server.sha256(path).upper())
    assert good.archive_sha256 == upstream.server.sha256(path)


def test_checksum_mismatch_keeps_what_is_already_cached(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    cached = resolve(settings, tfhub(path))
    with pytest.raises(ChecksumMismatch):
        resolve(settings, tfhub(path), sha256="1" * 64)
    assert resolve(settings, tfhub(path)).path == cached.path
    assert Path(cached.path, "saved_model.pb").is_file()


def test_identical_archives_under_two_handles_share_one_copy(settings: Settings, upstream: Upstream) -> None:
    first = upstream.publish("text_embedding")
    second = upstream.publish("text_embedding")
    a = resolve(settings, tfhub(first))
    b = resolve(settings, upstream.handle(second))
    assert a.path == b.path
    assert len(list((settings.cache_dir / "objects").iterdir())) == 1
    listed = with_engine(settings, lambda engine: asyncio.sleep(0, engine.list_entries()))
    assert sorted(listed[0].handles) == sorted(
        [f"tfhub.dev/{first}", f"127.0.0.1:{upstream.server.port}/{second}"]
    )


def test_tfhub_handle_and_its_kaggle_twin_are_one_entry(settings: Settings, upstream: Upstream) -> None:
    kaggle_path = "models/acme/twin/frameworks/TensorFlow2/variations/small/versions/3"
    upstream.publish("reusable", path=kaggle_path)
    upstream.publish("reusable", Behaviour(redirect_to=f"{upstream.server.url}/{kaggle_path}"), path="acme/twin/3")
    entry = resolve(settings, "https://tfhub.dev/acme/twin/3")
    assert entry.handles == ["tfhub.dev/acme/twin/3", "kaggle.com/models/acme/twin/tensorflow2/small/3"]
    upstream.server.reset_counts()
    twin = resolve(settings, "https://www.kaggle.com/models/acme/twin/TensorFlow2/small/3")
    assert twin.path == entry.path
    assert sum(upstream.server.requests.values()) == 0


def test_archive_without_a_saved_model_is_not_published(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish(hostile._tar([hostile._file("README.md", b"hello")]))
    with pytest.raises(VerificationFailed, match=r"no saved_model\.pb"):
        resolve(settings, tfhub(path))
    assert list((settings.cache_dir / "objects").iterdir()) == []


def test_missing_variable_shard_in_archive_is_not_published(settings: Settings, upstream: Upstream) -> None:
    archive = hostile._tar(
        [
            hostile._file("saved_model.pb", b"graph"),
            hostile._file("variables/variables.index", b"index"),
            hostile._file("variables/variables.data-00001-of-00002", b"shard"),
        ]
    )
    with pytest.raises(VerificationFailed, match=r"shards missing: \[0\] of 2"):
        resolve(settings, tfhub(upstream.publish(archive)))


def test_hostile_archive_from_upstream_is_refused_and_staging_is_emptied(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for archive in hostile.hostile_corpus(str(outside)).values():
        with pytest.raises(Exception, match=r"archive|symlink|link|device|FIFO|twice|directory"):
            resolve(settings, tfhub(upstream.publish(archive)))
    assert list(outside.iterdir()) == []
    assert list((settings.cache_dir / "objects").iterdir()) == []
    assert [p.name for p in (settings.cache_dir / "staging").iterdir()] == []


def test_html_page_served_as_200_is_a_clear_error(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable", Behaviour(html_200=True))
    with pytest.raises(NotAnArchive, match="did not send a gzip archive"):
        resolve(settings, tfhub(path))


def test_unknown_model_upstream_is_a_404_error(settings: Settings, upstream: Upstream) -> None:
    with pytest.raises(NotFoundUpstream, match="no such model"):
        resolve(settings, tfhub("nobody/nothing/1"))


def test_dead_upstream_is_retried_then_reported(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable", Behaviour(status=503))
    with pytest.raises(UpstreamError, match="failed after 4 attempts") as caught:
        resolve(settings, tfhub(path))
    assert "cached models still work" in caught.value.hint
    assert upstream.requests(path) == 4


def test_unreachable_mirror_is_reported(settings: Settings) -> None:
    dead = settings.model_copy(update={"mirror": "http://127.0.0.1:9", "retries": 1})
    with pytest.raises(UpstreamError, match="failed after 2 attempts"):
        resolve(dead, "https://tfhub.dev/a/b/1")


def test_redirect_to_a_disallowed_host_is_refused(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable", Behaviour(redirect_to="https://metadata.internal.example/secret"))
    with pytest.raises(DisallowedHost, match="not allowed"):
        resolve(settings, tfhub(path))


def test_offline_serves_the_cache_without_the_network(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    cached = resolve(settings, tfhub(path))
    offline = settings.model_copy(update={"offline": True, "mirror": "http://127.0.0.1:9"})
    upstream.server.reset_counts()
    assert resolve(offline, tfhub(path)).path == cached.path
    assert sum(upstream.server.requests.values()) == 0


def test_offline_and_uncached_says_how_to_prefetch(settings: Settings) -> None:
    offline = settings.model_copy(update={"offline": True})
    with pytest.raises(NotCached, match="not cached") as caught:
        resolve(offline, "https://tfhub.dev/a/b/1")
    assert "hubd pull https://tfhub.dev/a/b/1" in caught.value.hint


def test_deleted_file_is_caught_on_resolve_and_refetched(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    shard = Path(entry.path, "variables", "variables.data-00000-of-00001")
    os.chmod(shard.parent, 0o755)
    shard.unlink()
    healed = resolve(settings, tfhub(path))
    assert Path(healed.path, "variables", "variables.data-00000-of-00001").is_file()
    assert upstream.requests(path) == 2


def test_broken_entry_offline_is_never_handed_out(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    os.chmod(entry.path, 0o755)
    os.unlink(Path(entry.path, "saved_model.pb"))
    with pytest.raises(NotCached, match="broken"):
        resolve(settings.model_copy(update={"offline": True}), tfhub(path))


@pytest.mark.parametrize("damage", ["delete", "truncate", "bitflip", "add"])
def test_verify_detects_damage_and_heals_when_online(settings: Settings, upstream: Upstream, damage: str) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    target = Path(entry.path, "variables", "variables.data-00000-of-00001")
    for p in (target.parent, Path(entry.path)):
        os.chmod(p, 0o755)
    os.chmod(target, 0o644)
    data = target.read_bytes()
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(data[:-1])
    elif damage == "bitflip":
        target.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    else:
        Path(entry.path, "variables", "extra").write_bytes(b"x")

    offline = settings.model_copy(update={"offline": True})
    reports = with_engine(offline, lambda engine: engine.verify())
    assert [bool(r.problems) for r in reports] == [True]
    assert reports[0].entry.state == "broken" and not reports[0].healed
    assert not Path(entry.path).exists()  # quarantined: never handed out again

    reports = with_engine(settings, lambda engine: engine.verify())
    assert reports[0].healed
    clean = with_engine(settings, lambda engine: engine.verify())
    assert [r.problems for r in clean] == [[]]


def test_lost_index_is_rebuilt_from_the_store(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    shutil.rmtree(settings.cache_dir / "index")
    listed = with_engine(settings, lambda engine: asyncio.sleep(0, engine.list_entries()))
    assert [e.id for e in listed] == [entry.id]
    (settings.cache_dir / "index").mkdir(exist_ok=True)
    (settings.cache_dir / "index" / "cache.db").write_bytes(b"this is not sqlite" * 100)
    listed = with_engine(settings, lambda engine: asyncio.sleep(0, engine.list_entries()))
    assert [e.id for e in listed] == [entry.id]


def test_remove_deletes_the_entry_and_its_names(settings: Settings, upstream: Upstream) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    with_engine(settings, lambda engine: asyncio.sleep(0, engine.remove(tfhub(path))))
    assert not Path(entry.path).exists()
    assert list((settings.cache_dir / "refs").iterdir()) == []
    assert with_engine(settings, lambda engine: asyncio.sleep(0, engine.list_entries())) == []


def _no_full_scan(engine: Engine) -> Engine:
    """Make reading every ref fail, so a removal that still scans them all is caught."""

    def refuse() -> Iterator[tuple[str, Ref]]:
        raise AssertionError("read every ref")

    engine.store.ref_items = refuse  # type: ignore[method-assign]
    engine.store.iter_refs = refuse  # type: ignore[method-assign,assignment]
    return engine


def test_remove_reads_only_the_refs_of_its_own_names(settings: Settings, upstream: Upstream) -> None:
    first, second = upstream.publish("text_embedding"), upstream.publish("text_embedding")
    other = tfhub(upstream.publish("reusable"))
    shared = resolve(settings, tfhub(first))
    assert resolve(settings, upstream.handle(second)).id == shared.id
    kept = resolve(settings, other)

    async def remove_shared(engine: Engine) -> Entry:
        return _no_full_scan(engine).remove(shared.id)

    assert with_engine(settings, remove_shared).id == shared.id
    refs = [json.loads(p.read_text())["digest"] for p in (settings.cache_dir / "refs").iterdir()]
    assert refs == [kept.id]
    view = settings.cache_dir / "tfhub_modules"
    assert {os.readlink(p).rsplit("/", 1)[1] for p in view.iterdir() if p.is_symlink()} == {kept.id}
    assert resolve(settings, other).path == kept.path


def test_remove_of_a_model_whose_meta_has_no_names_still_drops_its_refs(
    settings: Settings, upstream: Upstream
) -> None:
    path = upstream.publish("reusable")
    entry = resolve(settings, tfhub(path))
    meta_file = settings.cache_dir / "meta" / f"{entry.id}.json"
    meta = json.loads(meta_file.read_text())
    del meta["names"]
    meta_file.write_text(json.dumps(meta))
    with_engine(settings, lambda engine: asyncio.sleep(0, engine.remove(entry.id)))
    assert list((settings.cache_dir / "refs").iterdir()) == []


def test_local_directory_handle_is_returned_as_is(settings: Settings, tmp_path: Path) -> None:
    entry = resolve(settings, str(tmp_path))
    assert entry.path == str(tmp_path.resolve())
    assert not (settings.cache_dir / "objects").exists() or not list((settings.cache_dir / "objects").iterdir())


def test_a_resolve_arriving_while_an_abandoned_fetch_winds_down_gets_a_fresh_fetch_not_its_cancel(
    settings: Settings, upstream: Upstream
) -> None:
    """The last waiter of a fetch leaves (a client disconnected), so it is cancelled; a resolve of the same handle
    arriving before the cancelled fetch has finished winding down joined it and got its CancelledError: the
    client saw its connection closed without an answer (test_spool_bounds failed that way about 1 run in 5)."""
    data = upstream.models["reusable"]
    path = upstream.publish("reusable", Behaviour(pause_after=len(data) // 2))
    handle = f"https://tfhub.dev/{path}"

    async def body(engine: Engine) -> Entry:
        first = asyncio.create_task(engine.resolve(handle))
        assert await asyncio.to_thread(upstream.server.wait_sent, path, len(data) // 2)
        first.cancel()  # its only waiter leaves: the fetch is cancelled...
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(engine.resolve(handle))  # ...and this one arrives while it winds down
        upstream.server.release(path)
        return await asyncio.wait_for(second, 60)

    entry = with_engine(settings.model_copy(update={"mirror": upstream.server.url}), body)
    assert (Path(entry.path) / "saved_model.pb").is_file()
