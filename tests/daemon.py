"""Run real `hubd serve` processes for tests and talk HTTP to them over a Unix socket or loopback TCP.

Readiness is the daemon's own sd_notify READY=1 on a datagram socket the test owns: no sleeps, no polling.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubd.config import Settings


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str | bytes] | None = None,
    raw: bytes | None = None,
) -> Reply:
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=payload, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    status: str
    log_path: Path
    tcp: list[str] = field(default_factory=list)
    mirrors: list[str] = field(default_factory=list)

    def unix(self) -> UnixHTTPConnection:
        return UnixHTTPConnection(str(self.socket_path))

    def http(self) -> http.client.HTTPConnection:
        host, port = self.tcp[0].removeprefix("http://").rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=60)

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
        return call(self.unix(), method, path, body, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def start_daemon(
    settings: Settings,
    workdir: Path,
    *extra: str,
    env_extra: dict[str, str] | None = None,
    popen_extra: dict[str, Any] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Daemon:
    """Start `hubd serve` and return once it has sent READY=1 (or raise with its log if it died)."""
    socket_path = workdir / "hubd.sock"
    notify_dir = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
    notify_path = notify_dir / "n.sock"
    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_sock.bind(str(notify_path))
    notify_sock.settimeout(90)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBD_", "LISTEN_", "NOTIFY_"))}
    env.update(
        HUBD_CACHE_DIR=str(settings.cache_dir),
        HUBD_MIRROR=settings.mirror or "",
        HUBD_HTTP_HOSTS=",".join(settings.http_hosts),
        HUBD_BACKOFF_BASE=str(settings.backoff_base),
        HUBD_RETRIES=str(settings.retries),
        HUBD_SOCKET=str(socket_path),
        NOTIFY_SOCKET=str(notify_path),
        PYTHONUNBUFFERED="1",
    )
    env.update(env_extra or {})
    log_path = workdir / f"daemon-{len(list(workdir.glob('daemon-*.log')))}.log"
    cmd = [sys.executable, "-m", "hubd", "serve", *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            wrap(cmd) if wrap else cmd, env=env, stdout=log, stderr=subprocess.STDOUT, **(popen_extra or {})
        )
    try:
        messages = ""
        while "READY=1" not in messages:
            try:
                messages += notify_sock.recv(4096).decode()
            except TimeoutError:
                proc.kill()
                raise RuntimeError(f"hubd did not become ready:\n{log_path.read_text()}") from None
    finally:
        notify_sock.close()
        notify_path.unlink(missing_ok=True)
        notify_dir.rmdir()
    status = next((line for line in messages.splitlines() if line.startswith("STATUS=")), "")
    tcp = [part for part in status.split() if part.startswith("http://")]
    mirrors = [part.removeprefix("mirror:") for part in status.split() if part.startswith("mirror:")]
    return Daemon(proc, socket_path, status, log_path, tcp, mirrors)
