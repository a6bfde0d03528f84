"""A small, fast HTTP/1.1 load generator for the daemon's Unix socket (keep-alive, asyncio streams).

    python bench/loadgen.py SOCKET --concurrency 64 --seconds 5 --body '{"handle": "..."}' [--path /v1/resolve]

Prints one JSON line: requests, errors (transport), statuses, requests/s, p50/p99/max latency in ms.
Kept apart from the daemon's process so the two do not share a GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import time


async def client(
    socket_path: str, request: bytes, deadline: float, latencies: list[float], statuses: collections.Counter[int]
) -> int:
    errors = 0
    reader, writer = await asyncio.open_unix_connection(socket_path)
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            statuses[int(status_line.split()[1])] += 1
            latencies.append(time.perf_counter() - start)
        except (ConnectionError, asyncio.IncompleteReadError, IndexError, ValueError):
            errors += 1
            writer.close()
            reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.close()
    return errors


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    body = args.body.encode()
    method = "POST" if body else "GET"
    request = (
        f"{method} {args.path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    started = time.perf_counter()
    deadline = started + args.seconds
    errors = await asyncio.gather(
        *(client(args.socket, request, deadline, latencies, statuses) for _ in range(args.concurrency))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    ms = [x * 1000 for x in latencies] or [0.0]
    return {
        "concurrency": args.concurrency,
        "requests": len(latencies),
        "errors": sum(errors),
        "statuses": dict(statuses),
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "max_ms": ms[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--path", default="/v1/resolve")
    parser.add_argument("--body", default="")
    print(json.dumps(asyncio.run(main_async(parser.parse_args()))))


if __name__ == "__main__":
    main()
