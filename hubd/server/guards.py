"""Who may call what: browser defences on every request, admin checks on the dangerous ones.

- DNS rebinding: a request whose Host is not a loopback name or address is refused (400).
- Cross-site requests: any request carrying an Origin header is refused (403); no browser page has business here.
- Admin: over the Unix socket the peer's uid (SO_PEERCRED) must be root, the daemon's own user, or a member of the
  configured admin group, in the daemon's own user and PID namespaces (a container's root is not the host's);
  over TCP a bearer token read from a file only admins can read is required.
"""

from __future__ import annotations

import grp
import hmac
import ipaddress
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from hubd.errors import BadRequest, Forbidden, MisdirectedHost
from hubd.server.namespaces import same_namespaces

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback_host(host_header: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_unix(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def browser_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if "Origin" in request.headers:
        raise Forbidden(
            "cross-origin requests are refused", "hubd's API is for local programs; browsers may not call it"
        )
    if not is_unix(request) and not is_loopback_host(request.headers.get("Host", "")):
        raise MisdirectedHost(
            f"Host {request.headers.get('Host', '')!r} is not a loopback name",
            "connect to 127.0.0.1, [::1] or localhost (this blocks DNS rebinding)",
        )
    return await handler(request)


def peer_socket(request: web.Request) -> socket.socket | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock if sock is not None and sock.family == socket.AF_UNIX else None


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, as the kernel saw it; pid 0 when its PID namespace is
    not visible from the daemon's."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


class AdminPolicy:
    def __init__(
        self, admin_group: str | None, token_file: Path | None, trust_foreign_namespaces: bool = False
    ) -> None:
        try:
            self.admin_gid = grp.getgrnam(admin_group).gr_gid if admin_group else None
        except KeyError:
            raise BadRequest(
                f"there is no group named {admin_group!r} for admins",
                f"create it (`groupadd {admin_group}`, then `usermod -aG {admin_group} USER`), or fix "
                "--admin-group / HUBD_ADMIN_GROUP",
            ) from None
        self.token_file = token_file
        self.trust_foreign_namespaces = trust_foreign_namespaces

    def is_admin_uid(self, uid: int, gid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        if self.admin_gid is None:
            return False
        if gid == self.admin_gid:
            return True
        try:
            account = pwd.getpwuid(uid)
        except KeyError:
            return False
        # Membership as the account database has it now, so `usermod -aG hubd-admin` needs no new login.
        return self.admin_gid in os.getgrouplist(account.pw_name, account.pw_gid)

    def check(self, request: web.Request) -> None:
        sock = peer_socket(request)
        if sock is not None:
            pid, uid, gid = peer_creds(sock)
            if not self.is_admin_uid(uid, gid):
                raise Forbidden(
                    f"uid {uid} may not change the shared cache",
                    "ask an admin, or join the admin group configured as admin_group",
                )
            if self.trust_foreign_namespaces or same_namespaces(sock, pid):
                return
            raise Forbidden(
                f"uid {uid} connects from another user or PID namespace (a container?) and is not an admin here",
                "run admin commands on the host, or start the daemon with HUBD_TRUST_FOREIGN_NAMESPACES=1",
            )
        token = self._token()
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        # As bytes: compare_digest refuses non-ASCII str, and a header may hold anything (aiohttp decodes it
        # as UTF-8 with surrogateescape, so it encodes back to the bytes that were sent).
        if token and given and hmac.compare_digest(token.encode(), given.encode("utf-8", "surrogateescape")):
            return
        raise Forbidden(
            "admin operations over TCP need the admin token",
            "send 'Authorization: Bearer <token from token_file>', or use the Unix socket",
        )

    def _token(self) -> str:
        if self.token_file is None:
            return ""
        try:
            return self.token_file.read_text().strip()
        except OSError:
            return ""
