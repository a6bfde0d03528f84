"""hubd.sink: chunks handed from the event loop to the extractor thread; its errors come back through `feed`."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from hubd.errors import HubdError, NotAnArchive, UnsafeArchive
from hubd.sink import StreamingExtraction
from hubd.tree import TreeListing
from tests import hostile
from tests.unit.trees import gzip_tar

FILES = {
    "saved_model.pb": b"\x08\x01graph",
    "variables/variables.index": b"index",
    "variables/variables.data-00000-of-00001": os.urandom(300_000),  # spans many chunks
}


archive = gzip_tar


def chunks(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def stream(dest: Path, data: bytes, size: int = 4096) -> TreeListing:
    """Feed `data` in chunks as a download would, stopping when told to; the extractor's listing."""
    sink = StreamingExtraction(dest, max_bytes=2**30, max_members=1000, fsync=False)
    try:
        for chunk in chunks(data, size):
            if not await sink.feed(chunk):
                break
        return await sink.finish()
    except BaseException:
        await sink.abort()
        raise


def test_an_archive_fed_in_small_chunks_is_unpacked_whole(tmp_path: Path) -> None:
    listing = asyncio.run(stream(tmp_path / "tree", archive(FILES), size=1000))
    assert set(listing.files) == set(FILES)
    for name, data in FILES.items():
        assert (tmp_path / "tree" / name).read_bytes() == data
        assert listing.files[name].sha256 == hashlib.sha256(data).hexdigest()


def test_an_unsafe_member_fails_the_stream_and_writes_nothing_outside(tmp_path: Path) -> None:
    corpus = hostile.hostile_corpus(str(tmp_path / "outside"))
    with pytest.raises(UnsafeArchive):
        asyncio.run(stream(tmp_path / "tree", corpus["traversal"]))
    assert not (tmp_path / "outside").exists()
    assert not (tmp_path / "tree").exists()  # abort removed what was extracted


def test_something_that_is_not_gzip_is_refused_at_its_first_bytes(tmp_path: Path) -> None:
    with pytest.raises(NotAnArchive, match="did not send a gzip archive"):
        asyncio.run(stream(tmp_path / "tree", b"<html>login</html>" * 1000))


def test_a_truncated_archive_fails_at_finish(tmp_path: Path) -> None:
    with pytest.raises(NotAnArchive):
        asyncio.run(stream(tmp_path / "tree", hostile.truncated(archive(FILES))))


def test_padding_after_the_end_is_read_up_to_a_point_then_the_download_is_told_to_stop(tmp_path: Path) -> None:
    padded = archive(FILES) + b"\0" * 10_240  # what tar and gzip pad with, and then some
    assert set(asyncio.run(stream(tmp_path / "ok", padded)).files) == set(FILES)

    tail = archive(FILES) + b"\0" * (16 << 20)  # far past the allowance (1 MiB)

    async def endless_tail() -> int:
        sink = StreamingExtraction(tmp_path / "tree", max_bytes=2**30, max_members=1000, fsync=False)
        fed = 0
        for chunk in chunks(tail, 65536):
            if not await sink.feed(chunk):
                break
            fed += len(chunk)
        await sink.finish()
        with pytest.raises(NotAnArchive, match="after the archive's end"):
            await sink.feed(b"\0" * 65536)  # told to stop, yet more came
        return fed

    assert asyncio.run(endless_tail()) < len(tail) // 2


def test_restart_throws_away_a_partial_extraction_and_begins_again(tmp_path: Path) -> None:
    """The server could not resume: the second, whole transfer is what ends up on disk."""
    data = archive(FILES)

    async def go() -> TreeListing:
        sink = StreamingExtraction(tmp_path / "tree", max_bytes=2**30, max_members=1000, fsync=False)
        for chunk in chunks(data)[:5]:
            await sink.feed(chunk)
        await sink.restart()
        for chunk in chunks(data):
            await sink.feed(chunk)
        return await sink.finish()

    listing = asyncio.run(go())
    assert set(listing.files) == set(FILES)
    assert (tmp_path / "tree" / "variables/variables.data-00000-of-00001").read_bytes() == FILES[
        "variables/variables.data-00000-of-00001"
    ]


def test_abort_stops_the_thread_and_removes_the_partial_tree(tmp_path: Path) -> None:
    async def go() -> None:
        sink = StreamingExtraction(tmp_path / "tree", max_bytes=2**30, max_members=1000, fsync=False)
        for chunk in chunks(archive(FILES))[:5]:
            await sink.feed(chunk)
        await sink.abort()
        assert not sink._thread.is_alive()

    asyncio.run(go())
    assert not (tmp_path / "tree").exists()


def test_the_size_limit_stops_the_download(tmp_path: Path) -> None:
    async def go() -> None:
        sink = StreamingExtraction(tmp_path / "tree", max_bytes=100_000, max_members=1000, fsync=False)
        try:
            for chunk in chunks(archive(FILES)):
                await sink.feed(chunk)  # the extractor's error comes back here, before the end
            await sink.finish()
        finally:
            await sink.abort()

    with pytest.raises(HubdError, match="limit"):
        asyncio.run(go())
