"""Is a Unix-socket peer in the daemon's own user and PID namespaces?

SO_PEERCRED translates the peer's uid into the daemon's user namespace, so a container without a user namespace
of its own (Docker's default) connects through a mounted socket as uid 0: root to the kernel's eyes, but a
container's root, not the host's. Admin rights over the shared cache are only for peers that live where the daemon
lives. The exact test compares /proc/PID/ns/{user,pid} with the daemon's own; reading those needs ptrace rights
over the peer, which a daemon running as `hubd` lacks for other users' processes, so then it falls back to what
/proc shows everyone: the depth of the peer's PID namespace (NSpid) and its uid/gid maps. Mount namespaces are not
compared: systemd services (the daemon's own, with PrivateTmp) each have their own.
"""

from __future__ import annotations

import errno
import os
import select
import socket

NAMESPACES = ("user", "pid")
#: Linux 6.5+: a pidfd of the peer, so a pid recycled since connect() cannot stand in for it.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


def same_namespaces(sock: socket.socket, pid: int) -> bool:
    """True only when the peer `pid` (from SO_PEERCRED; 0 when it is in a PID namespace we cannot see) shares
    the daemon's user and PID namespaces and that could be read."""
    if pid <= 0:
        return False
    try:
        pidfd: int | None = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            return False  # the peer is gone
        pidfd = None  # an older kernel: the pid is all there is
    try:
        same = all(_same_namespace(pid, ns) for ns in NAMESPACES)
        return same and (pidfd is None or _alive(pidfd))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _alive(pidfd: int) -> bool:
    """A pidfd becomes readable when its process exits; until then `pid` still names that process."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return not readable


def _same_namespace(pid: int, ns: str) -> bool:
    try:
        theirs = os.stat(f"/proc/{pid}/ns/{ns}")
        ours = os.stat(f"/proc/self/ns/{ns}")
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
    except PermissionError:
        pass  # not ours to ptrace: compare what every user may read
    except OSError:
        return False
    try:
        if ns == "pid":
            return _pid_depth(str(pid)) == _pid_depth("self")
        return all(_read(f"/proc/{pid}/{m}") == _read(f"/proc/self/{m}") for m in ("uid_map", "gid_map"))
    except (OSError, ValueError):
        return False


def _pid_depth(pid: str) -> int:
    """How many PID namespaces deep the process is, counted from /proc's (its pid in each, on the NSpid line)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("NSpid:"):
                return len(line.split()) - 1
    raise ValueError("no NSpid line")


def _read(path: str) -> str:
    with open(path) as file:
        return " ".join(file.read().split())
