"""Starting a file's writeback while it is still being written, so its closing fsync has little left to do.

A model file is written at the speed of the inflater (hundreds of MB/s) and fsynced once, at its end. Left to
itself the kernel holds those pages dirty until the fsync, which then waits for all of them: 0.2 s for a 400 MB
file on the development machine's disk, after the download has already ended. `sync_file_range` with
SYNC_FILE_RANGE_WRITE queues the pages written so far for writeback and returns at once, so the disk works
while the download goes on. It promises nothing about durability (it does not flush the disk's cache or the
file's metadata); the fsync at the end still does that.

Linux only: elsewhere, or where libc lacks the call, `start_writeback` does nothing and the fsync does it all.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

__all__ = ["WRITEBACK_STEP", "start_writeback"]

WRITEBACK_STEP = 16 << 20
"""Bytes written between two writeback kicks: large enough that the calls cost nothing, small enough that the
last stretch left for the fsync is a few milliseconds of disk time."""

_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _load() -> Callable[[int, int, int], None] | None:
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return None
    import ctypes  # only where a file is written with fsync on: the CLI's other commands never pay for it

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range  # the C library this process already has
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int

    def kick(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only leaves the work to the fsync

    return kick


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Queue bytes [offset, offset + length) of `fd` for writeback, without waiting for them."""
    kick = _load()
    if kick is not None:
        kick(fd, offset, length)
