"""Standard-library HTTP to the daemon: a Unix socket (HUBD_SOCKET or the default), or TCP (HUBD_URL).

Every wait is bounded, so a daemon that accepts but never answers costs seconds, not an hour: connecting
(HUBD_CLIENT_CONNECT_TIMEOUT, 2 s), the first byte of an answer (HUBD_CLIENT_TIMEOUT, 10 s), and the silence
between two lines of a progress stream (HUBD_CLIENT_IDLE_TIMEOUT, 60 s; the daemon sends a blank line every few
seconds while a fetch is busy, so a long download never comes near it). A stream that sends nothing but those
blank lines for STALL_TIMEOUT (600 s) is a stuck daemon: `NotAnswering`, so `resolve` falls back to the cache.
Answers are bounded too: a stream line longer than MAX_LINE, or an answer that is not JSON, is a clear
`HubdClientError` ("bad_answer"), never a bare JSONDecodeError.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hubd_client.errors import HubdClientError
from hubd_client.paths import UntrustedSocket, client_sockets, connect_checked

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
    """Something answers, but someone other than the user, root or `hubd` could have put it there."""


class NotAnswering(Unreachable):
    """Something accepted the connection (or never let it finish) but sent no answer in time."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, connect_timeout: float, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path
        self.connect_timeout = connect_timeout

    def connect(self) -> None:
        self.sock = connect_checked(Path(self.unix_path), self.connect_timeout)
        self.sock.settimeout(self.timeout)


class _TCPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, connect_timeout: float, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.connect_timeout = connect_timeout

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        self.sock.settimeout(self.timeout)


def where() -> str:
    """Where requests go, for error messages."""
    return os.environ.get("HUBD_URL") or " or ".join(f"unix:{path}" for path in _sockets())


def _sockets() -> list[str]:
    """HUBD_SOCKET; else the user's daemon, then the system daemon (the first that answers is used)."""
    given = os.environ.get("HUBD_SOCKET")
    return [given] if given else [str(path) for path in client_sockets()]


def _connections(connect_timeout: float, first_byte: float) -> list[http.client.HTTPConnection]:
    url = os.environ.get("HUBD_URL")
    if url:
        parts = urlsplit(url)
        return [_TCPConnection(parts.hostname or "127.0.0.1", parts.port or 80, connect_timeout, first_byte)]
    return [_UnixConnection(path, connect_timeout, first_byte) for path in _sockets()]


def _last_event(response: http.client.HTTPResponse) -> Any:
    """Read an NDJSON stream to its end; its last event (blank lines are the daemon's keep-alives).

    Keep-alives alone for STALL_TIMEOUT seconds: `NotAnswering`. A line over MAX_LINE: `HubdClientError`.
    """
    last: Any = {}
    event_at = time.monotonic()
    while line := response.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE:
            raise _bad_answer(f"a line of its progress stream is longer than {MAX_LINE} bytes")
        if line.strip():
            last = _json(line)
            event_at = time.monotonic()
        elif time.monotonic() - event_at > STALL_TIMEOUT:
            raise NotAnswering(f"only keep-alives, no progress, for {STALL_TIMEOUT:g} s")
    return last


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError
        raise _bad_answer(f"its answer is not JSON: {data[:80]!r}") from None


def _bad_answer(what: str) -> HubdClientError:
    return HubdClientError(
        "bad_answer",
        f"the hubd daemon at {where()} answered nonsense: {what}",
        "is HUBD_URL / HUBD_SOCKET a hubd?",
    )


def request(method: str, path: str, body: Any = None, stream: bool = False) -> tuple[int, Any]:
    """One JSON request; raises `Unreachable` when no daemon listens, `NotAnswering` when it does not answer.

    With `stream`, a 200 answer is an NDJSON stream read to its end, and its last event is returned.
    """
    connect_timeout, first_byte, idle = timeouts()
    candidates = _connections(connect_timeout, first_byte)
    for connection in candidates[:-1]:
        try:  # a socket nobody listens on (no daemon of the user's): on to the system daemon's
            return _request(connection, connect_timeout, first_byte, idle, method, path, body, stream)
        except Unreachable as exc:
            if isinstance(exc, Untrusted):
                raise
    return _request(candidates[-1], connect_timeout, first_byte, idle, method, path, body, stream)


def _request(
    connection: http.client.HTTPConnection,
    connect_timeout: float,
    first_byte: float,
    idle: float,
    method: str,
    path: str,
    body: Any,
    stream: bool,
) -> tuple[int, Any]:
    payload = json.dumps(body).encode() if body is not None else None
    waiting_for = f"could not connect within {connect_timeout:g} s (HUBD_CLIENT_CONNECT_TIMEOUT)"
    try:
        connection.connect()
        waiting_for = f"no answer within {first_byte:g} s (HUBD_CLIENT_TIMEOUT)"
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if stream and response.status == 200:
            waiting_for = f"no progress for {idle:g} s (HUBD_CLIENT_IDLE_TIMEOUT)"
            if connection.sock is not None:
                connection.sock.settimeout(idle)
            return response.status, _last_event(response)
        data = response.read()
    except TimeoutError:
        raise NotAnswering(waiting_for) from None
    except BlockingIOError:  # connect() with a timeout on a Unix socket whose backlog is full
        raise NotAnswering("its socket takes no more connections (the listen backlog is full)") from None
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
        raise Untrusted(str(exc)) from None
    except http.client.IncompleteRead as exc:
        raise NotAnswering(f"the connection closed in the middle of an answer: {exc}") from None
    finally:
        connection.close()
    return response.status, _json(data) if data else {}
