"""Reading an HTTP request off a raw socket, for the tests' hand-written servers (a daemon that never answers,
an impostor on a port): stdlib only, so the unit tier may use it too."""

from __future__ import annotations

import socket


def read_request(conn: socket.socket) -> bytes:
    """The whole request (line, headers and body), so answering never meets a client still sending."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"),
        0,
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body
