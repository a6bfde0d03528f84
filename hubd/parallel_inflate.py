"""Parallel inflate of a spooled archive with rapidgzip, on a machine with cores to spare.

One thread of ISA-L inflates about 250 MB/s of compressed weights, so on a many-core machine a fast mirror's
download waits on it. rapidgzip splits one gzip stream across threads (0.2 s instead of 1.6 s for 370 MiB on
16 cores), but needs the whole file, and is a large C++ parser of hostile input whose memory a gzip bomb can
balloon. So the archive is spooled to the staging directory first, and rapidgzip runs in a child process
whose resident memory the parent watches (killed past its cap), writing the inflated tar into a pipe. An
address-space cap alone cannot do that job: rapidgzip reserves about 1.1 GiB of address space per thread that
it never touches (rapidgzip 0.16: 17 GiB virtual, 220 MiB resident on 16 threads), so a cap tight enough to
matter killed every run (SIGSEGV), and every parallel fetch silently fell back to streaming; RLIMIT_AS stays
only as a loose backstop. The parent keeps every check of the
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
import threading
from contextlib import suppress
from pathlib import Path

from hubd.inflate import check_budget

__all__ = ["MIN_PARALLEL_BYTES", "ParallelInflate", "ParallelInflateFailed", "available", "choose_threads"]

MIN_PARALLEL_BYTES = 32 << 20
"""Below this, spooling first and starting a child costs more than one ISA-L thread saves."""
AUTO_MIN_CORES = 4
"""With fewer usable cores, inflating on one thread while the others hash, write and receive is faster."""
AUTO_MAX_THREADS = 8
"""What inflates is consumed by one thread that hashes and writes each file (about 1.1 GB/s here: sha256 at
1.8 GB/s, then the write), and 8 rapidgzip threads already outrun it (about 1.3 GB/s of a 16-core machine's
2 GB/s on 16). More threads only add memory: the child held 133 MiB resident on 8 threads, 208 MiB on 16, for
a 360 MiB archive (2026-11-27)."""
_CHILD_RESIDENT = 512 << 20
_PER_THREAD_RESIDENT = 32 << 20
"""The child's resident-memory cap is _CHILD_RESIDENT + threads * this (measured peak: 31 MiB on 1 thread,
220 MiB on 16, for a 360 MiB archive): a bomb makes it fail, not balloon."""
_WATCH_INTERVAL = 0.02
"""Seconds between two looks at the child's resident size."""
_CHILD_ADDRESS_SPACE = 4 << 30
_PER_THREAD_ADDRESS_SPACE = 2 << 30
"""The backstop RLIMIT_AS: what rapidgzip reserves (about 1.1 GiB per thread) with room to spare."""
_PIPE_SIZE = 4 << 20
"""Asked of the kernel for the pipe (root may pass /proc/sys/fs/pipe-max-size; others get at most that)."""
_READ_SIZE = 4 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
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
    N spools then inflates on N threads, unset or "auto" uses every usable core, up to AUTO_MAX_THREADS, when
    there are at least AUTO_MIN_CORES. Only a download of announced size (so bounded by it) of at least
    MIN_PARALLEL_BYTES is spooled: without a size the streaming path is what stops an upstream that keeps
    sending."""
    if size is None or not available():
        return 0
    value = (setting or "auto").strip().lower()
    if value != "auto":
        return max(0, int(value))
    cores = usable_cores()
    return min(cores, AUTO_MAX_THREADS) if cores >= AUTO_MIN_CORES and size >= MIN_PARALLEL_BYTES else 0


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
        limit = _CHILD_ADDRESS_SPACE + threads * _PER_THREAD_ADDRESS_SPACE
        self._resident_cap = _CHILD_RESIDENT + threads * _PER_THREAD_RESIDENT
        self.killed_for_memory = False
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        # -P: `python -c` would put the working directory first on sys.path, and a daemon (or `hubd pull` with no
        # daemon) started in a directory another user can write would import their `rapidgzip.py`. The child
        # runs in / so no relative name can reach that directory either.
        self._child = subprocess.Popen(
            [sys.executable, "-P", "-c", _CHILD, os.path.abspath(path), str(threads), str(limit)],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert self._child.stdout is not None
        self._fd = self._child.stdout.fileno()
        for size in (_PIPE_SIZE, 1 << 20):
            with suppress(OSError):  # a lower pipe-max-size: smaller reads, same result
                fcntl.fcntl(self._fd, _F_SETPIPE_SZ, size)
                break
        self._stop_watch = threading.Event()
        self._watch = threading.Thread(target=self._watch_memory, name="hubd-inflate-watch", daemon=True)
        self._watch.start()

    def _watch_memory(self) -> None:
        """Kill the child once it holds more than its resident cap (a bomb); the read then sees an unclean end."""
        statm = f"/proc/{self._child.pid}/statm"
        while not self._stop_watch.wait(_WATCH_INTERVAL):
            try:
                with open(statm, "rb") as f:
                    resident = int(f.read().split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                return  # gone (or not Linux): nothing left to watch
            if resident > self._resident_cap:
                self.killed_for_memory = True
                with suppress(ProcessLookupError):
                    self._child.kill()
                return

    def read_chunk(self) -> bytes:
        """The next piece of inflated bytes (b"" at a clean end); raises `ParallelInflateFailed` at an unclean
        one, and the caps' errors (ArchiveTooLarge) as soon as they are passed."""
        if self._done:
            return b""
        chunk = os.read(self._fd, _READ_SIZE)
        if chunk:
            self._produced += len(chunk)
            check_budget(self._produced, self._size, self._max_bytes, self._max_ratio)
            return chunk
        self._done = True
        self._stop_watch.set()
        code = self._child.wait()
        if code != 0:
            why = f" past its memory cap of {self._resident_cap >> 20} MiB" if self.killed_for_memory else ""
            raise ParallelInflateFailed(f"rapidgzip ended with status {code}{why}")
        if self._produced & 0xFFFFFFFF != self._isize:
            raise ParallelInflateFailed("the inflated size does not match the gzip trailer (truncated?)")
        return b""

    def drain(self) -> None:
        """Read to the end (the tar ends before its gzip stream does), so the end is checked as well."""
        while self.read_chunk():
            pass

    def close(self) -> None:
        self._stop_watch.set()
        if self._child.poll() is None:
            self._child.kill()
        self._child.wait()
        self._watch.join()
        if self._child.stdout is not None:
            self._child.stdout.close()
