"""The shared object-store tier (HUBD_OBJECT_STORE) against a real S3-compatible server on 127.0.0.1.

moto's standalone server stands in for S3 (the one thing that cannot exist here); everything else is real:
several `hubd serve` daemons, each with its own cache, sharing one bucket, and the hosting server as upstream.
Uploads finish before a daemon's drain ends, so stopping host 1 is the deterministic "its upload is done".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubd.config import Settings
from hubd.objectstore import BucketRef, ObjectStore, object_key
from tests.daemon import Daemon, start_daemon

from .conftest import Upstream

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
pytest.importorskip("obstore")

BUCKET = "hubd-test"
KEYS = {
    "AWS_ACCESS_KEY_ID": "hubd-test",
    "AWS_SECRET_ACCESS_KEY": "hubd-test",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, **_boto_keys())
    client.create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
        "region_name": KEYS["AWS_REGION"],
    }


class Bucket:
    """One test's prefix of the bucket, and the environment that points a daemon at it."""

    def __init__(self, endpoint: str) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self.url = f"s3://{BUCKET}/{self.prefix}"
        self.env = {**KEYS, "AWS_ENDPOINT_URL": endpoint, "HUBD_OBJECT_STORE": self.url}
        self.client = boto3.client("s3", endpoint_url=endpoint, **_boto_keys())

    def keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=BUCKET, Prefix=self.prefix + "/")
        return sorted(o["Key"].removeprefix(self.prefix + "/") for o in listed.get("Contents", []))

    def get(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")["Body"].read()
        return body

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}", Body=data)


@pytest.fixture
def bucket(s3_endpoint: str) -> Bucket:
    return Bucket(s3_endpoint)


def tfhub(path: str) -> str:
    return f"https://tfhub.dev/{path}"


def host(settings: Settings, tmp_path: Path, name: str, bucket: Bucket, **update: object) -> Daemon:
    work = tmp_path / name
    work.mkdir()
    mine = settings.model_copy(update={"cache_dir": work / "cache", **update})
    return start_daemon(mine, work, env_extra={**bucket.env, "HUBD_FSYNC": "0"})


def resolve(daemon: Daemon, handle: str) -> dict[str, object]:
    reply = daemon.request("POST", "/v1/resolve", {"handle": handle})
    assert reply.status == 200, reply.body
    entry: dict[str, object] = reply.json()
    return entry


def first_host(settings: Settings, tmp_path: Path, bucket: Bucket, handle: str) -> dict[str, object]:
    """Host 1 fetches from upstream; stopping it waits for its upload (the drain), so the bucket is filled."""
    one = host(settings, tmp_path, "h1", bucket)
    try:
        entry = resolve(one, handle)
    finally:
        assert one.stop() == 0
    assert "object store: uploaded model" in one.log(), one.log()
    return entry


def test_three_hosts_cost_one_upstream_download_and_a_host_without_upstream_serves(
    settings: Settings, upstream: Upstream, bucket: Bucket, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    first = first_host(settings, tmp_path, bucket, tfhub(path))
    assert upstream.requests(path) == 1
    digest = str(first["tree_digest"])
    assert bucket.keys() == sorted([object_key(digest), f"refs/{_ref_key(path)}.json"])
    ref = BucketRef.from_json(bucket.get(f"refs/{_ref_key(path)}.json"))
    assert (ref.digest, ref.archive_sha256) == (digest, first["archive_sha256"])

    two = host(settings, tmp_path, "h2", bucket)
    # host 3's upstream is down (a mirror nobody listens on): only the bucket can serve it
    three = host(settings, tmp_path, "h3", bucket, mirror="http://127.0.0.1:9", retries=0)
    try:
        entries = [resolve(two, tfhub(path)), resolve(three, tfhub(path))]
    finally:
        assert two.stop() == 0 and three.stop() == 0
    assert upstream.requests(path) == 1  # three hosts, one upstream download
    for entry in entries:
        assert entry["tree_digest"] == digest and entry["archive_sha256"] == first["archive_sha256"]
        assert Path(str(entry["path"]), "saved_model.pb").is_file()
    for daemon in (two, three):
        assert "from=objectstore" in daemon.log() and "uploaded model" not in daemon.log()
    assert bucket.keys() == sorted([object_key(digest), f"refs/{_ref_key(path)}.json"])  # nothing re-uploaded


def test_a_tampered_object_in_the_bucket_is_refused_and_never_published(
    settings: Settings, upstream: Upstream, bucket: Bucket, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    first = first_host(settings, tmp_path, bucket, tfhub(path))
    key = object_key(str(first["tree_digest"]))
    bucket.put(key, _flip_a_byte_of_the_largest_file(bucket.get(key)))

    # Without an upstream, the tampered object is all there is: the resolve fails and nothing is published.
    dead = host(settings, tmp_path, "h2", bucket, mirror="http://127.0.0.1:9", retries=0)
    try:
        reply = dead.request("POST", "/v1/resolve", {"handle": tfhub(path)})
    finally:
        assert dead.stop() == 0
    assert reply.status != 200
    assert "object store: REFUSED" in dead.log() and "does not match its digest" in dead.log()
    objects = tmp_path / "h2" / "cache" / "objects"
    assert not objects.is_dir() or not any(objects.iterdir())

    # With its upstream, the host falls through to it and serves the genuine model.
    live = host(settings, tmp_path, "h3", bucket)
    try:
        entry = resolve(live, tfhub(path))
    finally:
        assert live.stop() == 0
    assert "object store: REFUSED" in live.log()
    assert entry["tree_digest"] == first["tree_digest"]
    assert upstream.requests(path) == 2


def test_two_hosts_racing_upload_once(
    settings: Settings, upstream: Upstream, bucket: Bucket, tmp_path: Path
) -> None:
    path = upstream.publish("reusable")
    hosts = [host(settings, tmp_path, f"h{n}", bucket) for n in (1, 2)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            entries = list(pool.map(lambda d: resolve(d, tfhub(path)), hosts))
    finally:
        assert [d.stop() for d in hosts] == [0, 0]  # each drain waits for its upload
    assert entries[0]["tree_digest"] == entries[1]["tree_digest"]
    assert sum(d.log().count("object store: uploaded model") for d in hosts) == 1
    assert bucket.keys() == sorted([object_key(str(entries[0]["tree_digest"])), f"refs/{_ref_key(path)}.json"])


def test_the_conditional_put_creates_once_and_never_overwrites(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    store = ObjectStore(bucket.url)

    async def race() -> list[bool]:
        return list(await asyncio.gather(*(store.put_once("objects/x", bytes([n]) * 1024) for n in range(4))))

    created = asyncio.run(race())
    assert sorted(created) == [False, False, False, True]
    assert bucket.get("objects/x") == bytes([created.index(True)]) * 1024


def _ref_key(path: str) -> str:
    from hubd_client.handles import AnyHost, parse_handle

    return parse_handle(tfhub(path), AnyHost()).ref_key


def _flip_a_byte_of_the_largest_file(bundle: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as archive:
        member = max(
            (m for m in archive.getmembers() if m.isreg() and m.name.startswith("objects/")), key=lambda m: m.size
        )
    data = bytearray(bundle)
    data[member.offset_data + member.size // 2] ^= 0xFF
    return bytes(data)


def test_a_bucket_that_is_down_sends_the_fetch_upstream_within_seconds(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubd_client.handles import AnyHost, parse_handle

    for name, value in {**bucket.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    store = ObjectStore(bucket.url)
    source = parse_handle(tfhub("a/b/1"), AnyHost())
    started = time.monotonic()
    assert asyncio.run(store.fetch(None, source, None, None)) is None  # type: ignore[arg-type]
    assert time.monotonic() - started < 15
