"""A download cut by a daemon restart continues where it stopped (Range + If-Range), and starts again from zero
only when the upstream's file changed. The daemon is SIGKILLed while the hosting server holds the response at
half the archive: synchronisation is on the server's counters, never on sleeps."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import socket
import tarfile
from pathlib import Path

import pytest

from hubd.config import Settings
from tests.conftest import Upstream
from tests.daemon import Daemon, start_daemon
from tests.hosting import Behaviour

MiB = 1 << 20


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


@pytest.fixture(scope="module")
def big_archive() -> bytes:
    """A ~46 MB SavedModel-shaped archive (random weights, so it does not compress)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (
            ("saved_model.pb", b"\x08\x01graph"),
            ("variables/variables.index", b"index"),
            ("variables/variables.data-00000-of-00001", os.urandom(46 * 10**6)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1)


def _send_pull(daemon: Daemon, handle: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket_path))
    body = json.dumps({"handle": handle}).encode()
    sock.sendall(
        b"POST /v1/pull HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _kill_at_half(settings: Settings, upstream: Upstream, tmp_path: Path, path: str, size: int) -> None:
    """Pull, SIGKILL the daemon once the upstream has sent half the archive, then let the held response end."""
    daemon = start_daemon(settings, tmp_path)
    sock = _send_pull(daemon, tfhub(path))
    assert upstream.server.wait_sent(path, size // 2)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    sock.close()
    upstream.server.release(path)
    assert upstream.server.wait_disconnects(path)  # the held response found its client gone


def _spool_files(settings: Settings) -> list[str]:
    partial = settings.cache_dir / "partial"
    return sorted(p.name for p in partial.iterdir()) if partial.is_dir() else []


def test_a_download_cut_by_a_restart_resumes_where_it_stopped(
    settings: Settings, upstream: Upstream, tmp_path: Path, big_archive: bytes
) -> None:
    size = len(big_archive)
    path = upstream.publish(big_archive, Behaviour(pause_after=size // 2))
    _kill_at_half(settings, upstream, tmp_path, path, size)
    assert len(_spool_files(settings)) == 2  # the part and its sidecar survived the SIGKILL
    daemon = start_daemon(settings, tmp_path)
    try:
        reply = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)})
    finally:
        daemon.stop()
    assert reply.status == 200, reply.body
    assert reply.json()["archive_sha256"] == hashlib.sha256(big_archive).hexdigest()
    assert upstream.server.range_requests[path] == 1
    sent = upstream.bytes_sent(path)
    print(f"\nreliability: SIGKILL at 50% of a {size / MiB:.0f} MiB archive -> {sent / size:.2f}x its size sent")
    assert sent < 1.7 * size  # about half again, not the whole archive again
    assert _spool_files(settings) == []  # published: the spool is gone


def test_a_changed_upstream_restarts_from_zero_and_publishes_the_new_model(
    settings: Settings, upstream: Upstream, tmp_path: Path, big_archive: bytes
) -> None:
    size = len(big_archive)
    path = upstream.publish(big_archive, Behaviour(pause_after=size // 2))
    _kill_at_half(settings, upstream, tmp_path, path, size)
    new = upstream.models["reusable"]
    upstream.server.archives[path] = new  # another file, so another ETag
    before = upstream.bytes_sent(path)
    daemon = start_daemon(settings, tmp_path)
    try:
        reply = daemon.request("POST", "/v1/resolve", {"handle": tfhub(path)})
    finally:
        daemon.stop()
    assert reply.status == 200, reply.body
    assert reply.json()["archive_sha256"] == hashlib.sha256(new).hexdigest()
    assert upstream.server.range_requests[path] == 0  # If-Range did not match: the whole new file came
    assert upstream.bytes_sent(path) - before == len(new)
    assert _spool_files(settings) == []
