"""Default locations, and whether a socket's location can be trusted; shared by the daemon and the client library
(standard library only).

A Unix socket is only as trustworthy as the directory it lives in: whoever can write that directory (or any
directory above it that is not sticky) can put their own server in its place. So the daemon refuses to bind in,
and clients refuse to connect through, a directory that anyone but themselves or the system daemon could change.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import stat
import struct
from pathlib import Path

SYSTEM_SOCKET = Path("/run/hubd/hubd.sock")
#: The system service's own account (systemd/hubd.sysusers.conf); clients trust sockets it (or root) owns.
SYSTEM_USER = "hubd"


class UntrustedSocket(Exception):
    """A socket, or a directory on its path, that someone else could control; `hint` says what to do (empty:
    the caller's own advice fits)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hubd"


def is_system_daemon() -> bool:
    """Root's daemon (or the systemd service, HUBD_SYSTEM=1) serves every user; any other serves its user only."""
    return os.geteuid() == 0 or os.environ.get("HUBD_SYSTEM") == "1"


def default_socket() -> Path:
    """`/run/hubd/hubd.sock` for the system service, `$XDG_RUNTIME_DIR/hubd/hubd.sock` for a user's daemon."""
    if is_system_daemon():
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return (Path(runtime) / "hubd" if runtime else Path(f"/tmp/hubd-{os.getuid()}")) / "hubd.sock"


def client_sockets() -> list[Path]:
    """Where a client with no HUBD_SOCKET looks, in order: the user's own daemon, then the system daemon."""
    own = default_socket()
    return [own] if own == SYSTEM_SOCKET else [own, SYSTEM_SOCKET]


def system_uids() -> set[int]:
    """root, and the system daemon's account where it exists."""
    uids = {0}
    with contextlib.suppress(KeyError):
        uids.add(pwd.getpwnam(SYSTEM_USER).pw_uid)
    return uids


def client_trusted_uids() -> set[int]:
    """Whom a client believes: itself, root, `hubd`, and HUBD_SOCKET_OWNER (a user name or uid, e.g. the host's
    `hubd` uid inside a container whose /etc/passwd does not know it)."""
    uids = {os.geteuid(), *system_uids()}
    extra = os.environ.get("HUBD_SOCKET_OWNER", "").strip()
    if extra.isdigit():
        uids.add(int(extra))
    elif extra:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(extra).pw_uid)
    return uids


def describe_uid(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def socket_dir_problem(directory: Path, trusted: set[int], owner: int | None = None) -> str | None:
    """Why someone outside `trusted` could replace what is in `directory`, or None when nobody can.

    The directory itself must be owned by `owner` (any of `trusted` when None) and writable by nobody else; every
    directory above it must be owned by a trusted uid and be writable by nobody else or sticky (like /tmp).
    Raises FileNotFoundError when the directory does not exist.
    """
    return _chain_problem(Path(os.path.realpath(directory)), trusted, owner, strict_first=True)


def _chain_problem(real: Path, trusted: set[int], owner: int | None, strict_first: bool) -> str | None:
    """socket_dir_problem's walk from `real` up to /; with `strict_first` False, `real` is judged like a parent
    (sticky and writable by others is fine), as the nearest existing directory above one not made yet."""
    for index, current in enumerate([real, *real.parents]):
        info = os.stat(current)
        first = index == 0 and strict_first
        allowed = {owner} if (first and owner is not None) else trusted
        if info.st_uid not in allowed:
            return f"{current} belongs to {describe_uid(info.st_uid)}"
        others_write = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if others_write and (first or not info.st_mode & stat.S_ISVTX):
            return f"{current} is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _link_problem(path: Path, trusted: set[int]) -> str | None:
    """A symbolic link on the way to `path` that someone else owns could be re-pointed after any check."""
    absolute = Path(os.path.abspath(path))
    for current in [absolute, *absolute.parents]:
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in trusted:
            return f"{current} is a link that belongs to {describe_uid(info.st_uid)}"
    return None


def cache_dir_problem(root: Path, trusted: set[int]) -> str | None:
    """Why someone outside `trusted` could change what the cache at `root` holds, or None when nobody can.

    The same rule as for a socket's directory: the cache root and every directory in it (objects/, refs/,
    index/ ...) must belong to a trusted uid and be writable by nobody else; every directory above the root must
    belong to a trusted uid and be writable by nobody else or sticky (like /tmp). A root that does not exist yet
    is judged by the nearest existing directory above it, as the directory it will be created in.
    """
    problem = _link_problem(root, trusted)
    if problem is not None:
        return problem
    real = Path(os.path.realpath(root))
    existing = real
    while not os.path.lexists(existing):
        existing = existing.parent
    if existing != real:
        return _chain_problem(existing, trusted, None, strict_first=False)
    problem = _chain_problem(real, trusted, None, strict_first=True)
    if problem is not None:
        return problem
    with os.scandir(real) as entries:
        children = [Path(entry.path) for entry in entries]
    for child in sorted(children):
        info = os.lstat(child)
        if info.st_uid not in trusted:
            return f"{child} belongs to {describe_uid(info.st_uid)}"
        if stat.S_ISDIR(info.st_mode) and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{child} is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def checked_socket_path(path: Path, trusted: set[int]) -> str:
    """The real path of a socket a client may connect to, or UntrustedSocket saying why not.

    FileNotFoundError when there is no socket (no daemon runs). The real path is returned so that a link on the
    way cannot be re-pointed between this check and the connect.
    """
    real = Path(os.path.realpath(path))
    problem = socket_dir_problem(real.parent, trusted)
    if problem is None:
        info = os.lstat(real)
        if not stat.S_ISSOCK(info.st_mode):
            problem = f"{real} is not a socket"
        elif info.st_uid not in trusted:
            problem = f"{real} belongs to {describe_uid(info.st_uid)}"
    if problem is not None:
        raise UntrustedSocket(
            f"refusing the hubd socket {path}: {problem}, so another user could impersonate the daemon"
        )
    return str(real)


def check_peer(sock: socket.socket, trusted: set[int]) -> None:
    """The process listening on a connected Unix socket must run as a trusted uid (the kernel says who)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in trusted:
        raise UntrustedSocket(
            f"refusing the hubd socket {sock.getpeername()}: it is served by {describe_uid(uid)}, "
            "who could impersonate the daemon"
        )


def connect_checked(path: Path, timeout: float | None = None) -> socket.socket:
    """Connect to the daemon's socket after checking where it lives and who serves it."""
    trusted = client_trusted_uids()
    real = checked_socket_path(path, trusted)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(real)
        check_peer(sock, trusted)
    except BaseException:
        sock.close()
        raise
    return sock
