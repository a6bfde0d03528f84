"""Safe streaming extraction: hostile archives are refused and write nothing outside the staging dir."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubd.errors import ArchiveTooLarge, HubdError, NotAnArchive, UnsafeArchive
from hubd.extract import SafeExtractor
from hubd.inflate import INFLATE_BACKEND, MAX_INFLATE_RATIO, TRAILING_ALLOWANCE, GzipReader
from hubd.tree import TreeListing
from tests import hostile


def extract(
    archive: bytes, dest: Path, max_bytes: int = 2**30, max_members: int = 10_000, first_chunk: int = 4096
) -> TreeListing:
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
    listing = extract(models["reusable"], dest)
    assert "saved_model.pb" in listing.files
    assert "variables/variables.index" in listing.files
    assert listing.files["saved_model.pb"].size == (dest / "saved_model.pb").stat().st_size
    assert len(listing.digest()) == 64


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
    listing = extract(archive, tmp_path / "tree")
    assert listing.symlinks == {"assets/alias.txt": "vocab.txt", "missing/dir/vocab": "../../assets/vocab.txt"}
    assert (tmp_path / "tree" / "missing" / "dir" / "vocab").read_bytes() == b"a\nb\n"


def test_a_valid_archive_whose_first_read_is_one_byte_is_an_archive(
    tmp_path: Path, models: dict[str, bytes]
) -> None:
    (tmp_path / "tree").mkdir()
    listing = extract(models["reusable"], tmp_path / "tree", first_chunk=1)
    assert "saved_model.pb" in listing.files


def test_gzip_bomb_is_stopped_by_the_inflate_ratio_below_the_absolute_cap(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    bomb = hostile.gzip_bomb(256 * 2**20)
    with pytest.raises(ArchiveTooLarge, match="times its compressed size"):
        extract(bomb, tmp_path / "tree", max_bytes=2**40)
    written = sum(p.stat().st_size for p in (tmp_path / "tree").rglob("*") if p.is_file())
    assert written <= MAX_INFLATE_RATIO * len(bomb) + 16 * 2**20


@pytest.mark.slow
def test_many_empty_members_extract_correctly(tmp_path: Path) -> None:
    """Per-member work is O(1) (bench/bench_members.py times it against tar -xzf); this checks the result."""
    (tmp_path / "tree").mkdir()
    listing = extract(hostile.tar_bomb(20_000), tmp_path / "tree", max_members=30_000)
    assert len(listing.files) == 20_001
    assert sum(1 for _ in (tmp_path / "tree").iterdir()) == 20_001


def test_max_extract_bytes_accepts_sizes_like_100M(tmp_path: Path) -> None:
    from hubd.config import Settings

    assert Settings(cache_dir=tmp_path, max_extract_bytes="100M").max_extract_bytes == 100 * 2**20


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


# Multi-member gzip (pigz --independent, bgzip, `cat a.gz b.gz`): read boundaries fall anywhere, so a member's
# magic can arrive split across two reads; the archive must come out whole, however the stream is cut.

_TREE = {
    "saved_model.pb": b"\x08\x01graph",
    "variables/variables.index": b"index",
    "variables/variables.data-00000-of-00001": bytes(range(256)) * 40,
    "assets/vocab.txt": b"a\nb\n" * 700,
}


def _tar_of_tree() -> bytes:
    return hostile._tar([hostile._file(name, data) for name, data in _TREE.items()], compress=False)


def _header_offsets(raw: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [member.offset for member in tar.getmembers()]


def _end_of_members(raw: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _gzip_members(raw: bytes, cuts: list[int]) -> tuple[bytes, list[int]]:
    """`raw` gzipped as one member per piece between `cuts`, then bgzip's empty end member; and where each
    member after the first begins in the result."""
    pieces = [raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])]
    members = [gzip.compress(piece, mtime=0) for piece in pieces] + [gzip.compress(b"", mtime=0)]
    return b"".join(members), list(itertools.accumulate(len(m) for m in members))[:-1]


def _reader(chunks: list[bytes], max_bytes: int = 2**31) -> GzipReader:
    pieces = iter(chunks)
    return GzipReader(lambda: next(pieces, b""), max_bytes)


def _extract_chunks(chunks: list[bytes], dest: Path) -> TreeListing:
    dest.mkdir()
    return SafeExtractor(dest, 2**30, 10_000, fsync=False).extract_stream(_reader(chunks))


def _split(blob: bytes, *cuts: int) -> list[bytes]:
    return [blob[a:b] for a, b in itertools.pairwise([0, *cuts, len(blob)])]


def _assert_whole_tree(listing: TreeListing, dest: Path) -> None:
    assert set(listing.files) == set(_TREE)
    assert {name: (dest / name).read_bytes() for name in _TREE} == _TREE


def test_multi_member_gzip_split_around_every_member_boundary_extracts_the_whole_tree(tmp_path: Path) -> None:
    raw = _tar_of_tree()
    headers = _header_offsets(raw)
    # Gzip members end on tar member boundaries (where a lost member would go unnoticed) and once mid-file.
    blob, boundaries = _gzip_members(raw, [headers[1], headers[2], headers[2] + 700, headers[3]])
    assert len(boundaries) == 5
    cases = [_split(blob, cut) for b in boundaries for cut in range(b - 2, b + 4)]
    cases += [_split(blob, b, b + 1) for b in boundaries]  # the magic's first byte alone in a read
    cases += [_split(blob, b + 1, b + 2) for b in boundaries]  # ... and its second
    for i, chunks in enumerate(cases):
        dest = tmp_path / f"tree{i}"
        _assert_whole_tree(_extract_chunks(chunks, dest), dest)


def test_gzip_reader_reads_every_member_whatever_the_read_boundaries() -> None:
    parts = [b"first member ", b"second ", b"", b"third, and the last"]
    blob = b"".join(gzip.compress(part, mtime=0) for part in parts)
    for cut in range(1, len(blob)):
        assert _reader(_split(blob, cut)).read() == b"".join(parts), cut
    assert _reader([blob[i : i + 1] for i in range(len(blob))]).read() == b"".join(parts)


def test_single_member_archive_with_trailing_zero_padding_still_extracts(tmp_path: Path) -> None:
    member = gzip.compress(_tar_of_tree(), mtime=0)
    end = len(member)
    for padding in (b"\0" * 10_240, b"\0", b"\x1f"):  # a lone byte at the very end is padding, even 0x1f
        blob = member + padding
        for i, cut in enumerate(c for c in range(end - 2, end + 4) if c < len(blob)):
            dest = tmp_path / f"tree{len(padding)}{padding[:1].hex()}_{i}"
            _assert_whole_tree(_extract_chunks(_split(blob, cut), dest), dest)


def test_padding_after_the_last_member_stays_padding_whatever_the_read_boundaries() -> None:
    """Once padding has begun, a gzip magic later in it is padding too (as for gzip(1)), not a new member that
    appears only when a read happens to begin on it."""
    first = gzip.compress(b"the archive", mtime=0)
    blob = first + b"\0" * 100 + gzip.compress(b" and more", mtime=0)
    for cut in range(len(first) - 2, len(blob)):
        assert _reader(_split(blob, cut)).read() == b"the archive", cut


def test_bytes_after_a_multi_member_archive_are_cut_at_the_allowance() -> None:
    blob, boundaries = _gzip_members(b"payload" * 100, [300])
    for extra in (TRAILING_ALLOWANCE, TRAILING_ALLOWANCE + 1):
        padded = blob + b"\0" * extra
        reader = _reader(_split(padded, boundaries[-1] + 1, len(blob) + 1))
        if extra <= TRAILING_ALLOWANCE:
            assert reader.read() == b"payload" * 100
        else:
            with pytest.raises(NotAnArchive, match="after the archive's end"):
                reader.read()


def test_a_tar_torn_inside_a_header_is_refused_not_cut_short(tmp_path: Path) -> None:
    """The gzip stream ends cleanly on a member boundary, but the tar inside stops part way through a header:
    tarfile would end there without a word, and the members after it would be missing."""
    raw = _tar_of_tree()
    torn = raw[: _header_offsets(raw)[2] + 100]
    blob, _ = _gzip_members(torn, [_header_offsets(raw)[2]])
    with pytest.raises(NotAnArchive, match="middle of a tar header"):
        _extract_chunks([blob], tmp_path / "tree")


def test_a_damaged_tar_header_is_refused_not_taken_for_the_end(tmp_path: Path) -> None:
    raw = _tar_of_tree()
    at = _header_offsets(raw)[2]
    damaged = raw[:at] + (b"not a tar header. " * 30)[: tarfile.BLOCKSIZE] + raw[at:]
    with pytest.raises(NotAnArchive, match="damaged header"):
        _extract_chunks([gzip.compress(damaged)], tmp_path / "tree")


def test_a_tar_without_its_end_blocks_is_accepted_whole(tmp_path: Path) -> None:
    """Some writers omit the two zero blocks; GNU tar and libarchive accept such a tar, and so does hubd: the
    stream ends on a header boundary, after the last gzip member's end and the input's (see _check_tar_end)."""
    raw = _tar_of_tree()
    bare = raw[: _end_of_members(raw)]
    assert len(bare) < len(raw) and raw[len(bare) :] == bytes(len(raw) - len(bare))
    blob, boundaries = _gzip_members(bare, [_header_offsets(raw)[3]])
    for i, cut in enumerate(range(boundaries[0] - 2, boundaries[0] + 4)):
        dest = tmp_path / f"tree{i}"
        _assert_whole_tree(_extract_chunks(_split(blob, cut), dest), dest)
