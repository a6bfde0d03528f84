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


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return _special(name, tarfile.SYMTYPE, target)


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def chain_escape_target(pairs: int = 20) -> str:
    """A link target that stays inside lexically ('d/l' pairs, then as many '..') but leaves through d/l -> .."""
    return "d/l/" * pairs + "../" * (2 * pairs) + "etc/passwd"


def symlink_chain(link_name: str = "assets.txt") -> bytes:
    """#9 item 4: `d/l -> ..` makes `d/l/d/l/../..` climb out of the tree while normpath says it stays in."""
    base = [] if link_name == "saved_model.pb" else saved_model_members()
    return _tar([*base, _dir("d"), _symlink("d/l", ".."), _symlink(link_name, chain_escape_target())])


def sparse_member(apparent_size: int = 2 * 2**30) -> bytes:
    """A GNU sparse member: a few hundred bytes that a naive extractor writes out as `apparent_size` zeros."""
    info = tarfile.TarInfo("variables/variables.data-00000-of-00001")
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % 0  # one sparse region: offset 0 ...
    header[398:410] = b"%011o\0" % 0  # ... of 0 bytes
    header[483:495] = b"%011o\0" % apparent_size  # the real size once expanded
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    graph_info, graph = _file("saved_model.pb", b"\x08\x01graph")
    graph_info.size = len(graph)
    first = graph_info.tobuf(format=tarfile.GNU_FORMAT) + graph + bytes(-len(graph) % 512)
    return gzip.compress(first + bytes(header) + bytes(1024))


def more_hostile(outside: str) -> dict[str, bytes]:
    """Inputs that once gave a 500 or escaped (#9, #10): each must be refused as an unsafe archive."""
    base = saved_model_members()
    return {
        "control_char_name": _tar([*base, _file("assets/a\nf b")]),
        "long_member_name": _tar([*base, _file("a" * 5000)]),
        "deep_path": _tar([*base, _file("/".join(["d" * 200] * 25))]),
        "hardlink_over_member": _tar(
            [*base, _file("assets/a", b"first"), _special("assets/a", tarfile.LNKTYPE, "saved_model.pb")]
        ),
        "dangling_symlink_in_missing_dir": _tar([*base, _symlink("missing/dir/link", "../../nothing")]),
        "symlink_chain_escape": symlink_chain(),
        "symlink_chain_saved_model": symlink_chain("saved_model.pb"),
        "saved_model_is_a_link": _tar(
            [_file("graph.pb", b"\x08\x01graph"), _symlink("saved_model.pb", "graph.pb")]
        ),
        "variables_is_a_link": _tar([*base, _file("vars/variables.index", b"i"), _symlink("variables", "vars")]),
        "link_loop": _tar([*base, _symlink("a", "b"), _symlink("b", "a")]),
        "sparse": sparse_member(),
    }
