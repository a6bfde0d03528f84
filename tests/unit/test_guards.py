"""hubd.server.guards: browsers refused by Origin and Host, admin rights by peer credentials or a bearer token.

The guards run in a real aiohttp server on 127.0.0.1 and on a Unix socket (no daemon, no engine), and are
spoken to with raw HTTP, so any header a hostile client could send can be sent."""

from __future__ import annotations

import asyncio
import grp
import pwd
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from hubd.errors import BadRequest
from hubd.server.app import errors_as_json
from hubd.server.guards import AdminPolicy, browser_guard, is_loopback_host

TOKEN = "s3cret-token"


@dataclass
class Guarded:
    """An app with hubd's error and browser-guard middlewares, one open route and one admin route."""

    port: int
    unix: Path

    def status(self, request: bytes, over: str = "tcp") -> int:
        """Send one raw request; the status code of the answer."""
        family = socket.AF_INET if over == "tcp" else socket.AF_UNIX
        address: tuple[str, int] | str = ("127.0.0.1", self.port) if over == "tcp" else str(self.unix)
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(address)
            conn.sendall(request)
            reply = b""
            while b"\r\n" not in reply and (data := conn.recv(4096)):
                reply += data
        return int(reply.split(b" ", 2)[1])


def get(path: str, host: bytes = b"127.0.0.1", *headers: bytes) -> bytes:
    return b"\r\n".join([b"GET " + path.encode() + b" HTTP/1.1", b"Host: " + host, *headers, b"", b""])


@contextmanager
def serving(tmp_path: Path, policy: AdminPolicy) -> Iterator[Guarded]:
    """The guarded app, served from its own event loop thread for the duration."""

    async def open_route(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def admin_route(request: web.Request) -> web.Response:
        policy.check(request)
        return web.Response(text="admin ok")

    app = web.Application(middlewares=[errors_as_json, browser_guard])
    app.router.add_get("/open", open_route)
    app.router.add_get("/admin", admin_route)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    unix = web.UnixSite(runner, str(tmp_path / "api.sock"))
    loop.run_until_complete(tcp.start())
    loop.run_until_complete(unix.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield Guarded(port, tmp_path / "api.sock")
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Guarded]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with serving(tmp_path, AdminPolicy(None, token_file)) as server:
        yield server


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.1:8080", "127.1.2.3", "[::1]", "[::1]:8080", "localhost", "LOCALHOST:1", "a.localhost"],
)
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    ["", "evil.example", "evil.example:80", "localhost.evil.example", "10.0.0.1", "[::2]", "0.0.0.0", "[::1"],
)
def test_other_hosts_are_not_loopback(host: str) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 with its own name in Host: that name must not pass."""
    assert not is_loopback_host(host)


def test_a_loopback_request_passes(guarded: Guarded) -> None:
    assert guarded.status(get("/open")) == 200


def test_a_rebound_host_is_refused_over_tcp(guarded: Guarded) -> None:
    assert guarded.status(get("/open", b"evil.example")) == 400


def test_over_the_unix_socket_the_host_does_not_matter(guarded: Guarded) -> None:
    assert guarded.status(get("/open", b"whatever"), over="unix") == 200


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_any_request_with_an_origin_is_refused(guarded: Guarded, over: str) -> None:
    assert guarded.status(get("/open", b"127.0.0.1", b"Origin: null"), over=over) == 403


def test_admin_over_tcp_needs_the_token(guarded: Guarded) -> None:
    assert guarded.status(get("/admin")) == 403
    assert guarded.status(get("/admin", b"127.0.0.1", b"Authorization: Bearer wrong")) == 403
    assert guarded.status(get("/admin", b"127.0.0.1", b"Authorization: Bearer " + TOKEN.encode())) == 200


def test_a_non_ascii_token_is_refused_not_a_crash(guarded: Guarded) -> None:
    assert guarded.status(get("/admin", b"127.0.0.1", "Authorization: Bearer \u00e9t\u00e9".encode())) == 403
    assert guarded.status(get("/admin", b"127.0.0.1", b"Authorization: Bearer \xff\xfe")) == 403


def test_the_daemons_own_user_on_the_unix_socket_is_admin_by_its_credentials(guarded: Guarded) -> None:
    """The uid comes from the kernel (SO_PEERCRED), not from anything in the request; no token needed."""
    assert guarded.status(get("/admin"), over="unix") == 200


def test_without_a_token_file_an_empty_bearer_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path, AdminPolicy(None, tmp_path / "missing")) as server:
        assert server.status(get("/admin", b"127.0.0.1", b"Authorization: Bearer ")) == 403
        assert server.status(get("/admin", b"127.0.0.1", b"Authorization: Bearer  ")) == 403


def test_an_unknown_admin_group_is_a_configuration_error() -> None:
    with pytest.raises(BadRequest, match="there is no group named"):
        AdminPolicy("no-such-group-hubd-test", None)


def test_admins_are_root_the_daemons_user_and_the_admin_groups_members() -> None:
    nobody = pwd.getpwnam("nobody")
    root_group = grp.getgrgid(0).gr_name
    without_group = AdminPolicy(None, None)
    assert without_group.is_admin_uid(0, 0)
    assert not without_group.is_admin_uid(nobody.pw_uid, nobody.pw_gid)
    with_group = AdminPolicy(root_group, None)
    assert with_group.is_admin_uid(nobody.pw_uid, 0)  # its primary group, as the kernel reports it
    assert not with_group.is_admin_uid(nobody.pw_uid, nobody.pw_gid)  # not a member of root's group
    assert not with_group.is_admin_uid(4_000_000, 4_000_000)  # no account at all
