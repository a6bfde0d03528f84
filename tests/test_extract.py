"""Safe streaming extraction: hostile archives are refused and write nothing outside the staging dir."""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubd.errors import ArchiveTooLarge, HubdError, NotAnArchive, UnsafeArchive
from hubd.extract import INFLATE_BACKEND, MAX_INFLATE_RATIO, GzipReader, SafeExtractor, TreeManifest
from tests import hostile


def extract(
    archive: bytes, dest: Path, max_bytes: int = 2**30, max_members: int = 10_000, first_chunk: int = 4096
) -> TreeManifest:
    cuts = [0, *range(first_chunk, len(archive), 4096), len(archive)]
    chunks: Iterator[bytes] = iter([archive[a:b] for a, b in itertools.pairwise(cuts)])
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


@pytest.mark.parametrize("name", sorted(hostile.more_hostile("/x")))
def test_hostile_names_links_and_sparse_members_are_unsafe_archives(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "a" / "b" / "tree"
    dest.mkdir(parents=True)
    with pytest.raises(UnsafeArchive) as caught:
        extract(hostile.more_hostile(str(tmp_path / "outside"))[name], dest)
    assert caught.value.http_status == 422 and caught.value.hint
    assert len(caught.value.message) < 600  # a 5,000-character name is not echoed whole
    real_root = os.path.realpath(dest)
    for path in dest.rglob("*"):
        real = os.path.realpath(path)
        assert os.path.commonpath([real_root, real]) == real_root, f"{path} -> {real}"
    written = sum(p.lstat().st_size for p in dest.rglob("*") if p.is_file() and not p.is_symlink())
    assert written < 2**20  # the sparse member was not expanded


def test_symlink_chain_is_judged_against_the_tree_not_lexically(tmp_path: Path) -> None:
    import posixpath

    target = hostile.chain_escape_target()
    assert not posixpath.normpath(target).startswith("..")  # what a lexical check would let through
    (tmp_path / "tree").mkdir()
    with pytest.raises(UnsafeArchive, match=r"assets\.txt.*leaves the model directory"):
        extract(hostile.symlink_chain(), tmp_path / "tree")


def test_links_that_stay_inside_are_kept(tmp_path: Path) -> None:
    archive = hostile._tar(
        [
            *hostile.saved_model_members(),
            hostile._file("assets/vocab.txt", b"a\nb\n"),
            hostile._symlink("assets/alias.txt", "vocab.txt"),
            hostile._symlink("missing/dir/vocab", "../../assets/vocab.txt"),  # its directory has no entry
        ]
    )
    (tmp_path / "tree").mkdir()
    manifest = extract(archive, tmp_path / "tree")
    assert manifest.symlinks == {"assets/alias.txt": "vocab.txt", "missing/dir/vocab": "../../assets/vocab.txt"}
    assert (tmp_path / "tree" / "missing" / "dir" / "vocab").read_bytes() == b"a\nb\n"


def test_a_valid_archive_whose_first_read_is_one_byte_is_an_archive(
    tmp_path: Path, models: dict[str, bytes]
) -> None:
    (tmp_path / "tree").mkdir()
    manifest = extract(models["reusable"], tmp_path / "tree", first_chunk=1)
    assert "saved_model.pb" in manifest.files


def test_gzip_bomb_is_stopped_by_the_inflate_ratio_below_the_absolute_cap(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    bomb = hostile.gzip_bomb(256 * 2**20)
    with pytest.raises(ArchiveTooLarge, match="times its compressed size"):
        extract(bomb, tmp_path / "tree", max_bytes=2**40)
    written = sum(p.stat().st_size for p in (tmp_path / "tree").rglob("*") if p.is_file())
    assert written <= MAX_INFLATE_RATIO * len(bomb) + 16 * 2**20


def test_many_empty_members_extract_correctly(tmp_path: Path) -> None:
    """Per-member work is O(1) (bench/bench_members.py times it against tar -xzf); this checks the result."""
    (tmp_path / "tree").mkdir()
    manifest = extract(hostile.tar_bomb(20_000), tmp_path / "tree", max_members=30_000)
    assert len(manifest.files) == 20_001
    assert sum(1 for _ in (tmp_path / "tree").iterdir()) == 20_001


def test_max_extract_bytes_accepts_sizes_like_100M(tmp_path: Path) -> None:
    from hubd.config import Settings

    assert Settings(cache_dir=tmp_path, max_extract_bytes="100M").max_extract_bytes == 100 * 2**20  # type: ignore[arg-type]


def test_bytes_after_the_archive_end_are_read_only_up_to_an_allowance(
    tmp_path: Path, models: dict[str, bytes]
) -> None:
    import asyncio

    from hubd.sink import StreamingExtraction

    sent = [0]

    async def endless_upstream() -> None:
        sink = StreamingExtraction(tmp_path / "tree", 2**30, 10_000, fsync=False)
        try:
            await sink.feed(models["reusable"])
            for _ in range(1024):  # 64 MiB of junk after a valid archive, unless the sink stops it
                await sink.feed(b"\0" * 65536)
                sent[0] += 65536
            await sink.finish()
        finally:
            await sink.abort()

    with pytest.raises(NotAnArchive, match="after the archive's end"):
        asyncio.run(endless_upstream())
    assert sent[0] < 8 * 2**20
