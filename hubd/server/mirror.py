"""The LAN mirror: the TF Hub hosting protocol, served from this hubd's cache (opt-in, its own listener).

`GET /<publisher>/<model>/<version>?tf-hub-format=compressed` (Kaggle: `/models/<owner>/<model>/<framework>/
<variation>/<version>`) resolves the handle through the engine, so a miss is fetched upstream once however many
machines ask, and streams the published tree as a tar.gz made on the fly (level 1: the bytes are weights, which
barely compress). Another hubd with `--mirror http://this-host:PORT` then fetches from here.

The re-packed bytes hash differently from the original archive, so the mirror states which archive the tree
came from (X-Hubd-Archive-Sha256, X-Hubd-Tree-Digest). Over plain http anyone on the way could rewrite that, so
with a shared key (HUBD_MIRROR_KEY_FILE, the same file on both hubds) it also sends an HMAC of the statement and
the handle's canonical name (X-Hubd-Claim-Signature); a receiving hubd with the key refuses any answer without a
valid one (502 mirror_unsigned), so nobody on the way can forge an answer or replay one model's for another.
Without a key the statement is believed only over https.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import threading
from pathlib import Path
from typing import IO, cast

from aiohttp import web
from hubd_client.handles import handle_from_mirror_path, parse_handle
from isal import igzip

from hubd.engine import Engine, claim_signature
from hubd.errors import BadHandle, HubdError

MIRROR_ENGINE = web.AppKey("mirror_engine", Engine)


class _QueueWriter:
    """A file object for tarfile that hands each write to the event loop, waiting while the queue is full."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None]) -> None:
        self.loop = loop
        self.queue = queue
        self.cancelled = threading.Event()

    def write(self, data: bytes) -> int:
        if self.cancelled.is_set():
            raise BrokenPipeError("the mirror client went away")
        asyncio.run_coroutine_threadsafe(self.queue.put(bytes(data)), self.loop).result()
        return len(data)

    def flush(self) -> None:
        pass


def _pack(tree: Path, writer: _QueueWriter) -> None:
    gz = igzip.GzipFile(fileobj=cast(IO[bytes], writer), mode="wb", compresslevel=1, mtime=0)  # type: ignore[no-untyped-call]
    with gz, tarfile.open(fileobj=cast(IO[bytes], gz), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(tree):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(tree)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644 if info.isreg() else info.mode
                if info.isreg():
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
                else:
                    tar.addfile(info)


async def serve_archive(request: web.Request) -> web.StreamResponse:
    engine = request.app[MIRROR_ENGINE]
    if request.query.get("tf-hub-format") != "compressed":
        return web.Response(status=404, text="hubd mirror: ask for ?tf-hub-format=compressed\n")
    try:
        handle = handle_from_mirror_path(request.match_info["path"])
        entry = await engine.resolve(handle)
    except BadHandle as exc:
        return web.Response(status=404, text=f"hubd mirror: {exc}\n")
    except HubdError as exc:
        return web.Response(status=exc.http_status, text=f"hubd mirror: {exc}\n")
    headers = {
        "Content-Type": "application/gzip",
        "X-Hubd-Tree-Digest": entry.tree_digest,
        "X-Hubd-Archive-Sha256": entry.archive_sha256,
    }
    if engine.mirror_key is not None:
        headers["X-Hubd-Claim-Signature"] = claim_signature(  # bound to the handle: no replay for another
            engine.mirror_key, parse_handle(handle).canonical, entry.archive_sha256, entry.tree_digest
        )
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
    writer = _QueueWriter(loop, queue)

    def produce() -> None:
        try:
            _pack(Path(entry.path), writer)
        finally:
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    producer = asyncio.ensure_future(asyncio.to_thread(produce))
    try:
        while (chunk := await queue.get()) is not None:
            await response.write(chunk)
            engine.stats.bytes_served_mirror += len(chunk)
    except (ConnectionResetError, asyncio.CancelledError):
        writer.cancelled.set()  # the packer stops at its next write; drain until it says it has
        while await queue.get() is not None:
            pass
        raise
    await producer
    await response.write_eof()
    return response


def create_mirror_app(engine: Engine) -> web.Application:
    app = web.Application()
    app[MIRROR_ENGINE] = engine
    app.router.add_get("/{path:.+}", serve_archive)
    return app
