"""Default locations, shared by the daemon and the client library (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hubd"


def default_socket() -> Path:
    """`/run/hubd/hubd.sock` for the system service, `$XDG_RUNTIME_DIR/hubd/hubd.sock` for a user's daemon."""
    if os.geteuid() == 0 or os.environ.get("HUBD_SYSTEM") == "1":
        return Path("/run/hubd/hubd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return (Path(runtime) / "hubd" if runtime else Path(f"/tmp/hubd-{os.getuid()}")) / "hubd.sock"
