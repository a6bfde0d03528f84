"""Standard-library HTTP to the daemon: a Unix socket (HUBD_SOCKET or the default), or TCP (HUBD_URL)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hubd_client.paths import UntrustedSocket, connect_checked, default_socket

TIMEOUT = float(os.environ.get("HUBD_CLIENT_TIMEOUT", "3600"))


class Unreachable(Exception):
    """Nothing answered where the daemon should be."""


class Untrusted(Unreachable):
    """Something answers, but someone other than the user, root or `hubd` could have put it there."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = connect_checked(Path(self.unix_path), self.timeout)


def where() -> str:
    """Where requests go, for error messages."""
    return os.environ.get("HUBD_URL") or f"unix:{os.environ.get('HUBD_SOCKET') or default_socket()}"


def _connection() -> http.client.HTTPConnection:
    url = os.environ.get("HUBD_URL")
    if url:
        parts = urlsplit(url)
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=TIMEOUT)
    return _UnixConnection(str(os.environ.get("HUBD_SOCKET") or default_socket()), TIMEOUT)


def request(method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One JSON request; raises `Unreachable` when no daemon listens."""
    connection = _connection()
    payload = json.dumps(body).encode() if body is not None else None
    try:
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
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
    finally:
        connection.close()
    return response.status, json.loads(data) if data else {}
