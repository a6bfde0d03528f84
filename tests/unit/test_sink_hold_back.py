"""A prefetch's extractor thread holds back its queued chunks while someone waits for a model (#13 item 6).

Pausing only the download between chunks left up to eight queued chunks per prefetch to inflate, hash and write
while an interactive fetch ran: on two cores that alone tripled a small model's time to ready."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from hubd.sink import StreamingExtraction
from tests.unit.trees import gzip_tar

_HELD_TIMEOUT = 30.0


def test_queued_chunks_wait_while_held_and_extract_once_released(tmp_path: Path) -> None:
    files = {"saved_model.pb": b"graph" * 1000, "variables/variables.index": b"index"}
    data = gzip_tar(files)
    gate, entered = threading.Event(), threading.Event()

    def hold_back() -> None:
        entered.set()
        gate.wait(_HELD_TIMEOUT)

    async def run() -> list[str]:
        sink = StreamingExtraction(tmp_path / "tree", 1 << 20, 100, fsync=False, hold_back=hold_back)
        step = -(-len(data) // 4)  # four chunks: all fit the sink's queue while the thread is held
        for start in range(0, len(data), step):
            assert await sink.feed(data[start : start + step])
        assert await asyncio.to_thread(entered.wait, _HELD_TIMEOUT)
        assert not any((tmp_path / "tree").iterdir())  # held: not one member written yet
        gate.set()
        manifest = await sink.finish()
        return sorted(manifest.files)

    assert asyncio.run(run()) == sorted(files)
    assert (tmp_path / "tree" / "saved_model.pb").read_bytes() == files["saved_model.pb"]


def test_without_hold_back_extraction_runs_as_before(tmp_path: Path) -> None:
    data = gzip_tar({"saved_model.pb": b"graph"})

    async def run() -> list[str]:
        sink = StreamingExtraction(tmp_path / "tree", 1 << 20, 100, fsync=False)
        assert await sink.feed(data)
        return sorted((await sink.finish()).files)

    assert asyncio.run(run()) == ["saved_model.pb"]
