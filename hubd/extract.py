"""Safe extraction of a tar stream into one directory; knows nothing of HTTP or gzip (hubd/inflate.py).

The tar arrives as a stream (inflated as it arrives, hubd/sink.py) and is unpacked as it is read, so it is never
held in memory or stored whole. Each member is checked before anything is written: no absolute paths, no
``..``, no links that leave the model directory (judged against the whole tree, not lexically), no devices,
FIFOs or sparse files, no control characters or overlong names, no set-id bits, and caps on member count and
total bytes (the inflate caps that stop gzip bombs are GzipReader's). Every file is hashed while it is
written; the result is the tree's listing (hubd/tree.py).

`tarfile` parses the headers only. A regular file's data is hashed and written straight from the inflater's
chunks (`_ChunkReader.take`): no copies through `tarfile`'s stream buffer (which reads 10 KiB at a time and
joins them), an `io.BufferedReader` and a per-member reader, which cost about a second of CPU per 400 MB.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self, cast

from hubd.errors import ArchiveTooLarge, DiskFull, NotAnArchive, UnsafeArchive
from hubd.tree import CONTROL_CHARS, PROTECTED_DIR, PROTECTED_FILES, FileRecord, TreeListing
from hubd.writeback import WRITEBACK_STEP, start_writeback

__all__ = ["SafeExtractor"]

_WRITE_CHUNK = 1 << 20
# Linux allows 255 bytes per name and 4,096 per path; a model's paths are far shorter. Refusing longer names
# up front turns ENAMETOOLONG deep in a write into a clear refusal.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024
_REFUSED = "the archive is hostile or malformed; it was not used"


class SafeExtractor:
    """Unpacks tar members into `dest`, refusing anything that could reach outside it.

    Each member costs O(1) bookkeeping (running totals, set look-ups), so a tar of a million empty files costs
    what tar(1) does. Every member passes hubd's own rules first and `tarfile.data_filter` second; links are
    created last, once the whole tree is known, and only if each resolves inside it (`TreeListing.link_problems`),
    which is checked again against the real tree on disk.
    """

    def __init__(self, dest: Path, max_bytes: int, max_members: int, fsync: bool) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.fsync = fsync
        self.listing = TreeListing()
        self._members = 0
        self._bytes = 0
        self._deferred_links: list[tuple[str, str]] = []
        self._dest_str = str(dest)

    def extract_stream(self, stream: io.RawIOBase) -> TreeListing:
        """Unpack the tar read from `stream` (inflated bytes); the listing of what was written."""
        return self.extract_chunks(lambda: stream.read(_WRITE_CHUNK) or b"")

    def extract_chunks(self, read_chunk: Callable[[], bytes]) -> TreeListing:
        """Unpack the tar whose inflated bytes `read_chunk` returns piece by piece (b"" at the end)."""
        source = _ChunkReader(read_chunk)
        try:
            # Mode "r" over a forward-only reader: tarfile reads each header and skips to the next member with
            # a forward seek; the "r|" mode's own stream buffer, which would copy every byte, is not used.
            with tarfile.TarFile(fileobj=cast(Any, source), mode="r", tarinfo=_EndTrackingTarInfo) as archive:
                while (member := archive.next()) is not None:
                    # A stream is read once: keeping every header would cost memory in proportion to members.
                    cast(Any, archive).members.clear()
                    self._extract_member(source, member)
                _check_tar_end(archive)
            self._create_links()
        except tarfile.TarError as exc:
            raise NotAnArchive(f"the archive is not a valid tar file: {exc}", "fetch it again") from None
        except OSError as exc:
            raise _disk_error(exc) from exc
        return self.listing

    def _extract_member(self, source: _ChunkReader | tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Check and unpack one member; its data comes from `source` (a `TarFile` for a caller that reads the
        tar with `tarfile` itself, as a bundle import does)."""
        self._members += 1
        if self._members > self.max_members:
            raise ArchiveTooLarge(
                f"the archive has more than {self.max_members} members (a tar bomb?)",
                "raise HUBD_MAX_MEMBERS if this model really has that many files",
            )
        name = self._safe_name(member.name)
        if name is None:  # the archive's root directory itself
            return
        if member.issym():
            self._check_link_target(name, member.linkname)
        self._second_opinion(member)
        if member.isdir():
            self._ensure_dir(name, member.name)
            return
        self._claim(name, member.name)
        if member.issparse():
            raise UnsafeArchive(
                f"{member.name!r} is a sparse file ({member.size} bytes stored, more when written out); "
                "hubd does not unpack sparse members",
                "re-create the archive without --sparse; it was not used",
            )
        if member.isreg():
            self._write_file(source, member, name)
        elif member.issym():
            self._ensure_dir(posixpath.dirname(name), member.name)
            self._deferred_links.append((name, member.linkname))
            self.listing.symlinks[name] = member.linkname
        elif member.islnk():
            target = self._safe_name(member.linkname)
            if target is None or target not in self.listing.files:
                raise UnsafeArchive(
                    f"hard link {member.name!r} points at {member.linkname!r}, which is not a file in the model",
                    _REFUSED,
                )
            self._ensure_dir(posixpath.dirname(name), member.name)
            os.link(self.dest / target, self.dest / name, follow_symlinks=False)
            self.listing.files[name] = self.listing.files[target]
        else:
            kind = "device" if member.isdev() else "FIFO" if member.isfifo() else "special file"
            raise UnsafeArchive(f"the archive contains a {kind}: {member.name!r}", _REFUSED)

    def _claim(self, name: str, raw: str) -> None:
        """A path is given to one member only: no overwriting, no writing through or over a link."""
        files, links, dirs = self.listing.files, self.listing.symlinks, self.listing.dirs
        if name in files or name in links or name in dirs:
            raise UnsafeArchive(f"the archive holds {raw!r} twice", _REFUSED)
        self._check_prefixes(name, raw)

    def _check_prefixes(self, name: str, raw: str) -> None:
        links, files = self.listing.symlinks, self.listing.files
        if not links and "/" not in name:
            return
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in links:
                raise UnsafeArchive(f"member {raw!r} reuses or goes through a symlink in the archive", _REFUSED)
            if prefix in files:
                raise UnsafeArchive(f"member {raw!r} goes through a non-directory", _REFUSED)

    def _safe_name(self, raw: str) -> str | None:
        if CONTROL_CHARS.search(raw):
            raise UnsafeArchive(f"control character in member name: {raw[:200]!r}", _REFUSED)
        if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
            raise UnsafeArchive(f"absolute path in archive: {raw[:200]!r}", _REFUSED)
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise UnsafeArchive(f"path leaves the model directory: {raw[:200]!r}", _REFUSED)
        if any("\\" in p for p in parts):
            raise UnsafeArchive(f"invalid characters in member name: {raw[:200]!r}", _REFUSED)
        name = "/".join(parts)
        if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES or any(
            len(p.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for p in parts
        ):
            raise UnsafeArchive(
                f"member name too long ({len(name)} characters; at most {MAX_NAME_BYTES} bytes per name and "
                f"{MAX_PATH_BYTES} per path): {raw[:80]!r}...",
                _REFUSED,
            )
        return name or None

    def _second_opinion(self, member: tarfile.TarInfo) -> None:
        """Python's own `data` filter (PEP 706) after hubd's rules: anything it refuses is refused too."""
        try:
            tarfile.data_filter(member, self._dest_str)
        except tarfile.FilterError as exc:
            raise UnsafeArchive(f"{member.name[:200]!r}: {exc}", _REFUSED) from None

    def _check_link_target(self, name: str, target: str) -> None:
        if CONTROL_CHARS.search(target) or len(target.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise UnsafeArchive(f"symlink {name!r} has an invalid target {target[:200]!r}", _REFUSED)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(f"symlink {name!r} points outside the model directory ({target!r})", _REFUSED)
        if name in PROTECTED_FILES or name == PROTECTED_DIR or name.startswith(PROTECTED_DIR + "/"):
            raise UnsafeArchive(f"{name!r} must be a regular file, not a link ({target!r})", _REFUSED)

    def _ensure_dir(self, name: str, raw: str) -> None:
        dirs = self.listing.dirs
        if not name or name in dirs:
            return
        if name in self.listing.files or name in self.listing.symlinks:
            raise UnsafeArchive(f"the archive holds {raw!r} twice", _REFUSED)
        self._check_prefixes(name, raw)
        (self.dest / name).mkdir(mode=0o755, parents=True, exist_ok=True)
        parts = name.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))

    def _create_links(self) -> None:
        """Create the links once the whole tree is known, if each resolves inside it; then check the real tree."""
        problems = self.listing.link_problems()
        if problems:
            raise UnsafeArchive(f"unsafe link: {problems[0]}", _REFUSED)
        for name, target in self._deferred_links:
            os.symlink(target, self.dest / name)
        real_root = os.path.realpath(self.dest)
        for name, _target in self._deferred_links:
            real = os.path.realpath(self.dest / name)
            if os.path.commonpath([real_root, real]) != real_root or not os.path.exists(real):
                raise UnsafeArchive(f"symlink {name!r} resolves outside the model directory", _REFUSED)

    def _write_file(self, source: _ChunkReader | tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        if self._bytes + member.size > self.max_bytes:
            raise ArchiveTooLarge(
                f"extracting {member.name!r} would pass the limit of {self.max_bytes} bytes",
                "raise HUBD_MAX_EXTRACT_BYTES if this model really is that large",
            )
        self._ensure_dir(posixpath.dirname(name), member.name)
        digest = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.dest / name, flags, 0o644)
        written = flushed = 0
        try:
            for piece in _member_data(source, member):
                digest.update(piece)  # hashlib and os.write release the GIL on pieces this large
                _write_all(fd, piece)
                written += len(piece)
                if self.fsync and written - flushed >= WRITEBACK_STEP:
                    start_writeback(fd, flushed, written - flushed)  # the fsync below then waits for little
                    flushed = written
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._bytes += written
        self.listing.files[name] = FileRecord(written, digest.hexdigest())


# tarfile's header errors are not in its __all__ (nor its stubs), but have been there since Python 3.2.
_TRUNCATED_HEADER: type[Exception] = cast(Any, tarfile).TruncatedHeaderError
_INVALID_HEADER: type[Exception] = cast(Any, tarfile).InvalidHeaderError


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records why `tarfile` stopped: in stream mode `next()` returns None alike for the end-of-archive block,
    a clean end of data, a torn header and a header of garbage, so the caller could not tell them apart."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(archive)
        except Exception as exc:
            cast(Any, archive).hubd_header_error = exc
            raise


def _check_tar_end(archive: tarfile.TarFile) -> None:
    """The tar must end with its end-of-archive block, or at least where a header would begin.

    A zero block is the end (tar(1) writes two; `tarfile` stops at the first). A stream that stops part way
    through a header, or holds something that is not a header where one belongs, is refused: `tarfile` would
    end there without a word and every member after that point would be silently missing. A stream that stops
    cleanly on a header boundary without the zero blocks is accepted, as GNU tar and libarchive accept it
    ("some writers do omit the block of nulls"): the gzip layer has by then read its stream to a member's end
    and to the end of the input, and a download cut short is caught by the fetch (Content-Length, retries).
    """
    error = getattr(archive, "hubd_header_error", None)
    if isinstance(error, _TRUNCATED_HEADER):
        raise NotAnArchive(
            f"the archive ends in the middle of a tar header (at byte {archive.offset} of the tar): truncated",
            "fetch it again; nothing was cached",
        )
    if isinstance(error, _INVALID_HEADER):
        raise NotAnArchive(
            f"the archive is not a valid tar file: a damaged header at byte {archive.offset} ({error}); the "
            "members after it cannot be read",
            "fetch it again; if it fails the same way, the archive itself is damaged upstream",
        )


def _member_data(source: _ChunkReader | tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[memoryview]:
    """A regular member's data in pieces: views of the inflater's chunks, or reads of `tarfile`'s own reader."""
    if isinstance(source, tarfile.TarFile):
        reader = source.extractfile(member)
        assert reader is not None
        while chunk := reader.read(_WRITE_CHUNK):
            yield memoryview(chunk)
        return
    if source.tell() != member.offset_data:  # tarfile leaves the reader at the member's data, always
        raise tarfile.ReadError(f"{member.name!r}: its data is not where its header says")
    left = member.size
    while left:
        piece = source.take(left)
        if not piece:
            raise tarfile.ReadError("unexpected end of data")
        left -= len(piece)
        yield piece


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class _ChunkReader:
    """The tar stream as `tarfile` reads it (read, tell, forward seek) over the chunks `read_chunk` returns,
    plus `take`, which hands out pieces of those chunks themselves rather than copies."""

    def __init__(self, read_chunk: Callable[[], bytes]) -> None:
        self._read_chunk = read_chunk
        self._buffer = memoryview(b"")
        self._position = 0
        self._eof = False

    def take(self, limit: int) -> memoryview:
        """Up to `limit` next bytes, a view of the current chunk (empty at the end of the stream)."""
        while not self._buffer and not self._eof:
            chunk = self._read_chunk()
            self._eof = not chunk
            self._buffer = memoryview(chunk).cast("B")
        piece = self._buffer[:limit]
        self._buffer = self._buffer[len(piece) :]
        self._position += len(piece)
        return piece

    def read(self, size: int = -1) -> bytes:
        """Exactly `size` bytes, fewer only at the end of the stream (headers: small reads)."""
        if size < 0:
            raise tarfile.StreamError("a tar stream is not read whole")
        parts = []
        while size > 0 and (piece := self.take(size)):
            parts.append(piece)
            size -= len(piece)
        return b"".join(parts)

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Forward only: skips what is not unpacked (a member's padding, an ignored member's data)."""
        if whence != io.SEEK_SET or offset < self._position:
            raise tarfile.StreamError("seeking backwards is not allowed")
        while self._position < offset and self.take(offset - self._position):
            pass
        return self._position


def _disk_error(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            "the disk holding the cache is full; the download was abandoned and nothing cached was touched",
            "free space (`hubd gc`, or remove unused models with `hubd rm`) or move HUBD_CACHE_DIR",
        )
    if exc.errno in (errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP):
        return UnsafeArchive(f"the archive cannot be unpacked safely: {exc.strerror}", _REFUSED)
    return exc
