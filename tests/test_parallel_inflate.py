"""The spool-then-parallel path (rapidgzip in a capped child) gives the streaming path's results and verdicts.

Each test feeds a real archive through `StreamingExtraction` as a download would, with the parallel path forced
on (2 threads, whatever the machine's cores), and checks what lands on disk or which error comes back.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from pathlib import Path

import pytest

from hubd import parallel_inflate
from hubd.errors import ArchiveTooLarge, HubdError, NotAnArchive, UnsafeArchive
from hubd.parallel_inflate import AUTO_MAX_THREADS, AUTO_MIN_CORES, MIN_PARALLEL_BYTES, choose_threads
from hubd.sink import StreamingExtraction
from hubd.tree import TreeListing
from tests import hostile
from tests.unit.trees import gzip_tar

pytestmark = pytest.mark.skipif(not parallel_inflate.available(), reason="rapidgzip is not installed")

FILES = {
    "saved_model.pb": b"\x08\x01graph",
    "variables/variables.index": b"index",
    "variables/variables.data-00000-of-00001": os.urandom(3_000_000),
}


archive = gzip_tar


async def feed_all(dest: Path, data: bytes, threads: str, max_bytes: int = 2**30) -> TreeListing:
    return (await feed_to_sink(dest, data, threads, max_bytes))[0]


async def feed_to_sink(
    dest: Path, data: bytes, threads: str, max_bytes: int = 2**30
) -> tuple[TreeListing, StreamingExtraction]:
    sink = StreamingExtraction(dest, max_bytes=max_bytes, max_members=1000, fsync=False, inflate_threads=threads)
    sink.expect(len(data))
    try:
        for i in range(0, len(data), 65536):
            if not await sink.feed(data[i : i + 65536]):
                break
        return await sink.finish(), sink
    except BaseException:
        await sink.abort()
        raise


def both(tmp_path: Path, data: bytes, max_bytes: int = 2**30) -> tuple[object, object]:
    """The outcome (listing digest, or error class) of the streaming and the parallel path."""
    outcomes: list[object] = []
    for threads in ("0", "2"):
        try:
            outcomes.append(asyncio.run(feed_all(tmp_path / f"tree-{threads}", data, threads, max_bytes)).digest())
        except HubdError as exc:
            outcomes.append(type(exc))
    return outcomes[0], outcomes[1]


def test_the_parallel_path_unpacks_the_same_tree(tmp_path: Path) -> None:
    listing = asyncio.run(feed_all(tmp_path / "tree", archive(FILES), "2"))
    for name, data in FILES.items():
        assert (tmp_path / "tree" / name).read_bytes() == data
        assert listing.files[name].sha256 == hashlib.sha256(data).hexdigest()
    assert not (tmp_path / "tree.tar.gz").exists()  # the spool is gone once the tree is out


def test_rapidgzip_itself_answers_not_the_streaming_fallback(tmp_path: Path) -> None:
    """The child's memory cap leaves room for what rapidgzip reserves (an address-space cap once killed every
    run past 16 MiB, and every parallel fetch silently fell back to one thread)."""
    files = {**FILES, "variables/variables.data-00000-of-00001": os.urandom(24 << 20)}
    listing, sink = asyncio.run(feed_to_sink(tmp_path / "tree", archive(files), "2"))
    assert sink.inflated_by == "rapidgzip (2 threads)"
    assert listing.files["variables/variables.data-00000-of-00001"].size == 24 << 20


def test_a_child_past_its_memory_cap_is_killed_and_the_streaming_path_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(parallel_inflate, "_CHILD_RESIDENT", 1 << 20)  # below what any Python process holds
    monkeypatch.setattr(parallel_inflate, "_PER_THREAD_RESIDENT", 0)
    listing, sink = asyncio.run(feed_to_sink(tmp_path / "tree", archive(FILES), "2"))
    assert sink.inflated_by.endswith("(after rapidgzip gave no verdict)")
    assert "past its memory cap" in caplog.text
    for name, data in FILES.items():
        assert listing.files[name].sha256 == hashlib.sha256(data).hexdigest()


def test_one_thread_and_two_agree(tmp_path: Path) -> None:
    data = archive(FILES)
    one = asyncio.run(feed_all(tmp_path / "one", data, "1"))
    two = asyncio.run(feed_all(tmp_path / "two", data, "2"))
    assert one.digest() == two.digest()


def test_a_truncated_archive_is_refused_as_the_streaming_path_refuses_it(tmp_path: Path) -> None:
    streaming, parallel = both(tmp_path, hostile.truncated(archive(FILES)))
    assert streaming is parallel is NotAnArchive


def test_a_gzip_bomb_is_refused(tmp_path: Path) -> None:
    streaming, parallel = both(tmp_path, hostile.gzip_bomb(2**30), max_bytes=8 * 2**20)
    assert streaming is parallel is ArchiveTooLarge


def test_a_page_that_is_not_gzip_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotAnArchive, match="did not send a gzip archive"):
        asyncio.run(feed_all(tmp_path / "tree", hostile.not_gzip(), "2"))


def test_padding_after_the_archive_is_accepted_as_when_streaming(tmp_path: Path) -> None:
    streaming, parallel = both(tmp_path, archive(FILES) + bytes(4096))
    assert streaming == parallel and isinstance(parallel, str)


def test_concatenated_gzip_members_are_one_archive(tmp_path: Path) -> None:
    raw = gzip.decompress(archive(FILES))
    split = gzip.compress(raw[:1_000_000]) + gzip.compress(raw[1_000_000:])
    streaming, parallel = both(tmp_path, split)
    assert streaming == parallel and isinstance(parallel, str)


@pytest.mark.parametrize("name", ["traversal", "absolute", "symlink_escape"])
def test_hostile_members_are_refused_on_the_parallel_path(tmp_path: Path, name: str) -> None:
    corpus = hostile.hostile_corpus(str(tmp_path / "outside"))
    with pytest.raises(UnsafeArchive):
        asyncio.run(feed_all(tmp_path / "tree", corpus[name], "2"))
    assert not (tmp_path / "outside").exists()


def test_the_path_is_chosen_by_setting_size_and_cores() -> None:
    assert choose_threads("0", 10 * MIN_PARALLEL_BYTES) == 0
    assert choose_threads("3", 1) == 3  # forced on, whatever the size
    assert choose_threads("8", None) == 0  # no announced size: only streaming bounds what comes after the end
    cores = len(os.sched_getaffinity(0))
    expected = min(cores, AUTO_MAX_THREADS) if cores >= AUTO_MIN_CORES else 0
    assert choose_threads(None, MIN_PARALLEL_BYTES) == expected
    assert choose_threads("auto", MIN_PARALLEL_BYTES - 1) == 0


@pytest.mark.parametrize(("cores", "threads"), [(2, 0), (3, 0), (4, 4), (8, 8), (16, 8), (64, 8)])
def test_auto_uses_the_cores_up_to_what_one_extracting_thread_can_take(
    monkeypatch: pytest.MonkeyPatch, cores: int, threads: int
) -> None:
    monkeypatch.setattr(parallel_inflate, "usable_cores", lambda: cores)  # this machine has only its own cores
    assert choose_threads("auto", MIN_PARALLEL_BYTES) == threads
    assert choose_threads("16", MIN_PARALLEL_BYTES) == 16  # an admin's number is taken as it is
