"""A read-only look-up in the cache directory for when no daemon answers: verified, published entries only.

Standard library only (hubd-client installs without the daemon), and imported only on that path. It reads the
refs, meta and objects that hubd/store.py writes, through the layout both share (`hubd_client.layout`), and runs
the same quick check on them as a cache hit in the daemon. It reads the cache's layout version first (see
docs/cache-layout.md): the versions in `READABLE_VERSIONS` share the files this look-up reads, so they are
understood; a newer version is refused with a remedy instead of misread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hubd_client.errors import HubdClientError
from hubd_client.layout import READABLE_VERSIONS, CacheLayout, is_digest
from hubd_client.layout import quick_problems as _layout_quick_problems


def layout_version(root: Path) -> int:
    """The cache's layout version (1 when the file is missing: caches from before it existed; 0: unreadable)."""
    try:
        version = CacheLayout(root).stored_version()
    except (OSError, ValueError):
        return 0  # unreadable or not a number: treated as unknown
    return 1 if version is None else version


def lookup(handle: str) -> tuple[str | None, Path]:
    root = Path(os.environ.get("HUBD_CACHE_DIR") or _default_cache_dir())
    if not os.path.isdir(root):
        return None, root
    _check_trusted(root)
    version = layout_version(root)
    if version not in READABLE_VERSIONS:
        raise HubdClientError(
            "cache_layout_unsupported",
            f"the cache at {root} has layout version {version or 'unknown'}; this hubd_client reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}",
            "upgrade hubd_client to the daemon's version, or start the daemon so the client asks it instead",
        )
    from hubd_client.errors import HubdError
    from hubd_client.handles import AnyHost, parse_handle

    try:
        source = parse_handle(handle, AnyHost())
    except HubdError:
        return None, root
    layout = CacheLayout(root)
    ref = _read_json(layout.ref(source.ref_key))
    digest = ref.get("digest") if ref else None
    if not isinstance(digest, str) or not is_digest(digest):
        return None, root
    meta = _read_json(layout.meta(digest))
    tree = layout.object(digest)
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
    """The daemon's quick check (`hubd_client.layout.quick_problems`) on the manifest as stored in
    meta/<digest>.json; a manifest that does not parse, or a file that cannot be looked at, is a problem."""
    if not isinstance(manifest, dict):
        return ["no manifest"]
    try:
        files = [(str(name), int(record["size"])) for name, record in manifest.get("files", {}).items()]
        links = {str(name): str(target) for name, target in manifest.get("symlinks", {}).items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        return ["unreadable manifest"]
    try:
        return _layout_quick_problems(tree, files, links)
    except OSError as exc:
        return [f"{exc.filename or tree}: {exc.strerror}"]


def _default_cache_dir() -> Path:
    from hubd_client.paths import default_cache_dir

    return default_cache_dir()
