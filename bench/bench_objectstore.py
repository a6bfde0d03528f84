"""The object-store tier: which S3 client, and what it buys a second host.

    .venv/bin/python bench/bench_objectstore.py [--size-mb 40] [--rounds 3] [--only clients|hosts]

Everything runs against moto's S3 server on 127.0.0.1 (loopback only, dummy keys).

1. clients: upload and download one ~40 MB object with obstore and with aiobotocore (alternating, best of
   `--rounds`), the two async S3 clients hubd could use; CPU time too, since the machines have few cores.
2. hosts: time-to-ready of a model on host 1 (upstream fetch, then the upload to the bucket) against hosts
   k > 1 (fresh caches, same bucket: the model comes from the bucket, verified, no upstream request), each a
   real `hubd serve` daemon resolving over its socket; the upstream unthrottled on loopback (the worst case for
   the bucket) and throttled to 200 Mbit/s (an internet download).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUCKET = "hubd-bench"


def start_moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="hubd-test",
        AWS_SECRET_ACCESS_KEY="hubd-test",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return server, endpoint


async def timed(fn: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await fn()
    return time.perf_counter() - wall, time.process_time() - cpu


async def bench_clients(path: Path, rounds: int) -> None:
    import obstore
    from aiobotocore.session import get_session
    from obstore.store import S3Store

    size = path.stat().st_size
    store = S3Store(BUCKET, prefix="obstore", client_options={"allow_http": True})
    session = get_session()
    results: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("obstore up", "obstore down", "boto up", "boto down")
    }
    async with session.create_client("s3") as s3:
        for n in range(rounds):

            async def ob_up(n: int = n) -> None:
                with open(path, "rb") as f:
                    await obstore.put_async(store, f"o{n}", f, use_multipart=False)

            async def ob_down(n: int = n) -> None:
                got = await obstore.get_async(store, f"o{n}")
                with open(path.with_suffix(".o"), "wb") as out:
                    async for chunk in got.stream(min_chunk_size=1 << 20):
                        out.write(chunk)

            async def bo_up(n: int = n) -> None:
                with open(path, "rb") as f:
                    await s3.put_object(Bucket=BUCKET, Key=f"boto/o{n}", Body=f)

            async def bo_down(n: int = n) -> None:
                got = await s3.get_object(Bucket=BUCKET, Key=f"boto/o{n}")
                with open(path.with_suffix(".b"), "wb") as out:
                    async with got["Body"] as body:
                        while chunk := await body.read(1 << 20):
                            out.write(chunk)

            results["obstore up"].append(await timed(ob_up))
            results["boto up"].append(await timed(bo_up))
            results["obstore down"].append(await timed(ob_down))
            results["boto down"].append(await timed(bo_down))
    print(
        f"client      op      best wall   MB/s   cpu s   ({size / 1e6:.1f} MB, best of {rounds}, moto on loopback)"
    )
    for name, runs in results.items():
        wall, cpu = min(runs)
        lib, op = name.split()
        print(f"{lib:10}  {op:5}  {wall:8.3f} s  {size / 1e6 / wall:6.0f}  {cpu:6.3f}")


def bench_hosts(hosts: int, size_mb: int, upstream_mbps: float) -> None:
    from hubd.config import Settings
    from tests.daemon import start_daemon
    from tests.hosting import Behaviour, HostingServer

    with HostingServer() as hosting, tempfile.TemporaryDirectory(prefix="bench-os-") as tmp:
        archive = model_archive(size_mb << 20)
        chunk = 256 << 10
        throttle = (
            Behaviour(throttle_chunk=chunk, throttle_delay=chunk * 8 / (upstream_mbps * 1e6))
            if upstream_mbps
            else None
        )
        hosting.add("bench/model/1", archive, throttle)
        handle = f"{hosting.url}/bench/model/1"
        env = {
            **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
            "HUBD_OBJECT_STORE": f"s3://{BUCKET}/hosts",
        }
        speed = f"{upstream_mbps:g} Mbit/s" if upstream_mbps else "loopback, unthrottled"
        print(f"host  time-to-ready  upstream requests   (archive {len(archive) / 1e6:.1f} MB, upstream {speed})")
        for k in range(1, hosts + 1):
            work = Path(tmp) / f"h{k}"
            work.mkdir()
            settings = Settings(
                cache_dir=work / "cache", mirror=hosting.url, http_hosts=["127.0.0.1"], fsync=False
            )
            daemon = start_daemon(settings, work, env_extra={**env, "HUBD_FSYNC": "0"})
            try:
                started = time.perf_counter()
                reply = daemon.request("POST", "/v1/resolve", {"handle": handle})
                seconds = time.perf_counter() - started
                assert reply.status == 200, reply.body
            finally:
                daemon.stop()  # host 1: waits for its upload to the bucket to finish
            print(f"{k:4}  {seconds:10.3f} s  {hosting.requests['bench/model/1']:6}")


def model_archive(size: int) -> bytes:
    """A SavedModel-shaped .tar.gz: a graph and one `size`-byte shard of random (incompressible) weights."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
        for name, data in (
            ("saved_model.pb", b"graph" * 100),
            ("variables/variables.index", b"index" * 10),
            ("variables/variables.data-00000-of-00001", os.urandom(size)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--only", choices=["clients", "hosts"])
    parser.add_argument(
        "--upstream-mbps", type=float, action="append", help="throttle upstream (repeatable; default: 0 and 200)"
    )
    args = parser.parse_args()
    server, _endpoint = start_moto()
    try:
        if args.only in (None, "clients"):
            with tempfile.TemporaryDirectory(prefix="bench-os-") as tmp:
                path = Path(tmp) / "object.bin"
                path.write_bytes(os.urandom(args.size_mb << 20))
                asyncio.run(bench_clients(path, args.rounds))
        if args.only in (None, "hosts"):
            for mbps in args.upstream_mbps or [0.0, 200.0]:
                bench_hosts(args.hosts, args.size_mb, mbps)
    finally:
        server.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
