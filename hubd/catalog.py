"""The catalog: who asked for each cached model, and the aliases manifests give models.

Both are facts the cache must keep across restarts and index rebuilds, kept beside the store's own files and
without changing their format:

- `<cache>/users/<digest>.json` (0600, in a 0700 directory): the uids that resolved the object, one file per
  object, written only when a uid is new to it (a cache hit costs a set look-up, not a write);
- `<cache>/aliases.json` (0644: aliases are as public as handles): name -> handle, the archive sha256 a manifest
  pinned, and the manifests that claim the name.

An alias is a manifest's `name`: a word (a letter, then letters, digits, `_` or `-`), so it can never be read as a
path, a URL or a model id. It is looked up in memory, never on the filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hubd_client.layout import CacheLayout

from hubd.errors import (
    AliasConflict,
)
from hubd.store import flocked

ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,99}$")
_HEX_ID = re.compile(r"^[0-9a-f]{8,64}$")

log = logging.getLogger("hubd")


def alias_problem(name: str) -> str | None:
    """Why `name` cannot be an alias, or None."""
    if not ALIAS.match(name):
        return "an alias is a letter, then letters, digits, '_' or '-' (at most 100 characters)"
    if _HEX_ID.match(name):
        return "an alias must not look like a model id (8 or more hex digits)"
    return None


@dataclass
class Alias:
    name: str
    handle: str
    """The handle as the manifest wrote it (what a resolve of the alias fetches)."""
    canonical: str
    sha256: str | None
    sources: list[str] = field(default_factory=list)
    """The manifests that claim this name for this model (file paths, or who sent them)."""


@dataclass(frozen=True)
class Claim:
    name: str
    handle: str
    canonical: str
    sha256: str | None


class Catalog:
    def __init__(self, cache_dir: Path, fsync: bool = True) -> None:
        self.layout = CacheLayout(cache_dir)
        self.users_dir = self.layout.users
        self.aliases_path = self.layout.aliases
        self.fsync = fsync
        self._users: dict[str, frozenset[int]] = {}
        self._aliases: dict[str, Alias] = {}
        self._lock = threading.Lock()
        self.on_attribute: Callable[[str, int], None] | None = None
        """Called with (digest, uid) when a uid is new to an object: the index keeps per-user totals from it."""

    def load(self) -> None:
        self.users_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            data = json.loads(self.aliases_path.read_text())
            self._aliases = {name: Alias(**value) for name, value in data["aliases"].items()}
        except FileNotFoundError:
            self._aliases = {}
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "%s is unreadable (%s): no aliases until a manifest names them again", self.aliases_path, exc
            )
            self._aliases = {}

    # -- attribution ---------------------------------------------------------------------------------

    def users(self, digest: str) -> list[int]:
        return sorted(self._users_of(digest))

    def _users_of(self, digest: str) -> frozenset[int]:
        known = self._users.get(digest)
        if known is None:
            known = self._users[digest] = self._read_users(digest)
        return known

    def _read_users(self, digest: str) -> frozenset[int]:
        try:
            return frozenset(int(u) for u in json.loads(self._users_file(digest).read_text())["uids"])
        except (OSError, ValueError, KeyError, TypeError):
            return frozenset()

    def knows(self, digest: str, uid: int | None) -> bool:
        """Whether `attribute` has nothing to record (no uid, or one already recorded): a dict look-up."""
        return uid is None or uid in self._users_of(digest)

    def attribute(self, digest: str, uid: int | None) -> None:
        """Record that `uid` asked for the object (once per uid; a failure to write is only logged).

        The record is read again under a lock shared with every process on the cache before it is rewritten:
        the daemon and an in-process `hubd pull` each remember the uids they have seen, and rewriting from that
        memory alone dropped the uids the other process had added since."""
        if uid is None or self.knows(digest, uid):
            return
        with self._lock:
            uids = self._users_of(digest) | {uid}
            try:
                with flocked(self.layout.lock("users")):
                    uids |= self._read_users(digest)
                    self._write(self._users_file(digest), {"uids": sorted(uids)}, 0o600)
            except OSError as exc:  # the lock or the write: a request never fails for its attribution
                log.warning("the users of %s were not recorded: %s", digest[:12], exc)
            self._users[digest] = uids
        if self.on_attribute is not None:
            self.on_attribute(digest, uid)

    def forget(self, digest: str) -> None:
        self._users.pop(digest, None)
        self._users_file(digest).unlink(missing_ok=True)

    def _users_file(self, digest: str) -> Path:
        return self.layout.user_record(digest)

    # -- aliases -------------------------------------------------------------------------------------

    def alias(self, name: str) -> Alias | None:
        return self._aliases.get(name)

    def aliases_for(self, canonicals: Iterable[str]) -> list[str]:
        wanted = set(canonicals)
        return sorted(a.name for a in self._aliases.values() if a.canonical in wanted)

    def claim(self, source: str, claims: list[Claim]) -> None:
        """Make `source`'s names point where its manifest says, all or nothing.

        A name another manifest already gives to a different model (another handle, or another sha256) is an
        error naming both manifests, and nothing changes. Names the source no longer claims lose it as a source
        (and go away when no manifest claims them)."""
        with self._lock:
            updated = {name: Alias(**asdict(alias)) for name, alias in self._aliases.items()}
            for alias in updated.values():
                if source in alias.sources:
                    alias.sources.remove(source)
            for claim in claims:
                existing = updated.get(claim.name)
                same = existing is not None and (existing.canonical, existing.sha256) == (
                    claim.canonical,
                    claim.sha256,
                )
                if existing is not None and existing.sources and not same:
                    raise AliasConflict(
                        f"the name {claim.name!r} is claimed by {existing.sources[0]} for {_model(existing)} "
                        f"and by {source} for {_model(claim)}",
                        "give one of the two models another name in one of the manifests",
                    )
                if existing is None or not same:
                    existing = Alias(claim.name, claim.handle, claim.canonical, claim.sha256)
                    updated[claim.name] = existing
                if source not in existing.sources:
                    existing.sources.append(source)
            updated = {name: alias for name, alias in updated.items() if alias.sources}
            if updated != self._aliases:
                data = {"aliases": {name: asdict(alias) for name, alias in sorted(updated.items())}}
                self._write(self.aliases_path, data, 0o644)
                self._aliases = updated

    def _write(self, path: Path, data: object, mode: int) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, sort_keys=True)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def claims_of(items: Iterable[tuple[str | None, str, str | None]], canonical: Callable[[str], str]) -> list[Claim]:
    """(name, handle, sha256) of manifest entries -> the claims of those that have a name."""
    return [
        Claim(name, handle, canonical(handle), sha256.lower() if sha256 else None)
        for name, handle, sha256 in items
        if name
    ]


def _model(alias: Alias | Claim) -> str:
    return alias.handle + (f" (sha256 {alias.sha256[:12]}...)" if alias.sha256 else "")
