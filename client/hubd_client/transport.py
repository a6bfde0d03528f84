"""Standard-library HTTP to the daemon: a Unix socket (HUBD_SOCKET or the default), or TCP (HUBD_URL).

Every wait is bounded, so a daemon that accepts but never answers costs seconds, not an hour: connecting
(HUBD_CLIENT_CONNECT_TIMEOUT, 2 s), the first byte of an answer (HUBD_CLIENT_TIMEOUT, 10 s), and the silence
between two lines of a progress stream (HUBD_CLIENT_IDLE_TIMEOUT, 60 s; the daemon sends a blank line every few
seconds while a fetch is busy, so a long download never comes near it). A stream that sends nothing but those
blank lines for STALL_TIMEOUT (600 s) is a stuck daemon: `NotAnswering`, so `resolve` falls back to the cache.
Answers are bounded too: a stream line longer than MAX_LINE, or an answer that is not JSON, is a clear
`HubdClientError` ("bad_answer"), never a bare JSONDecodeError.

`request` is what `hubd_client.resolve` uses (the daemon found from the environment). `Endpoint` and `send` are
the same connections, limits and error translation for one named daemon, answered as JSON, an NDJSON stream or
raw chunks: hubd's own CLI talks to the daemon through them, so there is one HTTP client of the API.

Credentials (an Authorization header) go over TCP only to a server run by a trusted user (`tcp_owner`): any
local user may bind a loopback port while the daemon is down. Requests without them go anywhere, as before.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlsplit

from hubd_client.errors import HubdClientError
from hubd_client.paths import UntrustedSocket, client_sockets, client_trusted_uids, connect_checked
from hubd_client.tcp_owner import check_server

#: Defaults of the client's time limits, in seconds (each read from the environment at every request).
CONNECT_TIMEOUT = 2.0
FIRST_BYTE_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
#: How long a progress stream may send only keep-alive lines (no event) before the daemon counts as stuck.
STALL_TIMEOUT = 600.0
#: The longest line of a progress stream the client reads (an event is a few KiB).
MAX_LINE = 1 << 20


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


def timeouts() -> tuple[float, float, float]:
    """(connect, first byte, idle between stream lines), from HUBD_CLIENT_* or the defaults."""
    return (
        _seconds("HUBD_CLIENT_CONNECT_TIMEOUT", CONNECT_TIMEOUT),
        _seconds("HUBD_CLIENT_TIMEOUT", FIRST_BYTE_TIMEOUT),
        _seconds("HUBD_CLIENT_IDLE_TIMEOUT", IDLE_TIMEOUT),
    )


class Unreachable(Exception):
    """Nothing answered where the daemon should be."""


class Untrusted(Unreachable):
    """Something answers, but someone other than the user, root or `hubd` could have put it there; `hint` says
    what to do (empty: the caller's own advice fits)."""

    def __init__(self, why: str, hint: str = "") -> None:
        super().__init__(why)
        self.hint = hint


class NotAnswering(Unreachable):
    """Something accepted the connection (or never let it finish) but sent no answer in time.

    `waited` and `setting`: the limit that ran out and the variable that sets it (None and "" when the limit is
    not one of the HUBD_CLIENT_* settings)."""

    def __init__(self, why: str, waited: float | None = None, setting: str = "") -> None:
        super().__init__(why)
        self.waited = waited
        self.setting = setting


class BrokenOff(NotAnswering):
    """The daemon closed the connection in the middle of an answer."""


_BLOCK = 1 << 20
"""Bytes per send of a file body (http.client's default, 8 KiB, costs a system call per 8 KiB of a bundle)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, connect_timeout: float, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout, blocksize=_BLOCK)
        self.unix_path = path
        self.connect_timeout = connect_timeout

    def connect(self) -> None:
        self.sock = connect_checked(Path(self.unix_path), self.connect_timeout)
        self.sock.settimeout(self.timeout)


class _TCPConnection(http.client.HTTPConnection):
    def __init__(
        self, host: str, port: int, connect_timeout: float, timeout: float | None, check_owner: bool
    ) -> None:
        super().__init__(host, port, timeout=timeout, blocksize=_BLOCK)
        self.connect_timeout = connect_timeout
        self.check_owner = check_owner

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        try:
            if self.check_owner:  # this very connection's far end: no other listener can slip in after the check
                check_server(sock, self.port, client_trusted_uids())
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Endpoint:
    """Where one daemon listens: a Unix socket (checked before every connect), or a base URL over TCP."""

    socket: str | None = None
    url: str | None = None

    def __str__(self) -> str:
        return self.url or f"unix:{self.socket}"

    def connection(
        self, connect_timeout: float, timeout: float | None, check_owner: bool = False
    ) -> http.client.HTTPConnection:
        """A connection not opened yet; over TCP with `check_owner`, it refuses a server no trusted user runs (a
        Unix socket's server is always checked)."""
        if self.url:
            parts = urlsplit(self.url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            return _TCPConnection(host, port, connect_timeout, timeout, check_owner)
        return _UnixConnection(str(self.socket), connect_timeout, timeout)


def endpoints() -> list[Endpoint]:
    """HUBD_URL; else HUBD_SOCKET; else the user's daemon, then the system daemon (the first that answers)."""
    url = os.environ.get("HUBD_URL")
    return [Endpoint(url=url)] if url else [Endpoint(socket=path) for path in _sockets()]


def where() -> str:
    """Where requests go, for error messages."""
    return " or ".join(str(endpoint) for endpoint in endpoints())


def _sockets() -> list[str]:
    """HUBD_SOCKET; else the user's daemon, then the system daemon (the first that answers is used)."""
    given = os.environ.get("HUBD_SOCKET")
    return [given] if given else [str(path) for path in client_sockets()]


class _Wait:
    """What an exchange waits for now, to say which limit ran out."""

    def __init__(self, why: str, seconds: float | None, setting: str) -> None:
        self.set(why, seconds, setting)

    def set(self, why: str, seconds: float | None, setting: str) -> None:
        self.why, self.seconds, self.setting = why, seconds, setting


@contextlib.contextmanager
def _translated(wait: _Wait) -> Iterator[None]:
    """The socket's and http.client's errors as `Unreachable`, `Untrusted`, `NotAnswering` or `BrokenOff`."""
    try:
        yield
    except TimeoutError:
        raise NotAnswering(wait.why, wait.seconds, wait.setting) from None
    except BlockingIOError:  # connect() with a timeout on a Unix socket whose backlog is full
        raise NotAnswering("its socket takes no more connections (the listen backlog is full)") from None
    except http.client.IncompleteRead as exc:
        raise BrokenOff(f"the connection closed in the middle of an answer: {exc}") from None
    except (
        FileNotFoundError,
        NotADirectoryError,
        ConnectionRefusedError,
        ConnectionResetError,
        socket.gaierror,
    ) as exc:
        raise Unreachable(str(exc)) from None
    except PermissionError as exc:
        raise Unreachable(f"no permission to use the socket: {exc}") from None
    except UntrustedSocket as exc:
        raise Untrusted(str(exc), exc.hint) from None


class Answer:
    """The daemon's answer to one request, read once as JSON, as NDJSON events or as raw chunks; closing it closes
    the connection."""

    def __init__(
        self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, where: str, wait: _Wait
    ) -> None:
        self.connection, self.response, self.where, self.wait = connection, response, where, wait
        self.idle = timeouts()[2]
        self.status = response.status

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        # An answer that ends the connection (a stream, Connection: close) owns the socket; closing the
        # connection alone leaves it open (a ResourceWarning, and a descriptor held until garbage collection).
        self.response.close()
        self.connection.close()

    def json(self) -> Any:
        """The whole body as JSON ({} when empty), within the limit its head came in."""
        with _translated(self.wait):
            data = self.response.read()
        return _json(data, self.where) if data else {}

    def events(self, stall: float | None = None) -> Iterator[Any]:
        """An NDJSON stream's events as they arrive (blank lines are the daemon's keep-alives).

        Silence for HUBD_CLIENT_IDLE_TIMEOUT, or (with `stall`) keep-alives alone for `stall` seconds:
        `NotAnswering`. A line over MAX_LINE, or one that is not JSON: `HubdClientError` ("bad_answer")."""
        wait = self._wait_idle()
        event_at = time.monotonic()
        with _translated(wait):
            while line := self.response.readline(MAX_LINE + 1):
                if len(line) > MAX_LINE:
                    raise _bad_answer(f"a line of its progress stream is longer than {MAX_LINE} bytes", self.where)
                if line.strip():
                    event_at = time.monotonic()
                    yield _json(line, self.where)
                elif stall is not None and time.monotonic() - event_at > stall:
                    raise NotAnswering(f"only keep-alives, no progress, for {stall:g} s")

    def chunks(self, size: int = _BLOCK) -> Iterator[bytes]:
        """The raw body, `size` bytes at a time; the daemon breaking it off is `BrokenOff`, never a short end."""
        with _translated(self._wait_idle()):
            try:
                while chunk := self.response.read(size):
                    yield chunk
            except ConnectionResetError as exc:
                raise BrokenOff(f"the connection was reset in the middle of an answer: {exc}") from None

    def _wait_idle(self) -> _Wait:
        if self.connection.sock is not None:
            self.connection.sock.settimeout(self.idle)
        return _Wait(
            f"no progress for {self.idle:g} s (HUBD_CLIENT_IDLE_TIMEOUT)", self.idle, "HUBD_CLIENT_IDLE_TIMEOUT"
        )


#: `send(..., first_byte=WAIT_FOR_EVER)`: wait for the answer as long as it takes, once connected (verify, gc).
WAIT_FOR_EVER = -1.0


def send(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | IO[bytes] | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    first_byte: float | None = None,
) -> Answer:
    """Send one request (`body` as JSON, or `raw` bytes or a file) and return the answer once its head arrived.

    Connecting waits HUBD_CLIENT_CONNECT_TIMEOUT; sending a file and waiting for the answer, HUBD_CLIENT_TIMEOUT
    (or `first_byte`; WAIT_FOR_EVER: no limit). Raises `Unreachable` when nothing listens, `Untrusted` for a
    socket someone else could have put there (or, when `headers` carry credentials, a TCP server no trusted user
    runs), `NotAnswering` when a limit runs out."""
    connect_timeout, default_first_byte, idle = timeouts()
    limit = default_first_byte if first_byte is None else first_byte
    read_limit = None if limit == WAIT_FOR_EVER else limit
    connection = endpoint.connection(connect_timeout, read_limit, check_owner=_credentials(headers))
    payload = json.dumps(body).encode() if raw is None and body is not None else raw
    wait = _Wait(
        f"could not connect within {connect_timeout:g} s (HUBD_CLIENT_CONNECT_TIMEOUT)",
        connect_timeout,
        "HUBD_CLIENT_CONNECT_TIMEOUT",
    )
    try:
        with _translated(wait):
            connection.connect()
            wait.set(f"no answer within {limit:g} s (HUBD_CLIENT_TIMEOUT)", limit, "HUBD_CLIENT_TIMEOUT")
            if raw is not None and not isinstance(raw, bytes) and connection.sock is not None:
                connection.sock.settimeout(idle)  # the daemon reads a body while it works through it
                wait.set(f"the daemon took nothing for {idle:g} s", idle, "HUBD_CLIENT_IDLE_TIMEOUT")
            connection.request(method, path, body=payload, headers=_headers(content_type, raw, headers))
            if connection.sock is not None:
                connection.sock.settimeout(read_limit)
            wait.set(f"no answer within {limit:g} s (HUBD_CLIENT_TIMEOUT)", limit, "HUBD_CLIENT_TIMEOUT")
            response = connection.getresponse()
    except BaseException:
        connection.close()
        raise
    return Answer(connection, response, str(endpoint), wait)


def _credentials(headers: dict[str, str] | None) -> bool:
    return any(name.lower() == "authorization" for name in headers or {})


def _headers(content_type: str, raw: bytes | IO[bytes] | None, extra: dict[str, str] | None) -> dict[str, str]:
    headers = {"Content-Type": content_type, **(extra or {})}
    if raw is not None and not isinstance(raw, bytes):
        with contextlib.suppress(OSError, AttributeError, ValueError):  # a pipe: sent chunked instead
            headers["Content-Length"] = str(os.fstat(raw.fileno()).st_size - raw.tell())
    return headers


def _json(data: bytes, where_: str | None = None) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError
        raise _bad_answer(f"its answer is not JSON: {data[:80]!r}", where_) from None


def _bad_answer(what: str, where_: str | None = None) -> HubdClientError:
    return HubdClientError(
        "bad_answer",
        f"the hubd daemon at {where_ or where()} answered nonsense: {what}",
        "is HUBD_URL / HUBD_SOCKET a hubd?",
    )


def request(method: str, path: str, body: Any = None, stream: bool = False) -> tuple[int, Any]:
    """One JSON request; raises `Unreachable` when no daemon listens, `NotAnswering` when it does not answer.

    With `stream`, a 200 answer is an NDJSON stream read to its end, and its last event is returned; keep-alives
    alone for STALL_TIMEOUT seconds are a stuck daemon (`NotAnswering`).
    """
    candidates = endpoints()
    for endpoint in candidates[:-1]:
        try:  # a socket nobody listens on (no daemon of the user's): on to the system daemon's
            return _request(endpoint, method, path, body, stream)
        except Unreachable as exc:
            if isinstance(exc, Untrusted):
                raise
    return _request(candidates[-1], method, path, body, stream)


def _request(endpoint: Endpoint, method: str, path: str, body: Any, stream: bool) -> tuple[int, Any]:
    with send(endpoint, method, path, body) as answer:
        if stream and answer.status == 200:
            last: Any = {}
            for event in answer.events(stall=STALL_TIMEOUT):
                last = event
            return answer.status, last
        return answer.status, answer.json()
