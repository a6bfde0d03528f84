"""The cache's on-disk layout: every path under the cache root, its version, and the quick check of an entry.

The one definition of where things live (docs/cache-layout.md). The daemon's `hubd.store.Store` is built on
`CacheLayout`, and the client's offline reader (`hubd_client.offline`) reads through it, so the two cannot drift
apart: a changed layout is a change here, with `LAYOUT_VERSION` bumped and a migration in hubd/layout.py. Standard
library only: hubd-client installs without the daemon.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

LAYOUT_VERSION = 2
"""The version this code writes (hubd/layout.py migrates older caches to it)."""
READABLE_VERSIONS = (1, 2)
"""The versions whose refs, meta and objects the offline reader understands (1 and 2 differ only in digests)."""
VERSION_FILE = "layout-version"
CACHEDIR_TAG = "CACHEDIR.TAG"

# The directories and files directly under the cache root.
OBJECTS = "objects"
META = "meta"
REFS = "refs"
PINS = "pins"
STAGING = "staging"
PENDING = "pending"
QUARANTINE = "quarantine"
LOCKS = "locks"
INDEX = "index"
VIEW = "tfhub_modules"
PARTIAL = "partial"
USERS = "users"
AUDIT = "audit"
ALIASES = "aliases.json"

PUBLIC_DIRS = (OBJECTS, META, REFS, PINS)
"""Readable by every user of the cache (0755): what a client's offline look-up reads."""
PRIVATE_DIRS = (STAGING, QUARANTINE, LOCKS, PENDING)
"""The daemon's own (0700)."""

_DIGEST_CHARS = frozenset("0123456789abcdef")


def ref_key(canonical: str) -> str:
    """The file-name-safe key of a canonical name: refs/<key>.json, locks/<key>.lock, pending/<key>.json."""
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def is_digest(text: str) -> bool:
    """Whether `text` is a tree digest (64 lower-case hex digits), so it may name a path under objects/."""
    return len(text) == 64 and set(text) <= _DIGEST_CHARS


def object_relpath(digest: str) -> str:
    """objects/<digest>, relative to the cache root: a plain string, as it is built on every cache hit."""
    return f"{OBJECTS}/{digest}"


def view_target(digest: str) -> str:
    """What a tfhub_modules/ link holds: the object relative to the view directory."""
    return f"../{OBJECTS}/{digest}"


def descriptor_of(link: Path) -> Path:
    """tfhub_modules/<sha1>.descriptor.txt beside the link <sha1>, as tensorflow_hub writes it."""
    return link.with_name(f"{link.name}.descriptor.txt")


@dataclass(frozen=True)
class CacheLayout:
    """The paths of a cache rooted at `root`; builds paths only, never touches the disk (but `stored_version`).

    The directories are joined once (cached), so a path on the cache-hit path costs one join."""

    root: Path

    @cached_property
    def objects(self) -> Path:
        return self.root / OBJECTS

    @cached_property
    def meta_dir(self) -> Path:
        return self.root / META

    @cached_property
    def refs(self) -> Path:
        return self.root / REFS

    @cached_property
    def pins(self) -> Path:
        return self.root / PINS

    @cached_property
    def staging(self) -> Path:
        return self.root / STAGING

    @cached_property
    def pending(self) -> Path:
        return self.root / PENDING

    @cached_property
    def quarantine(self) -> Path:
        return self.root / QUARANTINE

    @cached_property
    def locks(self) -> Path:
        return self.root / LOCKS

    @cached_property
    def index(self) -> Path:
        return self.root / INDEX

    @cached_property
    def view(self) -> Path:
        return self.root / VIEW

    @cached_property
    def partial(self) -> Path:
        return self.root / PARTIAL

    @cached_property
    def users(self) -> Path:
        return self.root / USERS

    @cached_property
    def audit(self) -> Path:
        return self.root / AUDIT

    @cached_property
    def aliases(self) -> Path:
        return self.root / ALIASES

    @cached_property
    def version_file(self) -> Path:
        return self.root / VERSION_FILE

    @cached_property
    def cachedir_tag(self) -> Path:
        return self.root / CACHEDIR_TAG

    def object(self, digest: str) -> Path:
        return self.objects / digest

    def meta(self, digest: str) -> Path:
        return self.meta_dir / f"{digest}.json"

    def ref(self, key: str) -> Path:
        return self.refs / f"{key}.json"

    def pin(self, digest: str) -> Path:
        return self.pins / f"{digest}.json"

    def lock(self, key: str) -> Path:
        """locks/<key>.lock: a ref's single-flight flock; also the named locks (`gc`, `layout`)."""
        return self.locks / f"{key}.lock"

    def object_lock(self, digest: str) -> Path:
        return self.lock(f"object-{digest}")

    def pending_intent(self, key: str) -> Path:
        return self.pending / f"{key}.json"

    def pending_meta(self, key: str) -> Path:
        return self.pending / f"{key}.meta.json"

    def quarantined(self, digest: str, millis: int) -> Path:
        """quarantine/<digest>.<ms>/: a tree set aside at that time, with `quarantine_reason` beside it."""
        return self.quarantine / f"{digest}.{millis}"

    def quarantine_reason(self, quarantined: Path) -> Path:
        return quarantined.with_name(f"{quarantined.name}.reason")

    def staging_dir(self, token: str) -> Path:
        """staging/<token>/: a private work directory, held by a flock on `staging_lock(token)`."""
        return self.staging / token

    def staging_lock(self, token: str) -> Path:
        return self.staging / f"{token}.lock"

    def view_link(self, name: str) -> Path:
        return self.view / name

    def view_descriptor(self, name: str) -> Path:
        return descriptor_of(self.view_link(name))

    def user_record(self, digest: str) -> Path:
        return self.users / f"{digest}.json"

    def stored_version(self) -> int | None:
        """The version in `layout-version`, None when there is none; ValueError when it holds no integer."""
        try:
            text = self.version_file.read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise ValueError(text)
        return int(text)


def quick_problems(tree: Path | str, files: Iterable[tuple[str, int]], links: Mapping[str, str]) -> list[str]:
    """The quick check of a published tree, on every cache hit: every recorded file (name, size) present with its
    size, every recorded link still pointing where it did and resolving inside the tree. One lstat per file, no
    pathlib. `hubd.verify.quick_problems` and the offline reader both run this one.

    A file that cannot be looked at for another reason than its absence (EACCES) raises OSError."""
    problems: list[str] = []
    root = str(tree)
    if not os.path.isdir(root):
        return [f"{tree} is missing"]
    for name, size in files:
        try:
            st = os.lstat(f"{root}/{name}")
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{name}: deleted")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{name}: no longer a regular file")
        elif st.st_size != size:
            problems.append(f"{name}: size {st.st_size}, expected {size}")
    if links:
        real_root = os.path.realpath(root)
        for name, target in links.items():
            try:
                if os.readlink(f"{root}/{name}") != target:
                    problems.append(f"{name}: link changed")
                    continue
            except OSError:
                problems.append(f"{name}: link deleted")
                continue
            real = os.path.realpath(f"{root}/{name}")  # against the real tree, not the recorded target
            if os.path.commonpath([real_root, real]) != real_root or not os.path.exists(real):
                problems.append(f"{name}: link resolves outside the model")
    return problems
