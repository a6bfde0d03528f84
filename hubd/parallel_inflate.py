"""Parallel inflate of a spooled archive with rapidgzip, on a machine with cores to spare.

One thread of ISA-L inflates about 250 MB/s of compressed weights, so on a many-core machine a fast mirror's
download waits on it. rapidgzip splits one gzip stream across threads (0.2 s instead of 1.6 s for 370 MiB on
16 cores), but needs the whole file, and is a large C++ parser of hostile input whose memory a gzip bomb can
balloon. So the archive is spooled to the staging directory first, and rapidgzip runs in a child process
capped in address space (RLIMIT_AS), writing the inflated tar into a pipe. The parent keeps every check of the
streaming path: the same size and ratio caps on what comes out of the pipe, the same safe tar extractor on it,
and the archive's sha256 taken by the download. rapidgzip accepts a truncated stream without a word, so the
inflated size must also match the gzip trailer's ISIZE. Anything the child does not finish cleanly (a crash at
its memory cap, trailing padding it refuses, a multi-member archive whose last ISIZE is not the whole size)
is no verdict: the caller inflates the spool again with the streaming GzipReader, which decides.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import struct
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

from hubd.inflate import check_budget

__all__ = ["MIN_PARALLEL_BYTES", "ParallelInflate", "ParallelInflateFailed", "available", "choose_threads"]

MIN_PARALLEL_BYTES = 32 << 20
"""Below this, spooling first and starting a child costs more than one ISA-L thread saves."""
AUTO_MIN_CORES = 4
"""With fewer usable cores, inflating on one thread while the others hash, write and receive is faster."""
_CHILD_MEMORY = 1 << 30
"""The child's address-space cap, on top of what its threads reserve: a bomb makes it fail, not balloon."""
_PER_THREAD_MEMORY = 96 << 20
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_CHILD = """
import os, resource, sys
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import rapidgzip
with rapidgzip.open(sys.argv[1], parallelization=int(sys.argv[2])) as archive:
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    while size := archive.readinto(buffer):
        out = view[:size]
        while out:
            out = out[os.write(1, out):]
"""


class ParallelInflateFailed(Exception):
    """The child gave no clean answer; the spool must be inflated again by the streaming path."""


def available() -> bool:
    """Whether rapidgzip is installed (looked up, not imported: the parent never loads it)."""
    return importlib.util.find_spec("rapidgzip") is not None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def choose_threads(setting: str | None, size: int | None) -> int:
    """Threads for the parallel path, or 0 to stream. `setting` (HUBD_INFLATE_THREADS): "0" streams always,
    N spools then inflates on N threads, unset or "auto" uses every usable core when there are at least
    AUTO_MIN_CORES. Only a download of announced size (so bounded by it) of at least MIN_PARALLEL_BYTES is
    spooled: without a size the streaming path is what stops an upstream that keeps sending."""
    if size is None or not available():
        return 0
    value = (setting or "auto").strip().lower()
    if value != "auto":
        return max(0, int(value))
    cores = usable_cores()
    return cores if cores >= AUTO_MIN_CORES and size >= MIN_PARALLEL_BYTES else 0


class ParallelInflate:
    """The inflated bytes of the gzip file `path`, from rapidgzip on `threads` threads in a capped child."""

    def __init__(self, path: Path, threads: int, max_bytes: int, max_ratio: int) -> None:
        self._size = path.stat().st_size
        with open(path, "rb") as spool:
            spool.seek(max(0, self._size - 4))
            tail = spool.read(4)
        self._isize = struct.unpack("<I", tail)[0] if len(tail) == 4 else -1
        self._max_bytes = max_bytes
        self._max_ratio = max_ratio
        self._produced = 0
        self._done = False
        limit = _CHILD_MEMORY + threads * _PER_THREAD_MEMORY
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        self._child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(threads), str(limit)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert self._child.stdout is not None
        self._fd = self._child.stdout.fileno()
        with suppress(OSError):  # a lower pipe-max-size: smaller reads, same result
            fcntl.fcntl(self._fd, _F_SETPIPE_SZ, _PIPE_SIZE)

    def read_chunk(self) -> bytes:
        """The next piece of inflated bytes (b"" at a clean end); raises `ParallelInflateFailed` at an unclean
        one, and the caps' errors (ArchiveTooLarge) as soon as they are passed."""
        if self._done:
            return b""
        chunk = os.read(self._fd, _PIPE_SIZE)
        if chunk:
            self._produced += len(chunk)
            check_budget(self._produced, self._size, self._max_bytes, self._max_ratio)
            return chunk
        self._done = True
        code = self._child.wait()
        if code != 0:
            raise ParallelInflateFailed(f"rapidgzip ended with status {code}")
        if self._produced & 0xFFFFFFFF != self._isize:
            raise ParallelInflateFailed("the inflated size does not match the gzip trailer (truncated?)")
        return b""

    def drain(self) -> None:
        """Read to the end (the tar ends before its gzip stream does), so the end is checked as well."""
        while self.read_chunk():
            pass

    def close(self) -> None:
        if self._child.poll() is None:
            self._child.kill()
        self._child.wait()
        if self._child.stdout is not None:
            self._child.stdout.close()
