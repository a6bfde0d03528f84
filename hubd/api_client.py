"""The CLI's way to the daemon: API v1 over the Unix socket (or HUBD_URL), with aiohttp."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlencode

import aiohttp
from hubd_client.paths import UntrustedSocket, connect_checked

from hubd.config import Settings
from hubd.entry import Entry
from hubd.errors import HubdError


class UntrustedDaemonSocket(HubdError):
    code = "untrusted_socket"
    http_status = 403


class DaemonNotAnswering(HubdError):
    """Something accepted the connection but sent no answer in time: a hung or overloaded daemon."""

    code = "daemon_not_answering"
    http_status = 504


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


def client_timeouts() -> tuple[float, float, float]:
    """(connect, first byte, idle between stream lines) in seconds: the same HUBD_CLIENT_* settings and defaults
    as hubd_client's, so no command waits on a daemon that does not answer."""
    return (
        _seconds("HUBD_CLIENT_CONNECT_TIMEOUT", 2.0),
        _seconds("HUBD_CLIENT_TIMEOUT", 10.0),
        _seconds("HUBD_CLIENT_IDLE_TIMEOUT", 60.0),
    )


def _error_classes(base: type[HubdError] = HubdError) -> list[type[HubdError]]:
    return [cls for sub in base.__subclasses__() for cls in (sub, *_error_classes(sub))]


_BY_CODE: dict[str, type[HubdError]] = {cls.code: cls for cls in _error_classes()}


def error_from(body: dict[str, Any]) -> HubdError:
    detail = body.get("error", body)
    cls = _BY_CODE.get(str(detail.get("code")), HubdError)
    error = cls(str(detail.get("message", "the daemon reported an error")), str(detail.get("hint", "")))
    error.code = str(detail.get("code", error.code))
    return error


def _probe_socket(settings: Settings, timeout: float) -> None:
    """Check the socket's directory, owner and listener before aiohttp (which cannot check them) connects."""
    connect_checked(settings.socket, timeout=timeout).close()


def _token_header(settings: Settings) -> dict[str, str]:
    """Over TCP, the admin token from --token-file / HUBD_TOKEN_FILE (the socket needs none: the kernel says who
    connects). Never sent over the socket, so a token meant for one daemon does not travel to another."""
    if not settings.url or settings.token_file is None:
        return {}
    try:
        token = settings.token_file.read_text().strip()
    except OSError as exc:
        raise HubdError(
            f"cannot read the admin token file {settings.token_file}: {exc.strerror}",
            "check --token-file / HUBD_TOKEN_FILE and that you may read it",
        ) from None
    return {"Authorization": f"Bearer {token}"} if token else {}


class DaemonClient:
    def __init__(self, settings: Settings, timeout: float | None = None) -> None:
        self.settings = settings
        self.connect_timeout, self.first_byte, self.idle = client_timeouts()
        if settings.url:
            connector: aiohttp.BaseConnector = aiohttp.TCPConnector()
            self.base = settings.url.rstrip("/")
        else:
            connector = aiohttp.UnixConnector(path=os.path.realpath(settings.socket))  # as checked
            self.base = "http://localhost"
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout(self.first_byte, total=timeout),
            headers=_token_header(settings),
        )

    def _timeout(self, read: float | None, total: float | None = None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=total, connect=self.connect_timeout, sock_connect=self.connect_timeout, sock_read=read
        )

    def _not_answering(self, waited: float, setting: str) -> DaemonNotAnswering:
        return DaemonNotAnswering(
            f"the hubd daemon at {self.settings.url or self.settings.socket} accepted the connection but sent "
            f"nothing for {waited:g} s",
            f"see the daemon's log, or restart it (`systemctl restart hubd`); {setting} sets how long to wait",
        )

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.session.close()

    async def is_running(self) -> bool:
        """True when the daemon answers; an impostor's socket is an error, never a silent fallback."""
        if not self.settings.url:
            try:
                await asyncio.to_thread(_probe_socket, self.settings, self.connect_timeout)
            except TimeoutError:
                raise self._not_answering(self.connect_timeout, "HUBD_CLIENT_CONNECT_TIMEOUT") from None
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
        except TimeoutError:  # aiohttp's timeouts are TimeoutErrors too: check before ClientError
            raise self._not_answering(self.first_byte, "HUBD_CLIENT_TIMEOUT") from None
        except (aiohttp.ClientError, OSError):
            return False

    async def _json(self, method: str, path: str, body: Any = None, long: bool = False) -> Any:
        """One request; `long` ones (verify, gc: the daemon answers when the work is done) wait as long as it
        takes, once the daemon has shown it answers."""
        timeout = self._timeout(None if long else self.first_byte)
        try:
            async with self.session.request(method, f"{self.base}{path}", json=body, timeout=timeout) as response:
                data = await response.json(content_type=None)
                if response.status >= 400:
                    raise error_from(data)
                return data
        except TimeoutError:
            raise self._not_answering(self.first_byte, "HUBD_CLIENT_TIMEOUT") from None

    async def resolve(self, handle: str, sha256: str | None = None) -> Entry:
        return Entry.model_validate(await self._json("POST", "/v1/resolve", {"handle": handle, "sha256": sha256}))

    async def entries(self, page: int = 1000) -> list[Entry]:
        """Every model, a page of `page` at a time (a daemon before pagination answers all at once)."""
        found: list[Entry] = []
        async for data in self._pages("/v1/models", page):
            found += (Entry.model_validate(e) for e in data["models"])
        return found

    async def _pages(self, path: str, page: int) -> AsyncIterator[dict[str, Any]]:
        """The answers of a paginated GET, following `next_cursor` to the last page."""
        cursor: str | None = None
        while True:
            query = "?" + urlencode({"limit": page, **({"cursor": cursor} if cursor else {})})
            data = dict(await self._json("GET", path + query))
            yield data
            cursor = data.get("next_cursor")
            if not cursor:
                return

    async def remove(self, model_id: str, force: bool = False) -> Entry:
        query = "?force=1" if force else ""
        return Entry.model_validate(await self._json("DELETE", f"/v1/models/{model_id}{query}"))

    async def unpin(self, model_id: str) -> list[str]:
        """What pinned it (empty when nothing did)."""
        return list((await self._json("DELETE", f"/v1/models/{model_id}/pin"))["unpinned"])

    async def audit(self, query: dict[str, str]) -> list[dict[str, Any]]:
        path = "/v1/audit" + (f"?{urlencode(query)}" if query else "")
        return list((await self._json("GET", path))["records"])

    async def verify(self, handle: str | None, heal: bool) -> list[dict[str, Any]]:
        data = await self._json("POST", "/v1/verify", {"handle": handle, "heal": heal}, long=True)
        return list(data["results"])

    async def gc(self, dry_run: bool, max_size: int | None = None) -> dict[str, Any]:
        body = {"dry_run": dry_run, "max_size": max_size}
        return dict(await self._json("POST", "/v1/gc", body, long=True))

    async def status(self, page: int = 1000) -> dict[str, Any]:
        """The cache's status with every user's usage (fetched a page of `page` users at a time)."""
        status: dict[str, Any] = {}
        async for data in self._pages("/v1/status", page):
            users = [*status.get("users", []), *data.get("users", [])]
            status = {**data, "users": users}
        status.pop("next_cursor", None)
        return status

    async def export_bundle(
        self,
        handles: list[str],
        pins: list[str],
        out: IO[bytes],
        on_progress: Callable[[str, int, int | None], None] | None = None,
    ) -> None:
        """GET /v1/export: write the bundle the daemon streams into `out`; `on_progress` hears the bytes so far."""
        query = urlencode([("handle", handle) for handle in handles] + [("sha256", pin) for pin in pins])
        try:
            async with self.session.get(
                f"{self.base}/v1/export?{query}", timeout=self._timeout(self.idle)
            ) as response:
                if response.status >= 400:
                    raise error_from(await response.json(content_type=None))
                received = 0
                async for chunk in response.content.iter_chunked(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    if on_progress is not None:
                        on_progress("receive", received, None)
        except TimeoutError:
            raise self._not_answering(self.idle, "HUBD_CLIENT_IDLE_TIMEOUT") from None
        except aiohttp.ClientPayloadError:
            raise HubdError(
                "the daemon broke off the export (a cached model failed its re-hash?); no bundle was written",
                "see the daemon's log, run `hubd verify`, then export again",
            ) from None

    async def import_bundle(self, path: Path) -> AsyncIterator[dict[str, Any]]:
        """POST /v1/import with the bundle's bytes as the body; yield the NDJSON events (one per entry)."""
        with open(path, "rb") as body:
            async for event in self.stream("/v1/import", raw=body, content_type="application/x-tar"):
                yield event

    async def stream(
        self, path: str, body: Any = None, *, raw: Any = None, content_type: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """POST (`body` as JSON, or `raw` bytes or a file) and yield NDJSON events as they arrive (blank lines are
        the daemon's keep-alives)."""
        headers = {"Content-Type": content_type} if content_type else None
        try:
            async with self.session.post(
                f"{self.base}{path}",
                json=body if raw is None else None,
                data=raw,
                headers=headers,
                timeout=self._timeout(self.idle),
            ) as response:
                if response.status >= 400:
                    raise error_from(await response.json(content_type=None))
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except TimeoutError:
            raise self._not_answering(self.idle, "HUBD_CLIENT_IDLE_TIMEOUT") from None
