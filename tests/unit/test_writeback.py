"""hubd.writeback: a large file's pages are queued for writeback as it is written, so its fsync is short."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import sys
from pathlib import Path

import pytest

from hubd import extract, writeback
from hubd.extract import SafeExtractor
from tests.unit.trees import gzip_tar


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_call_is_found_on_linux_so_it_is_never_silently_a_no_op() -> None:
    assert writeback._load() is not None


def test_a_bad_descriptor_leaves_the_work_to_the_fsync_without_an_error(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    writeback.start_writeback(fd, 0, 1 << 20)  # EBADF: nothing raised, nothing to undo


def _extract(tmp_path: Path, data: bytes, fsync: bool, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    kicks: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int) -> None:
        assert os.fstat(fd).st_size >= offset + length  # only bytes already written are queued
        kicks.append((offset, length))

    monkeypatch.setattr(extract, "start_writeback", record)
    dest = tmp_path / f"tree-{fsync}"
    dest.mkdir()
    archive = gzip.decompress(
        gzip_tar({"variables/variables.data-00000-of-00001": data, "saved_model.pb": b"graph"})
    )
    listing = SafeExtractor(dest, 1 << 30, 100, fsync).extract_stream(io.BytesIO(archive))  # type: ignore[arg-type]
    record_ = listing.files["variables/variables.data-00000-of-00001"]
    assert record_.sha256 == hashlib.sha256(data).hexdigest()
    assert (dest / "variables/variables.data-00000-of-00001").read_bytes() == data
    return kicks


def test_a_large_file_is_queued_for_writeback_in_steps_covering_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(2 * writeback.WRITEBACK_STEP + 12345)
    kicks = _extract(tmp_path, data, True, monkeypatch)
    assert kicks and kicks[0][0] == 0
    assert all(offset == prev + length for (prev, length), (offset, _) in itertools.pairwise(kicks))
    assert all(length >= writeback.WRITEBACK_STEP for _, length in kicks)
    covered = kicks[-1][0] + kicks[-1][1]
    assert len(data) - writeback.WRITEBACK_STEP < covered <= len(data)  # the rest is the fsync's


def test_without_fsync_nothing_is_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _extract(tmp_path, os.urandom(writeback.WRITEBACK_STEP + 1), False, monkeypatch) == []
