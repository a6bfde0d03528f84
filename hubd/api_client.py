"""The CLI's way to the daemon: API v1 over the Unix socket (or HUBD_URL), through hubd_client's transport.

One HTTP client of the API: the client library's standard-library transport (`hubd_client.transport`) connects,
checks the socket's owner, bounds every wait (HUBD_CLIENT_* limits) and reads JSON, NDJSON streams and raw bodies;
this module adds what the CLI needs on top (the admin token over TCP, pages, typed answers, hubd's errors). It
imports neither aiohttp nor asyncio, so a command served by the daemon starts quickly. The transport sends the
token only to a port a trusted user serves (root, `hubd`, yourself, HUBD_SOCKET_OWNER): anyone may bind a
loopback port while the daemon is down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlencode

from hubd_client import transport
from hubd_client.errors import HubdClientError

from hubd.errors import AnswerBrokenOff, DaemonNotAnswering, HubdError, UntrustedDaemonSocket, error_class

if TYPE_CHECKING:
    from hubd.config import Settings


def client_timeouts() -> tuple[float, float, float]:
    """(connect, first byte, idle between stream lines) in seconds: hubd_client's HUBD_CLIENT_* settings."""
    return transport.timeouts()


def error_from(body: dict[str, Any]) -> HubdError:
    detail = body.get("error", body)
    cls = error_class(str(detail.get("code")))  # the explicit registry in hubd.errors
    error = cls(str(detail.get("message", "the daemon reported an error")), str(detail.get("hint", "")))
    error.code = str(detail.get("code", error.code))
    return error


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


def endpoint_of(settings: Settings) -> transport.Endpoint:
    return (
        transport.Endpoint(url=settings.url) if settings.url else transport.Endpoint(socket=str(settings.socket))
    )


def _untrusted(exc: transport.Untrusted) -> UntrustedDaemonSocket:
    return UntrustedDaemonSocket(
        str(exc),
        exc.hint
        or "remove that socket's directory (as root if need be), or set HUBD_SOCKET to a socket "
        "in a directory only you or root can write",
    )


class DaemonClient:
    """API v1 of one daemon (the one `settings` names), one request at a time; answers as plain JSON values."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.endpoint = endpoint_of(settings)
        self._headers: dict[str, str] | None = None

    @property
    def where(self) -> str:
        return str(self.endpoint)

    def _not_answering(self, exc: transport.NotAnswering) -> HubdError:
        if isinstance(exc, transport.BrokenOff):
            return AnswerBrokenOff(
                f"the hubd daemon at {self.where} broke off its answer ({exc})",
                "see the daemon's log, or restart it (`systemctl restart hubd`)",
            )
        waited = f"nothing for {exc.waited:g} s" if exc.waited is not None else f"no answer ({exc})"
        setting = exc.setting or "HUBD_CLIENT_TIMEOUT"
        return DaemonNotAnswering(
            f"the hubd daemon at {self.settings.url or self.settings.socket} accepted the connection but sent "
            f"{waited}",
            f"see the daemon's log, or restart it (`systemctl restart hubd`); {setting} sets how long to wait",
        )

    def is_running(self) -> bool:
        """True when the daemon answers; an impostor's socket (or, with a token, an impostor's port) is an
        error, never a silent fallback."""
        try:
            with transport.send(self.endpoint, "GET", "/v1/health", headers=self._token()) as answer:
                return answer.status == 200
        except transport.Untrusted as exc:
            raise _untrusted(exc) from None
        except transport.NotAnswering as exc:
            raise self._not_answering(exc) from None
        except (transport.Unreachable, OSError, HubdClientError):
            return False

    def _token(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = _token_header(self.settings)
        return self._headers

    def _send(self, method: str, path: str, body: Any = None, **options: Any) -> transport.Answer:
        try:
            answer = transport.send(self.endpoint, method, path, body, headers=self._token(), **options)
        except transport.Untrusted as exc:
            raise _untrusted(exc) from None
        except transport.NotAnswering as exc:
            raise self._not_answering(exc) from None
        except transport.Unreachable as exc:
            raise HubdError(
                f"the hubd daemon at {self.where} went away: {exc}", "see the daemon's log, then try again"
            ) from None
        if answer.status >= 400:
            with answer:
                raise error_from(self._read(answer.json))
        return answer

    def _read(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except transport.NotAnswering as exc:
            raise self._not_answering(exc) from None
        except HubdClientError as exc:
            raise error_from({"code": exc.code, "message": exc.message, "hint": exc.hint}) from None

    def json(self, method: str, path: str, body: Any = None, long: bool = False) -> Any:
        """One request; `long` ones (verify, gc: the daemon answers when the work is done) wait as long as it
        takes, once the daemon has shown it answers."""
        first_byte = transport.WAIT_FOR_EVER if long else None
        with self._send(method, path, body, first_byte=first_byte) as answer:
            return self._read(answer.json)

    def pages(self, path: str, page: int = 1000) -> Iterator[dict[str, Any]]:
        """The answers of a paginated GET, following `next_cursor` to the last page."""
        cursor: str | None = None
        while True:
            query = "?" + urlencode({"limit": page, **({"cursor": cursor} if cursor else {})})
            data = dict(self.json("GET", path + query))
            yield data
            cursor = data.get("next_cursor")
            if not cursor:
                return

    def stream(
        self, path: str, body: Any = None, *, raw: IO[bytes] | None = None, content_type: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """POST (`body` as JSON, or `raw` a file) and yield NDJSON events as they arrive (blank lines are the
        daemon's keep-alives); an "error" event is yielded like any other."""
        options: dict[str, Any] = {"first_byte": client_timeouts()[2]}  # as long as the silence between events
        if raw is not None:
            options["raw"] = raw
        if content_type:
            options["content_type"] = content_type
        with self._send("POST", path, body, **options) as answer:
            events = answer.events()
            while True:
                event = self._read(lambda: next(events, None))
                if event is None:
                    return
                yield event

    def download(
        self, path: str, out: IO[bytes], on_progress: Callable[[str, int, int | None], None] | None = None
    ) -> None:
        """GET `path` into `out`; `on_progress` hears the bytes so far. A body broken off is an error."""
        with self._send("GET", path, first_byte=client_timeouts()[2]) as answer:  # it may fetch first
            received = 0
            chunks = answer.chunks()
            while (chunk := self._read(lambda: next(chunks, None))) is not None:
                out.write(chunk)
                received += len(chunk)
                if on_progress is not None:
                    on_progress("receive", received, None)

    def upload(self, path: str, source: Path, content_type: str) -> Iterator[dict[str, Any]]:
        """POST the file at `source` as the body; yield the NDJSON events of the answer."""
        with open(source, "rb") as body:
            yield from self.stream(path, raw=body, content_type=content_type)
