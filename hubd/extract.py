"""Streaming, safe extraction of a gzip-compressed tar into one directory; knows nothing of HTTP.

The archive arrives in chunks and is unpacked as it arrives, so it is never held in memory or stored whole.
Each member is checked before anything is written: no absolute paths, no ``..``, no links that leave the
model directory, no devices or FIFOs, no set-id bits, and caps on member count and total bytes (which also
stops gzip and tar bombs). Every file is hashed while it is written; the result is the tree's manifest.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import queue
import tarfile
import threading
import types
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hubd.errors import ArchiveTooLarge, DiskFull, NotAnArchive, UnsafeArchive

_inflate_lib: types.ModuleType
try:  # ISA-L inflates about 1.5x faster than zlib (bench/inflate.py); zlib is the fallback.
    from isal import isal_zlib

    _inflate_lib, INFLATE_BACKEND = isal_zlib, "isal"
    _INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, cast(type[Exception], isal_zlib.error))
except ImportError:  # pragma: no cover - exercised only where isal is missing
    _inflate_lib, INFLATE_BACKEND = zlib, "zlib"
    _INFLATE_ERRORS = (zlib.error,)

_GZIP_MAGIC = b"\x1f\x8b"
_WRITE_CHUNK = 1 << 20
_OUT_CHUNK = 1 << 20


@dataclass
class FileRecord:
    size: int
    sha256: str


@dataclass
class TreeManifest:
    """What an extracted tree holds: files with sizes and digests, symlinks with their targets."""

    files: dict[str, FileRecord] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    @property
    def total_bytes(self) -> int:
        return sum(record.size for record in self.files.values())

    def digest(self) -> str:
        """A digest of the tree's content alone: equal trees get equal digests, whatever archive carried them."""
        lines = [f"f {path} {rec.size} {rec.sha256}" for path, rec in sorted(self.files.items())]
        lines += [f"l {path} {target}" for path, target in sorted(self.symlinks.items())]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "files": {p: {"size": r.size, "sha256": r.sha256} for p, r in sorted(self.files.items())},
            "symlinks": dict(sorted(self.symlinks.items())),
            "dirs": sorted(self.dirs),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TreeManifest:
        return cls(
            files={p: FileRecord(int(r["size"]), str(r["sha256"])) for p, r in data.get("files", {}).items()},
            symlinks=dict(data.get("symlinks", {})),
            dirs=set(data.get("dirs", [])),
        )


class GzipReader(io.RawIOBase):
    """A readable stream of the inflated bytes of a gzip stream pulled from `read_compressed`.

    Output is produced in bounded pieces (never more than asked for), so a gzip bomb cannot balloon memory,
    and the total is capped. Concatenated gzip members are read as one stream, as gzip(1) does.
    """

    def __init__(self, read_compressed: Callable[[], bytes], max_bytes: int) -> None:
        self._read_compressed = read_compressed
        self._max_bytes = max_bytes
        self._inflater = _inflate_lib.decompressobj(wbits=31)
        self._pending = b""
        self._produced = 0
        self._started = False
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._inflate(len(view))
        view[: len(data)] = data
        return len(data)

    def _inflate(self, want: int) -> bytes:
        while not self._eof:
            if not self._pending:
                self._pending = self._next_compressed()
                if not self._pending:
                    if not self._inflater.eof:
                        raise NotAnArchive("the archive ends early (truncated gzip stream)", "fetch it again")
                    self._eof = True
                    break
            if self._inflater.eof:
                if self._pending[:2] != _GZIP_MAGIC:
                    # Padding after the last member: gzip(1) ignores it too.
                    self._pending = b""
                    continue
                # A new gzip member follows the previous one.
                self._inflater = _inflate_lib.decompressobj(wbits=31)
            try:
                out: bytes = self._inflater.decompress(self._pending, min(want, _OUT_CHUNK))
            except _INFLATE_ERRORS as exc:
                raise NotAnArchive(f"the archive is corrupt: {exc}", "fetch it again") from None
            if self._inflater.eof:
                self._pending = self._inflater.unused_data
            else:
                self._pending = self._inflater.unconsumed_tail
            if out:
                self._produced += len(out)
                if self._produced > self._max_bytes:
                    raise ArchiveTooLarge(
                        f"the archive inflates past the limit of {self._max_bytes} bytes (a gzip bomb?)",
                        "raise HUBD_MAX_EXTRACT_BYTES if this model really is that large",
                    )
                return out
        return b""

    def _next_compressed(self) -> bytes:
        chunk = self._read_compressed()
        if chunk and not self._started:
            self._started = True
            if chunk[:2] != _GZIP_MAGIC:
                snippet = chunk[:60].decode("latin-1").replace("\n", " ")
                raise NotAnArchive(
                    f"the server did not send a gzip archive (it starts with {snippet!r})",
                    "check that the handle points at a model; an HTML page usually means a login or error page",
                )
        return chunk


class ReadAhead(io.RawIOBase):
    """Reads `source` in a thread of its own, so inflating overlaps with writing files (both release the GIL).

    On a 2-core machine this takes a 400 MB model's extraction from inflate + write in series to about the
    slower of the two (bench/bench_fetch.py). Errors raised by `source` are re-raised to the reader.
    """

    def __init__(self, source: io.RawIOBase, depth: int = 8) -> None:
        self._source = source
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._buffer = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._pump, name="hubd-inflate", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _pump(self) -> None:
        try:
            while not self._closed.is_set():
                chunk = self._source.read(_OUT_CHUNK)
                self._put(chunk or b"")
                if not chunk:
                    return
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readinto(self, buffer: Any) -> int:
        if not self._buffer:
            if self._eof:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return 0
            self._buffer = memoryview(item)
        view = memoryview(buffer).cast("B")
        size = min(len(view), len(self._buffer))
        view[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size

    def close(self) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        super().close()


class SafeExtractor:
    """Unpacks tar members into `dest`, refusing anything that could reach outside it."""

    def __init__(self, dest: Path, max_bytes: int, max_members: int, fsync: bool) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.fsync = fsync
        self.manifest = TreeManifest()
        self._members = 0
        self._deferred_links: list[tuple[str, str]] = []
        self._link_names: set[str] = set()

    def extract_stream(self, stream: io.RawIOBase) -> TreeManifest:
        reader = ReadAhead(stream)
        try:
            return self._extract(io.BufferedReader(reader, buffer_size=_WRITE_CHUNK))
        finally:
            reader.close()

    def _extract(self, buffered: io.BufferedReader) -> TreeManifest:
        try:
            with tarfile.open(fileobj=buffered, mode="r|") as archive:
                for member in archive:
                    self._extract_member(archive, member)
        except tarfile.TarError as exc:
            raise NotAnArchive(f"the archive is not a valid tar file: {exc}", "fetch it again") from None
        for name, target in self._deferred_links:
            os.symlink(target, self.dest / name)
            self.manifest.symlinks[name] = target
        return self.manifest

    def _extract_member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self._members += 1
        if self._members > self.max_members:
            raise ArchiveTooLarge(
                f"the archive has more than {self.max_members} members (a tar bomb?)",
                "raise HUBD_MAX_MEMBERS if this model really has that many files",
            )
        name = self._safe_name(member.name)
        if name is None:  # the archive's root directory itself
            return
        prefixes = {"/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 2)}
        if prefixes & self._link_names:
            raise UnsafeArchive(
                f"member {member.name!r} reuses or goes through a symlink in the archive",
                "the archive is hostile or malformed; it was not used",
            )
        if member.isdir():
            self._ensure_dir(name)
        elif member.isreg():
            self._write_file(archive, member, name)
        elif member.issym():
            self._check_link_target(name, member.linkname, posixpath.dirname(name))
            if os.path.lexists(self.dest / name):
                raise UnsafeArchive(f"the archive holds {member.name!r} twice", "the archive was not used")
            self._deferred_links.append((name, member.linkname))
            self._link_names.add(name)
        elif member.islnk():
            target = self._safe_name(member.linkname)
            if target is None or target not in self.manifest.files:
                raise UnsafeArchive(
                    f"hard link {member.name!r} points at {member.linkname!r}, which is not a file in the model",
                    "the archive is malformed or hostile; it was not used",
                )
            self._ensure_dir(posixpath.dirname(name))
            os.link(self.dest / target, self.dest / name)
            self.manifest.files[name] = self.manifest.files[target]
        else:
            kind = "device" if member.isdev() else "FIFO" if member.isfifo() else "special file"
            raise UnsafeArchive(
                f"the archive contains a {kind}: {member.name!r}", "the archive is hostile; it was not used"
            )

    def _safe_name(self, raw: str) -> str | None:
        if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
            raise UnsafeArchive(
                f"absolute path in archive: {raw!r}", "the archive is hostile or malformed; it was not used"
            )
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise UnsafeArchive(
                f"path leaves the model directory: {raw!r}", "the archive is hostile or malformed; it was not used"
            )
        if any("\x00" in p or "\\" in p for p in parts):
            raise UnsafeArchive(f"invalid characters in member name: {raw!r}", "the archive was not used")
        return "/".join(parts) if parts else None

    def _check_link_target(self, name: str, target: str, base: str) -> None:
        resolved = posixpath.normpath(posixpath.join(base, target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(
                f"symlink {name!r} points outside the model directory ({target!r})",
                "the archive is hostile; it was not used",
            )

    def _ensure_dir(self, name: str) -> None:
        if not name:
            return
        path = self.dest / name
        for parent in [*reversed(Path(name).parents), Path(name)]:
            if str(parent) == ".":
                continue
            candidate = self.dest / parent
            if candidate.is_symlink() or (candidate.exists() and not candidate.is_dir()):
                raise UnsafeArchive(f"member {name!r} goes through a non-directory", "the archive was not used")
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.manifest.dirs.add(name)

    def _write_file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        if self.manifest.total_bytes + member.size > self.max_bytes:
            raise ArchiveTooLarge(
                f"extracting {member.name!r} would pass the limit of {self.max_bytes} bytes",
                "raise HUBD_MAX_EXTRACT_BYTES if this model really is that large",
            )
        if name in self.manifest.files or name in self.manifest.dirs:
            raise UnsafeArchive(f"the archive holds {member.name!r} twice", "the archive was not used")
        self._ensure_dir(posixpath.dirname(name))
        source = archive.extractfile(member)
        assert source is not None
        digest = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.dest / name, flags, 0o644)
        written = 0
        try:
            while chunk := source.read(_WRITE_CHUNK):
                digest.update(chunk)
                _write_all(fd, chunk)
                written += len(chunk)
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            raise _disk_error(exc) from exc
        finally:
            os.close(fd)
        self.manifest.files[name] = FileRecord(written, digest.hexdigest())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _disk_error(exc: OSError) -> Exception:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            "the disk holding the cache is full; the download was abandoned and nothing cached was touched",
            "free space (`hubd gc`, or remove unused models with `hubd rm`) or move HUBD_CACHE_DIR",
        )
    return exc
