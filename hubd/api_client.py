"""The CLI's way to the daemon: API v1 over the Unix socket (or HUBD_URL), with aiohttp."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp
from hubd.entry import Entry
from hubd.errors import HubdError
from hubd_client.paths import UntrustedSocket, connect_checked

from hubd.config import Settings


class UntrustedDaemonSocket(HubdError):
    code = "untrusted_socket"
    http_status = 403


def _error_classes(base: type[HubdError] = HubdError) -> list[type[HubdError]]:
    return [cls for sub in base.__subclasses__() for cls in (sub, *_error_classes(sub))]


_BY_CODE: dict[str, type[HubdError]] = {cls.code: cls for cls in _error_classes()}


def error_from(body: dict[str, Any]) -> HubdError:
    detail = body.get("error", body)
    cls = _BY_CODE.get(str(detail.get("code")), HubdError)
    error = cls(str(detail.get("message", "the daemon reported an error")), str(detail.get("hint", "")))
    error.code = str(detail.get("code", error.code))
    return error


def _probe_socket(settings: Settings) -> None:
    """Check the socket's directory, owner and listener before aiohttp (which cannot check them) connects."""
    connect_checked(settings.socket, timeout=5).close()


class DaemonClient:
    def __init__(self, settings: Settings, timeout: float | None = None) -> None:
        self.settings = settings
        if settings.url:
            connector: aiohttp.BaseConnector = aiohttp.TCPConnector()
            self.base = settings.url.rstrip("/")
        else:
            connector = aiohttp.UnixConnector(path=os.path.realpath(settings.socket))  # as checked
            self.base = "http://localhost"
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5)
        )

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.session.close()

    async def is_running(self) -> bool:
        """True when the daemon answers; an impostor's socket is an error, never a silent fallback."""
        if not self.settings.url:
            try:
                await asyncio.to_thread(_probe_socket, self.settings)
            except UntrustedSocket as exc:
                raise UntrustedDaemonSocket(
                    str(exc),
                    "remove that socket's directory (as root if need be), or set HUBD_SOCKET to a socket "
                    "in a directory only you or root can write",
                ) from None
            except OSError:
                return False
        try:
            async with self.session.get(f"{self.base}/v1/health") as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError):
            return False

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, f"{self.base}{path}", json=body) as response:
            data = await response.json(content_type=None)
            if response.status >= 400:
                raise error_from(data)
            return data

    async def resolve(self, handle: str, sha256: str | None = None) -> Entry:
        return Entry.model_validate(await self._json("POST", "/v1/resolve", {"handle": handle, "sha256": sha256}))

    async def entries(self) -> list[Entry]:
        data = await self._json("GET", "/v1/models")
        return [Entry.model_validate(e) for e in data["models"]]

    async def remove(self, model_id: str) -> Entry:
        return Entry.model_validate(await self._json("DELETE", f"/v1/models/{model_id}"))

    async def verify(self, handle: str | None, heal: bool) -> list[dict[str, Any]]:
        data = await self._json("POST", "/v1/verify", {"handle": handle, "heal": heal})
        return list(data["results"])

    async def gc(self, dry_run: bool) -> dict[str, Any]:
        return dict(await self._json("POST", "/v1/gc", {"dry_run": dry_run}))

    async def status(self) -> dict[str, Any]:
        return dict(await self._json("GET", "/v1/status"))

    async def stream(self, path: str, body: Any) -> AsyncIterator[dict[str, Any]]:
        """POST and yield NDJSON events as they arrive."""
        async with self.session.post(f"{self.base}{path}", json=body) as response:
            if response.status >= 400:
                raise error_from(await response.json(content_type=None))
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)
