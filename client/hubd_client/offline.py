"""A read-only look-up in the cache directory for when no daemon answers: verified, published entries only.

Imported only on that path, so it may use hubd's store code without slowing `import hubd_client`.
"""

from __future__ import annotations

import os
from pathlib import Path

from hubd.errors import HubdError
from hubd.handles import AnyHost, parse_handle
from hubd.paths import default_cache_dir
from hubd.store import Store
from hubd.verify import quick_problems


def lookup(handle: str) -> tuple[str | None, Path]:
    root = Path(os.environ.get("HUBD_CACHE_DIR") or default_cache_dir())
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
