"""A read-only look-up in the cache directory for when no daemon answers: verified, published entries only.

Imported only on that path, so it may use hubd's store code without slowing `import hubd_client`. It reads the
cache's layout version first (see docs/cache-layout.md): versions 1 and 2 share the files this look-up reads
(refs, meta, objects), so both are understood; a newer version is refused with a remedy instead of misread.
"""

from __future__ import annotations

import os
from pathlib import Path

from hubd_client.errors import HubdClientError

LAYOUT_VERSIONS = (1, 2)  # what this client reads; hubd/layout.py writes the newest
VERSION_FILE = "layout-version"


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
    version = layout_version(root)
    if version not in LAYOUT_VERSIONS:
        raise HubdClientError(
            "cache_layout_unsupported",
            f"the cache at {root} has layout version {version or 'unknown'}; this hubd_client reads "
            f"{', '.join(map(str, LAYOUT_VERSIONS))}",
            "upgrade hubd_client to the daemon's version, or start the daemon so the client asks it instead",
        )
    from hubd.errors import HubdError
    from hubd.handles import AnyHost, parse_handle
    from hubd.store import Store
    from hubd.verify import quick_problems

    try:
        source = parse_handle(handle, AnyHost())
    except HubdError:
        return None, root
    store = Store(root, fsync=False)
    ref = store.read_ref(source.ref_key)
    if ref is None:
        return None, root
    meta = store.read_meta(ref.digest)
    tree = store.object_path(ref.digest)
    if meta is None or quick_problems(tree, meta.manifest):
        return None, root  # missing or damaged: never hand out a broken model
    return str(tree), root


def _default_cache_dir() -> Path:
    from hubd.paths import default_cache_dir

    return default_cache_dir()
