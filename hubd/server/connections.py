"""Bounds on the API's connections, so one user (or a broken client) cannot hold the daemon for everyone.

- At most `max_connections` open at once, and `max_connections_per_user` per uid on the Unix socket (the kernel's
  SO_PEERCRED; root and the daemon's own user are held only to the global bound). TCP clients have no uid, so
  together they get a share of the global bound (`max_tcp`, half by default): one user on loopback TCP can never
  take the room socket users need. Beyond any of these, a connection gets a one-line 503 and is closed at once,
  so it costs a descriptor for microseconds.
- A request's line and headers must arrive within `header_timeout` of connecting (408, then closed); aiohttp's
  keep-alive timer (`idle_timeout`) closes idle connections, and with it one that sends a partial request later.
- Out of file descriptors (EMFILE/ENFILE) on accept: stop accepting, retry after a back-off (connections wait
  in the kernel's queue meanwhile), and log one warning per `LOG_EVERY` seconds with a count.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from hubd.server.guards import peer_creds

log = logging.getLogger("hubd.server")
LOG_EVERY = 30.0
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


_REFUSED_HINT = "close idle connections, or reuse one (HTTP keep-alive)"


def _is_tcp(sock: Any) -> bool:
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)


def _peer_uid(sock: Any) -> int | None:
    """The connecting process's uid on a Unix socket (SO_PEERCRED); None over TCP."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        return peer_creds(sock)[1]
    except OSError:
        return None


def _raw_error(status: int, reason: str, code: str, message: str, hint: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message, "hint": hint}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionLimits:
    """Counts open connections (in all, and per uid) and admits or refuses new ones."""

    def __init__(
        self, max_connections: int, max_per_user: int, header_timeout: float, max_tcp: int | None = None
    ) -> None:
        self.max_connections = max_connections
        self.max_per_user = max_per_user
        self.header_timeout = header_timeout
        self.max_tcp = max_tcp if max_tcp is not None else max(1, max_connections // 2)
        """TCP connections (no uid, so no per-user bound) together; the rest is kept for the Unix socket."""
        self.open = 0
        self.tcp_open = 0
        self.by_uid: collections.Counter[int] = collections.Counter()
        self.refused = 0
        self.timed_out = 0
        self._unlimited_uids = {0, os.geteuid()}
        self.resource_log = ResourceErrorLog()

    def admit(self, uid: int | None, tcp: bool = False) -> str | None:
        """None when the connection may stay; else why not."""
        if self.open >= self.max_connections:
            return f"the daemon has {self.open} connections open, its limit (HUBD_MAX_CONNECTIONS)"
        if tcp and self.tcp_open >= self.max_tcp:
            return (
                f"{self.tcp_open} TCP connections are open, the most TCP clients may hold together (the rest of "
                "HUBD_MAX_CONNECTIONS is kept for the Unix socket)"
            )
        if uid is not None and uid not in self._unlimited_uids and self.by_uid[uid] >= self.max_per_user:
            return f"uid {uid} has {self.by_uid[uid]} connections open, the limit per user"
        self.open += 1
        if tcp:
            self.tcp_open += 1
        if uid is not None:
            self.by_uid[uid] += 1
        return None

    def admit_socket(self, conn: socket.socket) -> bool:
        """Admit a just-accepted connection, or refuse it there and then: a short 503 and close, costing no
        transport and no task, so a flood of refused connections is cheap to drain."""
        uid, tcp = _peer_uid(conn), _is_tcp(conn)
        refusal = self.admit(uid, tcp)
        if refusal is None:
            self.release(uid, tcp)  # counted again, for good, by its protocol (`_Bounded.connection_made`)
            return True
        self.refused += 1
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(_raw_error(503, "Service Unavailable", "too_many_connections", refusal, _REFUSED_HINT))
        conn.close()
        return False

    def release(self, uid: int | None, tcp: bool = False) -> None:
        self.open -= 1
        if tcp:
            self.tcp_open -= 1
        if uid is not None:
            self.by_uid[uid] -= 1
            if self.by_uid[uid] <= 0:
                del self.by_uid[uid]

    def site(self, runner: web.AppRunner, sock: socket.socket) -> web.BaseSite:
        return _LimitedSite(runner, sock, self)


class _LimitedSite(web.BaseSite):
    """A listening socket served by aiohttp through `_Bounded` protocols, with its own accept loop.

    asyncio's own loop (create_server) cannot be used: on EMFILE it goes on calling accept() up to `backlog` times
    in the same tick, logging a traceback and scheduling a retry for each failure (1,024 per second here, 111 MB of
    log in 45 s), and those retries outlive the server. This one stops at the first failure, backs off (50 ms,
    doubling to 1 s) and reports through the rate-limited `ResourceErrorLog`.
    """

    def __init__(self, runner: web.AppRunner, sock: socket.socket, limits: ConnectionLimits) -> None:
        super().__init__(runner, backlog=socket.SOMAXCONN)
        self._sock = sock
        self._limits = limits
        self._name = f"unix:{sock.getsockname()}" if sock.family == socket.AF_UNIX else str(sock.getsockname())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._delay = 0.0
        self._starting: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()  # registers the site with its runner, which stops it on cleanup
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._sock.listen(self._backlog)
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._loop is not None
        server = self._runner.server
        assert server is not None
        limits = self._limits
        for _ in range(64):  # then let other work run; the socket stays readable if more are waiting
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                self._back_off(exc)
                return
            self._delay = 0.0
            if not limits.admit_socket(conn):
                continue
            conn.setblocking(False)
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(lambda: _Bounded(server, limits), conn)
            )
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not set up a connection: %s", task.exception())

    def _back_off(self, exc: OSError) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._delay = min(max(self._delay * 2, 0.05), 1.0)
        self._limits.resource_log.report(exc, self._delay)
        self._retry = self._loop.call_later(self._delay, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        await super().stop()


class _Bounded(asyncio.Protocol):
    """Admits a connection (or refuses it), enforces the header deadline, then hands everything to aiohttp."""

    def __init__(self, make_handler: Callable[[], RequestHandler], limits: ConnectionLimits) -> None:
        self._make_handler = make_handler
        self._limits = limits
        self._inner: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._uid: int | None = None
        self._tcp = False
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        self._uid = _peer_uid(sock) if sock is not None else None
        self._tcp = _is_tcp(sock)
        refusal = self._limits.admit(self._uid, self._tcp)
        if refusal is not None:  # only when others were admitted since `admit_socket` checked
            self._limits.refused += 1
            transport.write(_raw_error(503, "Service Unavailable", "too_many_connections", refusal, _REFUSED_HINT))
            transport.close()
            return
        self._admitted = True
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._limits.header_timeout, self._head_too_slow)
        self._inner = self._make_handler()
        self._inner.connection_made(transport)

    def _head_too_slow(self) -> None:
        self._deadline = None
        self._limits.timed_out += 1
        if self._transport is not None and not self._transport.is_closing():
            message = f"the request's line and headers did not arrive within {self._limits.header_timeout:g} s"
            self._transport.write(_raw_error(408, "Request Timeout", "request_timeout", message, ""))
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._deadline is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:  # the first request's head is complete
                self._deadline.cancel()
                self._deadline = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> None:
        if self._inner is not None:
            self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._admitted:
            self._admitted = False
            self._limits.release(self._uid, self._tcp)
        if self._inner is not None:
            self._inner.connection_lost(exc)


class ResourceErrorLog:
    """Running out of descriptors, as one warning per `every` seconds with a count; also the loop's exception
    handler, for such errors anywhere else (other contexts go to the default handler)."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self.suppressed = 0
        self.total = 0
        self._last = float("-inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            self.report(exc, 1.0)
        else:
            loop.default_exception_handler(context)

    def report(self, exc: OSError, retry_in: float) -> None:
        self.total += 1
        now = time.monotonic()
        if now - self._last < self.every:
            self.suppressed += 1
            return
        more = f"; {self.suppressed} more times since the last report" if self.suppressed else ""
        log.warning(
            "cannot accept connections: %s (%s); retrying in %g s, open connections are still served%s; "
            "raise LimitNOFILE or lower HUBD_MAX_CONNECTIONS",
            os.strerror(exc.errno or 0),
            errno.errorcode.get(exc.errno or 0, "?"),
            retry_in,
            more,
        )
        self._last = now
        self.suppressed = 0
