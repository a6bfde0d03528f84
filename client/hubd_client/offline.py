"""A read-only look-up in the cache directory for when no daemon answers: verified, published entries only.

Standard library only (hubd-client installs without the daemon), and imported only on that path. It reads the
refs, meta and objects that hubd/store.py writes and repeats hubd.verify's quick check on them. It reads the
cache's layout version first (see docs/cache-layout.md): versions 1 and 2 share the files this look-up reads
(refs, meta, objects), so both are understood; a newer version is refused with a remedy instead of misread.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from hubd_client.errors import HubdClientError

LAYOUT_VERSIONS = (1, 2)  # what this client reads; hubd/layout.py writes the newest
VERSION_FILE = "layout-version"
_DIGEST_CHARS = set("0123456789abcdef")


def layout_version(root: Path) -> int:
    """The cache's layout version (1 when the file is missing: caches from before it existed)."""
    try:
        text = (root / VERSION_FILE).read_text().strip()
    except FileNotFoundError:
        return 1
    except OSError:
        return 0  # unreadable: treated as unknown
    return int(text) if text.isdigit() else 0


def lookup(handle: str) -> tuple[str | None, Path]:
    root = Path(os.environ.get("HUBD_CACHE_DIR") or _default_cache_dir())
    if not os.path.isdir(root):
        return None, root
    _check_trusted(root)
    version = layout_version(root)
    if version not in LAYOUT_VERSIONS:
        raise HubdClientError(
            "cache_layout_unsupported",
            f"the cache at {root} has layout version {version or 'unknown'}; this hubd_client reads "
            f"{', '.join(map(str, LAYOUT_VERSIONS))}",
            "upgrade hubd_client to the daemon's version, or start the daemon so the client asks it instead",
        )
    from hubd_client.errors import HubdError
    from hubd_client.handles import AnyHost, parse_handle

    try:
        source = parse_handle(handle, AnyHost())
    except HubdError:
        return None, root
    ref = _read_json(root / "refs" / f"{source.ref_key}.json")
    digest = ref.get("digest") if ref else None
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _DIGEST_CHARS:
        return None, root
    meta = _read_json(root / "meta" / f"{digest}.json")
    tree = root / "objects" / digest
    if meta is None or quick_problems(tree, meta.get("manifest")):
        return None, root  # missing or damaged: never hand out a broken model
    return str(tree), root


def _check_trusted(root: Path) -> None:
    """Refuse a cache that anyone but root, `hubd`, this user (or HUBD_SOCKET_OWNER) could have written: its
    refs say which program this process loads."""
    from hubd_client.paths import cache_dir_problem, client_trusted_uids

    try:
        problem = cache_dir_problem(root, client_trusted_uids())
    except OSError as exc:
        problem = f"it cannot be checked ({exc.strerror})"
    if problem is not None:
        raise HubdClientError(
            "cache_untrusted",
            f"refusing the cache at {root}: {problem}, so another user could choose the model loaded from it",
            "start the daemon, or point HUBD_CACHE_DIR at the cache hubd keeps (only root, hubd or you may be "
            "able to write it)",
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def quick_problems(tree: Path, manifest: Any) -> list[str]:
    """hubd.verify.quick_problems on the manifest as stored in meta/<digest>.json: every recorded file present
    with its recorded size, every recorded link still pointing where it did and inside the tree."""
    if not isinstance(manifest, dict):
        return ["no manifest"]
    root = str(tree)
    if not os.path.isdir(root):
        return [f"{tree} is missing"]
    problems: list[str] = []
    try:
        files = {str(name): int(record["size"]) for name, record in manifest.get("files", {}).items()}
        links = {str(name): str(target) for name, target in manifest.get("symlinks", {}).items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        return ["unreadable manifest"]
    for name, size in files.items():
        try:
            st = os.lstat(f"{root}/{name}")
        except OSError:
            problems.append(f"{name}: deleted")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{name}: no longer a regular file")
        elif st.st_size != size:
            problems.append(f"{name}: size {st.st_size}, expected {size}")
    real_root = os.path.realpath(root)
    for name, target in links.items():
        try:
            if os.readlink(f"{root}/{name}") != target:
                problems.append(f"{name}: link changed")
                continue
        except OSError:
            problems.append(f"{name}: link deleted")
            continue
        real = os.path.realpath(f"{root}/{name}")
        if os.path.commonpath([real_root, real]) != real_root or not os.path.exists(real):
            problems.append(f"{name}: link resolves outside the model")
    return problems


def _default_cache_dir() -> Path:
    from hubd_client.paths import default_cache_dir

    return default_cache_dir()
