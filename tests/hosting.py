"""A real TF Hub hosting-protocol server on 127.0.0.1 for tests and benchmarks.

`GET /<path>?tf-hub-format=compressed` returns the archive registered for <path>. Each path can be made to
misbehave the way real upstreams do: drop the connection after N bytes, ignore Range, throttle, redirect,
answer an HTML page with status 200. It counts requests and bytes sent per path, and lets a test wait (on a
condition, not a sleep) until a path has sent a given number of bytes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class Behaviour:
    drop_after: int | None = None
    """Abort the connection after this many bytes of a response..."""
    drops: int = 1
    """...for this many responses; later responses are whole."""
    ranges: bool = True
    throttle_chunk: int = 0
    throttle_delay: float = 0.0
    redirect_to: str | None = None
    html_200: bool = False
    status: int | None = None
    trailing_junk: int = 0
    """Send this many zero bytes after the archive, chunked (no Content-Length), as a broken proxy might."""
    pause_after: int | None = None
    """Stop after this many bytes of the first response until the test calls `release(path)`."""


class HostingServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.archives: dict[str, bytes] = {}
        self._etags: dict[int, tuple[bytes, str]] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self.bytes_sent: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.range_requests: collections.Counter[str] = collections.Counter()
        self.range_starts: collections.defaultdict[str, list[int]] = collections.defaultdict(list)
        """The first byte each Range request asked for, in order."""
        self.disconnects: collections.Counter[str] = collections.Counter()
        """Responses the client closed before their end (the server noticed on its next write)."""
        self._released: dict[str, asyncio.Event] = {}
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add(self, path: str, archive: bytes, behaviour: Behaviour | None = None) -> str:
        path = path.strip("/")
        self.archives[path] = archive
        self.behaviours[path] = behaviour or Behaviour()
        self._etag(archive)
        return f"{self.url}/{path}"

    def _etag(self, data: bytes) -> str:
        """A strong validator computed once per archive (at `add`), as a real server derives it without rereading
        the file: hashing 360 MiB on each request held every download's first byte back by a fifth of a second.
        Keyed by the archive object itself, so a test that swaps the bytes behind a path gets a new one."""
        cached = self._etags.get(id(data))
        if cached is None or cached[0] is not data:
            cached = (data, '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
            self._etags[id(data)] = cached
        return cached[1]

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.archives[path.strip("/")]).hexdigest()

    def reset_counts(self) -> None:
        with self._cond:
            self.bytes_sent.clear()
            self.requests.clear()
            self.range_requests.clear()
            self.disconnects.clear()

    def wait_requests(self, path: str, at_least: int, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.requests[path.strip("/")] >= at_least, timeout)

    def wait_sent(self, path: str, at_least: int, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.bytes_sent[path.strip("/")] >= at_least, timeout)

    def wait_any_sent(self, paths: list[str], at_least: int, timeout: float = 30.0) -> str | None:
        """The first of `paths` to have sent `at_least` bytes (None after `timeout`)."""

        def first() -> str | None:
            return next((p for p in paths if self.bytes_sent[p.strip("/")] >= at_least), None)

        with self._cond:
            return self._cond.wait_for(first, timeout)

    def wait_disconnects(self, path: str, at_least: int = 1, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.disconnects[path.strip("/")] >= at_least, timeout)

    def release(self, path: str) -> None:
        """Let a response paused by `Behaviour.pause_after` go on."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._released.setdefault(path.strip("/"), asyncio.Event()).set)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> HostingServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="hosting-server", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server) and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None:
            return
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(30)
        self._loop.close()

    # -- protocol ------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"].strip("/")
        with self._cond:
            self.requests[path] += 1
            self._cond.notify_all()
        behaviour = self.behaviours.get(path)
        if behaviour is None:
            return web.Response(status=404, text="no such model")
        if behaviour.redirect_to:  # like tfhub.dev -> Kaggle, the query travels with the redirect
            query = f"?{request.query_string}" if request.query_string else ""
            raise web.HTTPFound(behaviour.redirect_to + query)
        if behaviour.status:
            return web.Response(status=behaviour.status, text="upstream trouble")
        if request.query.get("tf-hub-format") != "compressed":
            return web.Response(status=200, text="<html>model page</html>", content_type="text/html")
        if behaviour.html_200:
            return web.Response(status=200, text="<!DOCTYPE html><html>Sign in</html>", content_type="text/html")
        return await self._send_archive(request, path, behaviour)

    async def _send_archive(self, request: web.Request, path: str, behaviour: Behaviour) -> web.StreamResponse:
        data = self.archives[path]
        start = 0
        response = web.StreamResponse(status=200)
        etag = self._etag(data)
        range_header = request.headers.get("Range")
        if behaviour.ranges:
            response.headers["Accept-Ranges"] = "bytes"
            if (
                range_header
                and range_header.startswith("bytes=")
                and request.headers.get("If-Range") in (None, etag)
            ):
                start = int(range_header[6:].split("-", 1)[0])
                response.set_status(206)
                response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                with self._cond:
                    self.range_requests[path] += 1
                    self.range_starts[path].append(start)
        response.headers["ETag"] = etag
        response.content_type = "application/x-tar"
        if behaviour.trailing_junk:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(data) - start
        await response.prepare(request)
        limit: int | None = None
        if behaviour.drop_after is not None and behaviour.drops > 0:
            behaviour.drops -= 1
            limit = behaviour.drop_after
        try:
            await self._stream(request, response, path, memoryview(data)[start:], behaviour, limit)
        except (ConnectionError, asyncio.CancelledError):
            if limit is None:
                with self._cond:
                    self.disconnects[path] += 1
                    self._cond.notify_all()
            raise
        return response

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        path: str,
        body: bytes | memoryview,
        behaviour: Behaviour,
        limit: int | None,
    ) -> None:
        chunk = behaviour.throttle_chunk or 256 * 1024
        sent = 0
        pause_at = behaviour.pause_after
        behaviour.pause_after = None  # the first response only
        while sent < len(body):
            if pause_at is not None and sent + chunk > pause_at:
                if sent < pause_at:
                    await response.write(body[sent:pause_at])
                    self._count(path, pause_at - sent)
                    sent = pause_at
                await self._released.setdefault(path, asyncio.Event()).wait()
                pause_at = None
            piece = body[sent : sent + chunk]
            if limit is not None and sent + len(piece) > limit:
                piece = piece[: max(0, limit - sent)]
                if piece:
                    await response.write(piece)
                    self._count(path, len(piece))
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError()
            await response.write(piece)
            sent += len(piece)
            self._count(path, len(piece))
            if behaviour.throttle_delay:
                await asyncio.sleep(behaviour.throttle_delay)  # the server's pace, not test synchronisation
        junk, zeros = behaviour.trailing_junk, bytes(chunk)
        while junk > 0:
            piece = zeros[:junk]
            await response.write(piece)
            self._count(path, len(piece))
            junk -= len(piece)
        await response.write_eof()

    def _count(self, path: str, size: int) -> None:
        with self._cond:
            self.bytes_sent[path] += size
            self._cond.notify_all()

    def __enter__(self) -> HostingServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
