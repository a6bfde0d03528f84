"""Streaming HTTP download with redirects checked hop by hop, retries with backoff, and Range resume.

It knows nothing of tar: bytes go to a `ChunkSink` as they arrive, the sha256 of the archive is computed on
the way, and progress is reported through a callback.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urljoin

import aiohttp

from hubd.config import Settings
from hubd.errors import DisallowedHost, NotFoundUpstream, UpstreamError
from hubd.handles import check_redirect

_READ_CHUNK = 1 << 20
_MAX_REDIRECTS = 10
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}

ProgressCallback = Callable[[str, int, int | None], None]


class ChunkSink(Protocol):
    async def feed(self, chunk: bytes) -> None: ...

    async def restart(self) -> None: ...


@dataclass
class FetchResult:
    sha256: str
    size: int
    final_url: str
    redirects: list[str] = field(default_factory=list)
    """Every URL the download went through, the first one included."""
    resumes: int = 0
    restarts: int = 0
    hubd_claim: tuple[str, str] | None = None
    """(archive sha256, tree digest) a hubd LAN mirror states for the tree it re-packed."""
    hubd_claim_signature: str = ""
    """The mirror's HMAC of `hubd_claim` under the shared mirror key, when it has one."""


class _Retryable(Exception):
    """A failure worth another try; carries the reason for the final error message."""


def make_session(settings: Settings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        auto_decompress=False,
        headers={"User-Agent": "hubd"},
        trust_env=True,
    )


class Download:
    """One archive download, resumable across dropped connections."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        sink: ChunkSink,
        settings: Settings,
        http_hosts: frozenset[str],
        on_progress: ProgressCallback | None = None,
        on_size: Callable[[int], Awaitable[None]] | None = None,
        on_bytes: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.session = session
        self.on_size = on_size
        """Awaited with the archive's size as soon as the server states it, before the body is read: the
        engine refuses there, before any byte or eviction, a download that cannot fit."""
        self.on_bytes = on_bytes
        """Awaited with the bytes received so far (this chunk included) before a chunk is used: the engine
        makes room for bytes that really arrived, never for a size a server merely announced."""
        self.url = url
        self.sink = sink
        self.settings = settings
        self.http_hosts = http_hosts
        self.on_progress = on_progress or (lambda phase, done, total: None)
        self._hash = hashlib.sha256()
        self._received = 0
        self._total: int | None = None
        self._validator: str | None = None
        self._resume_url: str | None = None
        self._result = FetchResult("", 0, url)

    async def run(self) -> FetchResult:
        attempt = 0
        while True:
            try:
                await self._attempt()
                break
            except _Retryable as exc:
                attempt += 1
                if attempt > self.settings.retries:
                    raise UpstreamError(
                        f"download of {self.url} failed after {attempt} attempts: {exc}",
                        "check the network or the upstream server and try again; cached models still work",
                    ) from None
                delay = self.settings.backoff_base * (2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random()))  # jitter spreads a herd of retries
        self._result.sha256 = self._hash.hexdigest()
        self._result.size = self._received
        return self._result

    async def _attempt(self) -> None:
        resuming = self._received > 0 and self._resume_url is not None
        headers: dict[str, str] = {}
        if resuming:
            headers["Range"] = f"bytes={self._received}-"
            if self._validator:
                headers["If-Range"] = self._validator
        url = self._resume_url if resuming and self._resume_url else self.url
        try:
            async with await self._open(url, headers) as response:
                if resuming and response.status == 206 and self._range_matches(response):
                    self._result.resumes += 1
                elif response.status == 200:
                    if self._received:
                        await self._start_over()
                    self._remember(response)
                    if self._total is not None and self.on_size is not None:
                        await self.on_size(self._total)
                else:
                    if resuming:  # the resume URL went stale or the server dislikes our Range: go again
                        await self._start_over()
                        raise _Retryable(f"resume refused with HTTP {response.status}")
                    self._raise_for_status(response)
                await self._copy_body(response)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None

    async def _open(self, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """GET `url`, following redirects one hop at a time so each target is checked before it is contacted."""
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self.session.get(url, headers=headers, allow_redirects=False)
            if self._result.redirects[-1:] != [url]:
                self._result.redirects.append(url)
            if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                target = urljoin(url, response.headers["Location"])
                response.release()
                check_redirect(target, self.url, self.settings.allowed_hosts, self.http_hosts)
                url = target
                continue
            self._result.final_url = url
            return response
        raise DisallowedHost(f"too many redirects from {self.url}", "the upstream server is misconfigured")

    def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if status in (404, 410):
            raise NotFoundUpstream(
                f"no such model upstream: {self.url} (HTTP {status})",
                "check the handle's spelling and version number",
            )
        if status in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {status}")
        if status in (401, 403):
            raise UpstreamError(
                f"upstream refused access to {self.url} (HTTP {status})",
                "the model may be private or gated; download it where you have access and use a mirror",
            )
        raise UpstreamError(f"unexpected HTTP {status} from {self.url}", "the upstream server may be down")

    def _remember(self, response: aiohttp.ClientResponse) -> None:
        length = response.headers.get("Content-Length")
        self._total = int(length) if length and length.isdigit() else None
        ranges = response.headers.get("Accept-Ranges", "").lower() == "bytes"
        self._validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        self._resume_url = self._result.final_url if ranges else None
        archive, tree = response.headers.get("X-Hubd-Archive-Sha256"), response.headers.get("X-Hubd-Tree-Digest")
        self._result.hubd_claim = (archive, tree) if archive and tree else None
        self._result.hubd_claim_signature = response.headers.get("X-Hubd-Claim-Signature", "")

    def _range_matches(self, response: aiohttp.ClientResponse) -> bool:
        content_range = response.headers.get("Content-Range", "")
        return content_range.startswith(f"bytes {self._received}-")

    async def _start_over(self) -> None:
        self._hash = hashlib.sha256()
        self._received = 0
        self._result.restarts += 1
        await self.sink.restart()

    async def _copy_body(self, response: aiohttp.ClientResponse) -> None:
        last_report = 0.0
        self.on_progress("download", self._received, self._total)
        async for chunk in response.content.iter_chunked(_READ_CHUNK):
            if self.on_bytes is not None:
                await self.on_bytes(self._received + len(chunk))
            self._hash.update(chunk)
            self._received += len(chunk)
            await self.sink.feed(chunk)
            now = time.monotonic()
            if now - last_report > 0.1:
                last_report = now
                self.on_progress("download", self._received, self._total)
        if self._total is not None and self._received < self._total:
            raise _Retryable(f"connection closed after {self._received} of {self._total} bytes")
        self.on_progress("download", self._received, self._total)
