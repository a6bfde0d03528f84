"""A corpus of hostile and malformed archives, built in memory with tarfile."""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], compress: bool = True) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return gzip.compress(raw.getvalue()) if compress else raw.getvalue()


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def saved_model_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [_file("saved_model.pb", b"\x08\x01graph")]


def hostile_corpus(outside: str) -> dict[str, bytes]:
    """Each archive tries to write to `outside` (an absolute directory the test watches) or to break limits."""
    base = saved_model_members()
    return {
        "traversal": _tar([*base, _file("../../../" + outside.lstrip("/") + "/evil")]),
        "nested_traversal": _tar([*base, _file("variables/../../evil")]),
        "absolute": _tar([*base, _file(outside + "/evil")]),
        "symlink_escape": _tar([*base, _special("variables", tarfile.SYMTYPE, outside)]),
        "symlink_relative_escape": _tar([*base, _special("link", tarfile.SYMTYPE, "../../../../../etc")]),
        "hardlink_escape": _tar([*base, _special("passwd", tarfile.LNKTYPE, "../../../../etc/passwd")]),
        "hardlink_absolute": _tar([*base, _special("passwd", tarfile.LNKTYPE, "/etc/passwd")]),
        "char_device": _tar([*base, _special("null", tarfile.CHRTYPE)]),
        "block_device": _tar([*base, _special("disk", tarfile.BLKTYPE)]),
        "fifo": _tar([*base, _special("pipe", tarfile.FIFOTYPE)]),
        "symlink_then_write_through": _tar(
            [*base, _special("assets", tarfile.SYMTYPE, "variables"), _file("assets/evil")]
        ),
        "duplicate_member": _tar([*base, _file("saved_model.pb", b"overwritten")]),
    }


def tar_bomb(members: int) -> bytes:
    return _tar([*saved_model_members(), *(_file(f"f{i}", b"") for i in range(members))])


def gzip_bomb(inflated_bytes: int) -> bytes:
    """A tar whose one member is `inflated_bytes` of zeros: tiny compressed, huge inflated."""
    header = tarfile.TarInfo("variables/variables.data-00000-of-00001")
    header.size = inflated_bytes
    head = header.tobuf(format=tarfile.PAX_FORMAT)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(head)]
    zeros = bytes(1 << 20)
    for _ in range(inflated_bytes // len(zeros)):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.flush())
    return b"".join(parts)


def setuid_file() -> bytes:
    return _tar([*saved_model_members(), _file("assets/tool", b"#!/bin/sh\n", mode=0o6755)])


def not_gzip() -> bytes:
    return b"<!DOCTYPE html><html><body>Please sign in</body></html>"


def truncated(archive: bytes) -> bytes:
    return archive[: len(archive) // 2]
