"""Who serves the far end of a TCP connection this process opened, from /proc/net/tcp and /proc/net/tcp6 (Linux).

A Unix socket has SO_PEERCRED; TCP has nothing like it, and any local user may bind a loopback port while the
daemon is down. But the kernel lists every TCP socket of this network namespace with the uid that created it
(an accepted connection inherits its listener's). The daemon's end of our connection is the entry whose local
address is our remote one and whose remote is our local one: matching that end, rather than the listener on the
port, leaves no window between the check and the request for another listener to take the port.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from typing import NamedTuple

from hubd_client.paths import UntrustedSocket, describe_uid

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")

#: States in which the listed uid is the listener's owner: ESTABLISHED, and SYN_RECV (a connection the server
#: has not finished yet is listed with its listener's uid). A closed, orphaned socket (FIN_WAIT2 as a time-wait
#: entry, TIME_WAIT) is listed with uid 0 and must not pass for root; nothing reads what is sent to it anyway.
LIVE_STATES = frozenset({0x01, 0x03})

#: An IPv4 address as the IPv6 tables show it (::ffff:a.b.c.d), so both tables compare alike.
_MAPPED = b"\0" * 10 + b"\xff\xff"

Address = tuple[bytes, int]
"""(16-byte IPv6 form, port); IPv4 as IPv4-mapped."""


class TcpEntry(NamedTuple):
    """One line of /proc/net/tcp or /proc/net/tcp6 (a NamedTuple: a dataclass would double this import's cost)."""

    local: Address
    remote: Address
    state: int
    uid: int


def parse_address(text: str) -> Address:
    """'0100007F:1F90' (IPv4) or 32 hex digits and a port (IPv6) → (16-byte address, port).

    The kernel prints each 32-bit word of the address as a number in the host's byte order (little-endian on
    x86 and arm64), so each word is packed back the same way to get the address's bytes."""
    host, _, port = text.partition(":")
    if len(host) not in (8, 32) or not port:
        raise ValueError(f"not an address of /proc/net/tcp: {text!r}")
    raw = b"".join(struct.pack("=I", int(host[i : i + 8], 16)) for i in range(0, len(host), 8))
    return (_MAPPED + raw if len(raw) == 4 else raw), int(port, 16)


def parse_line(line: str) -> TcpEntry | None:
    """One table line as a `TcpEntry`; None for the header line or anything else that is not an entry."""
    fields = line.split()
    if len(fields) < 8 or not fields[0].endswith(":"):
        return None
    try:
        return TcpEntry(parse_address(fields[1]), parse_address(fields[2]), int(fields[3], 16), int(fields[7]))
    except ValueError:
        return None


def sockaddr(address: tuple[object, ...]) -> Address:
    """A socket's getsockname()/getpeername() in the tables' form."""
    host, port = str(address[0]).partition("%")[0], int(str(address[1]))
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host), port
    return _MAPPED + socket.inet_pton(socket.AF_INET, host), port


def far_end_uid(lines: Iterable[str], local: Address, remote: Address) -> int | None:
    """The uid of the live socket whose local end is `remote` and whose remote end is `local`, or None."""
    ports = f":{remote[1]:04X} ", f":{local[1]:04X} "  # a cheap look at each line before parsing it
    for line in lines:
        if ports[0] not in line or ports[1] not in line:
            continue
        entry = parse_line(line)
        if entry is not None and entry.local == remote and entry.remote == local and entry.state in LIVE_STATES:
            return entry.uid
    return None


def server_uid(sock: socket.socket, tables: Iterable[str] = TABLES) -> int | None:
    """Who created the socket serving the other end of the connected `sock`; None when this network namespace
    does not list it (no /proc, a daemon in another namespace, or a remote host)."""
    try:
        local, remote = sockaddr(sock.getsockname()), sockaddr(sock.getpeername())
    except OSError:  # the far end already went away
        return None
    for table in tables:
        try:
            with open(table, encoding="ascii") as listing:
                uid = far_end_uid(listing, local, remote)
        except OSError:
            continue
        if uid is not None:
            return uid
    return None


def check_server(sock: socket.socket, port: int, trusted: set[int], tables: Iterable[str] = TABLES) -> None:
    """The process serving the connected TCP `sock` (to `port`) must run as a trusted uid, or `UntrustedSocket`."""
    uid = server_uid(sock, tables)
    if uid is None:
        raise UntrustedSocket(
            f"refusing to send the admin token to port {port}: who listens there cannot be told "
            "(it is not in this network namespace's /proc/net/tcp), so it could be another user's server",
            "run the command where the daemon's port is local, or use the daemon's Unix socket (HUBD_SOCKET)",
        )
    if uid not in trusted:
        raise UntrustedSocket(
            f"refusing to send the admin token to port {port}: it is served by {describe_uid(uid)}, "
            "who could impersonate the daemon",
            f"stop that process (`ss -ltnp 'sport = :{port}'` names it) and start hubd on that port, or set "
            "HUBD_SOCKET_OWNER to that user if it runs your daemon",
        )
