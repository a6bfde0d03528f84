"""hubd_client.transport.send, the one HTTP client of the API (the client library's and the CLI's): events as
they arrive, a file body sent whole, a body broken off, a silent daemon, each against a real Unix socket served by
a thread that answers one canned response."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hubd_client import transport

from hubd.api_client import DaemonClient
from hubd.config import Settings
from hubd.errors import AnswerBrokenOff, DaemonNotAnswering
from tests.raw_http import read_request


class Canned:
    """Accepts connections on `path`; for each, reads the request (kept in `requests`), then sends `answer` and
    closes (or, with `answer` None, holds the connection without a word until closed)."""

    def __init__(self, path: Path, answer: bytes | None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.path, self.answer = path, answer
        self.requests: list[bytes] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.requests.append(read_request(conn))
            if self.answer is None:
                self.held.append(conn)
                continue
            with conn:
                conn.sendall(self.answer)

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


Serve = Callable[[bytes | None], Canned]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    servers: list[Canned] = []

    def start(answer: bytes | None) -> Canned:
        servers.append(Canned(tmp_path / f"s{len(servers)}.sock", answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


NDJSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"


def test_events_skip_keep_alives_and_come_in_order(serve: Serve) -> None:
    server = serve(NDJSON + b'{"event":"progress","done":1}\n\n\n{"event":"done"}\n')
    with transport.send(transport.Endpoint(socket=str(server.path)), "POST", "/v1/pull", {"handle": "h"}) as a:
        assert [e["event"] for e in a.events()] == ["progress", "done"]
    assert server.requests[0].endswith(b'{"handle": "h"}')


def test_a_file_body_is_sent_whole_with_its_length(serve: Serve, tmp_path: Path) -> None:
    server = serve(NDJSON + b'{"event":"done"}\n')
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(bytes(range(256)) * 10_000)
    with open(bundle, "rb") as body:
        endpoint = transport.Endpoint(socket=str(server.path))
        with transport.send(endpoint, "POST", "/v1/import", raw=body, content_type="application/x-tar") as a:
            assert list(a.events()) == [{"event": "done"}]
    head, _, sent = server.requests[0].partition(b"\r\n\r\n")
    assert b"Content-Length: 2560000" in head and b"Content-Type: application/x-tar" in head
    assert sent == bundle.read_bytes()


def test_a_body_broken_off_is_an_error_never_a_short_bundle(serve: Serve) -> None:
    server = serve(CHUNKED + b"4\r\ntar!\r\n10\r\nonly half")  # the daemon aborts mid-chunk, with no last chunk
    client = DaemonClient(Settings(socket=server.path))
    received: list[bytes] = []

    class Out:
        def write(self, data: bytes) -> int:
            received.append(data)
            return len(data)

    with pytest.raises(AnswerBrokenOff):
        client.download("/v1/export?handle=h", Out())  # type: ignore[arg-type]
    assert b"".join(received) in (b"", b"tar!")


def test_a_silent_daemon_is_not_answering_within_the_first_byte_limit(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUBD_CLIENT_TIMEOUT", "0.2")
    server = serve(None)
    with pytest.raises(DaemonNotAnswering) as caught:
        DaemonClient(Settings(socket=server.path)).json("GET", "/v1/models")
    assert "sent nothing for 0.2 s" in caught.value.message and "HUBD_CLIENT_TIMEOUT" in caught.value.hint


def test_a_socket_nobody_listens_on_is_no_daemon(tmp_path: Path) -> None:
    assert DaemonClient(Settings(socket=tmp_path / "none.sock")).is_running() is False
