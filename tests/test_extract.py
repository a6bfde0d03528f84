"""Safe streaming extraction: hostile archives are refused and write nothing outside the staging dir."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubd.errors import ArchiveTooLarge, HubdError, NotAnArchive, UnsafeArchive
from hubd.extract import INFLATE_BACKEND, GzipReader, SafeExtractor, TreeManifest
from tests import hostile


def extract(archive: bytes, dest: Path, max_bytes: int = 2**30, max_members: int = 10_000) -> TreeManifest:
    chunks: Iterator[bytes] = iter([archive[i : i + 4096] for i in range(0, len(archive), 4096)])
    reader = GzipReader(lambda: next(chunks, b""), max_bytes * 2)
    return SafeExtractor(dest, max_bytes, max_members, fsync=False).extract_stream(reader)


def all_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_isal_is_the_inflate_backend_when_installed() -> None:
    assert INFLATE_BACKEND == "isal"


def test_a_real_model_archive_extracts_with_a_manifest(tmp_path: Path, models: dict[str, bytes]) -> None:
    dest = tmp_path / "tree"
    dest.mkdir()
    manifest = extract(models["reusable"], dest)
    assert "saved_model.pb" in manifest.files
    assert "variables/variables.index" in manifest.files
    assert manifest.files["saved_model.pb"].size == (dest / "saved_model.pb").stat().st_size
    assert len(manifest.digest()) == 64


def test_tree_digest_depends_on_content_not_on_compression(tmp_path: Path, models: dict[str, bytes]) -> None:
    import gzip

    recompressed = gzip.compress(gzip.decompress(models["reusable"]), compresslevel=1)
    assert recompressed != models["reusable"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert extract(models["reusable"], tmp_path / "a").digest() == extract(recompressed, tmp_path / "b").digest()


@pytest.mark.parametrize("name", sorted(hostile.hostile_corpus("/x")))
def test_hostile_archive_is_refused_and_nothing_escapes(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    workdir = tmp_path / "a" / "b" / "c" / "d"
    workdir.mkdir(parents=True)
    dest = workdir / "tree"
    dest.mkdir()
    archive = hostile.hostile_corpus(str(outside))[name]
    with pytest.raises(UnsafeArchive) as caught:
        extract(archive, dest)
    assert caught.value.hint
    assert list(outside.iterdir()) == []
    assert all_paths(tmp_path) <= {"outside", "a", "a/b", "a/b/c", "a/b/c/d"} | {
        f"a/b/c/d/{p}" for p in ["tree", *[f"tree/{q}" for q in all_paths(dest)]]
    }
    for path in dest.rglob("*"):
        assert not path.is_symlink() or not os.path.isabs(os.readlink(path))


def test_refusal_names_the_offending_member(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    with pytest.raises(UnsafeArchive, match="evil"):
        extract(hostile.hostile_corpus(str(tmp_path / "o"))["traversal"], tmp_path / "tree")


def test_tar_bomb_is_stopped_by_the_member_cap(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    with pytest.raises(ArchiveTooLarge, match="more than 50 members"):
        extract(hostile.tar_bomb(200), tmp_path / "tree", max_members=50)


def test_gzip_bomb_is_stopped_before_it_fills_the_disk(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    bomb = hostile.gzip_bomb(64 * 2**20)
    assert len(bomb) < 2**20
    with pytest.raises(ArchiveTooLarge):
        extract(bomb, tmp_path / "tree", max_bytes=8 * 2**20)
    written = sum(p.stat().st_size for p in (tmp_path / "tree").rglob("*") if p.is_file())
    assert written <= 8 * 2**20


def test_setuid_bits_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    extract(hostile.setuid_file(), tmp_path / "tree")
    mode = (tmp_path / "tree" / "assets" / "tool").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IXUSR)


def test_html_served_instead_of_an_archive_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    with pytest.raises(NotAnArchive, match="did not send a gzip archive"):
        extract(hostile.not_gzip(), tmp_path / "tree")


def test_truncated_archive_is_an_error(tmp_path: Path, models: dict[str, bytes]) -> None:
    (tmp_path / "tree").mkdir()
    with pytest.raises(HubdError):
        extract(hostile.truncated(models["large_4mb"]), tmp_path / "tree")
