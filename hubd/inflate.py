"""Inflating the archive's gzip stream, bounded: the one place that knows gzip; knows nothing of tar or HTTP.

`GzipReader` turns compressed chunks, pulled as they arrive, into inflated bytes with ISA-L (zlib where ISA-L
is missing), under the caps that stop gzip bombs before their bytes reach the disk: an absolute size and an
inflate ratio. `check_trailing` bounds the padding an upstream may send after the archive's end. The parallel
inflate of a spooled archive (many cores) is in hubd/parallel_inflate.py, under the same caps.
"""

from __future__ import annotations

import io
import types
import zlib
from collections.abc import Callable
from typing import Any, cast

from hubd.errors import ArchiveTooLarge, NotAnArchive

__all__ = [
    "GZIP_MAGIC",
    "INFLATE_BACKEND",
    "MAX_INFLATE_RATIO",
    "TRAILING_ALLOWANCE",
    "GzipReader",
    "check_budget",
    "check_magic",
    "check_trailing",
    "inflate_cap",
]

_inflate_lib: types.ModuleType
try:  # ISA-L inflates about 1.5x faster than zlib (bench/bench_inflate.py); zlib is the fallback.
    from isal import isal_zlib

    _inflate_lib, INFLATE_BACKEND = isal_zlib, "isal"
    _INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, cast(type[Exception], isal_zlib.error))
except ImportError:  # pragma: no cover - exercised only where isal is missing
    _inflate_lib, INFLATE_BACKEND = zlib, "zlib"
    _INFLATE_ERRORS = (zlib.error,)

GZIP_MAGIC = b"\x1f\x8b"
_OUT_CHUNK = 1 << 20
# Deflate's best is 1032:1. Real SavedModels (float weights, protobufs) inflate well under 10:1; a tar of empty
# files about 100:1 (one 512-byte header each). The allowance lets a small archive's padding through.
MAX_INFLATE_RATIO = 200
RATIO_ALLOWANCE = 16 << 20
TRAILING_ALLOWANCE = 1 << 20  # compressed bytes accepted after the tar's end (tar and gzip padding)


def inflate_cap(max_extract_bytes: int) -> int:
    """The most inflated bytes allowed for a tree capped at `max_extract_bytes`: tar headers and padding on top."""
    return max_extract_bytes + max_extract_bytes // 8 + (1 << 20)


class GzipReader(io.RawIOBase):
    """A readable stream of the inflated bytes of a gzip stream pulled from `read_compressed`.

    Output is produced in bounded pieces (never more than asked for), so a gzip bomb cannot balloon memory.
    Two budgets stop bombs before their bytes reach the disk: an absolute cap (`max_bytes`), and an inflate
    ratio: at no point may the output pass `max_ratio` times the compressed bytes read so far (plus a small
    allowance), which real models never approach and a bomb (deflate reaches 1032:1) passes at once.
    Concatenated gzip members are read as one stream, as gzip(1) does.
    """

    def __init__(
        self,
        read_compressed: Callable[[], bytes],
        max_bytes: int,
        max_ratio: int = MAX_INFLATE_RATIO,
    ) -> None:
        self._read_compressed = read_compressed
        self._max_bytes = max_bytes
        self._max_ratio = max_ratio
        self._inflater = _inflate_lib.decompressobj(wbits=31)
        self._pending = b""
        self._produced = 0
        self._consumed = 0
        self._trailing = 0
        self._started = False
        self._padding = False  # the last member has ended; what follows is padding
        self._input_ended = False  # read_compressed has returned b"" (it is not asked again)
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._inflate(len(view))
        view[: len(data)] = data
        return len(data)

    def read_chunk(self) -> bytes:
        """The next piece of inflated bytes (at most 1 MiB; b"" at the end), as the inflater made it: no copy."""
        return self._inflate(_OUT_CHUNK)

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
                if not self._padding and len(self._pending) < len(GZIP_MAGIC) and not self._input_ended:
                    # A member ended and the next one's magic may straddle a read boundary: never judge
                    # "not a new member" on fewer than 2 bytes while more input may come.
                    self._pending += self._next_compressed()
                    continue
                if self._padding or self._pending[:2] != GZIP_MAGIC:
                    # Padding after the last member: gzip(1) ignores it too, but not without end. Once padding
                    # has begun, everything after it is padding, however the stream happens to be cut up.
                    self._padding = True
                    self._trailing += len(self._pending)
                    self._pending = b""
                    check_trailing(self._trailing)
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
                self._check_budget()
                return out
        return b""

    def _check_budget(self) -> None:
        check_budget(self._produced, self._consumed - len(self._pending), self._max_bytes, self._max_ratio)

    def _next_compressed(self) -> bytes:
        if self._input_ended:
            return b""
        chunk = self._read_compressed()
        if not self._started:
            # Sniff the magic on the first two bytes, however the stream happens to be cut into chunks.
            while chunk and len(chunk) < len(GZIP_MAGIC):
                more = self._read_compressed()
                if not more:
                    self._input_ended = True
                    break
                chunk += more
            if chunk:
                self._started = True
                check_magic(chunk)
        if not chunk:
            self._input_ended = True
        self._consumed += len(chunk)
        return chunk


def check_trailing(count: int) -> None:
    """Bytes after the archive's end are padding up to a point; an upstream that keeps sending is refused."""
    if count > TRAILING_ALLOWANCE:
        raise NotAnArchive(
            f"the upstream sent more than {TRAILING_ALLOWANCE} bytes after the archive's end",
            "the server is misbehaving (or the URL is not a model archive); nothing was cached",
        )


def check_magic(first: bytes) -> None:
    """The archive must start as gzip does; anything else (an HTML login page, say) is refused at once."""
    if first[:2] != GZIP_MAGIC:
        snippet = first[:60].decode("latin-1").replace("\n", " ")
        raise NotAnArchive(
            f"the server did not send a gzip archive (it starts with {snippet!r})",
            "check that the handle points at a model; an HTML page usually means a login or error page",
        )


def check_budget(produced: int, consumed: int, max_bytes: int, max_ratio: int) -> None:
    """Two caps stop bombs: `max_bytes` inflated in all, and at most `max_ratio` times the compressed bytes
    read so far (plus a small allowance)."""
    if produced > max_bytes:
        raise ArchiveTooLarge(
            f"the archive inflates past the limit of {max_bytes} bytes (a gzip bomb?)",
            "raise HUBD_MAX_EXTRACT_BYTES if this model really is that large",
        )
    if produced > max_ratio * consumed + RATIO_ALLOWANCE:
        raise ArchiveTooLarge(
            f"the archive inflates more than {max_ratio} times its compressed size "
            f"({produced} bytes from {consumed}): a gzip bomb",
            "a real model does not compress that well; the archive was not used",
        )
