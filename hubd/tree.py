"""What an extracted tree holds (`TreeListing`), its digest, and the rules every published tree obeys.

The tree digest (layout version 2) is the sha256 of a version tag and one JSON-encoded record per file and
symlink, sorted by path. JSON escapes every control character and quote, so a path can never be mistaken for
the end of one record and the start of another: two different trees cannot share a digest unless sha256
collides. Layout version 1 joined ``f <path> <size> <sha256>`` lines, which a path holding a newline could
forge; `legacy_digest` still computes it, for migrating old caches only.

Links are judged against the whole tree, never lexically: `link_problems` follows every link component by
component through the tree's own links and refuses any that leaves the tree, loops or dangles.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

DIGEST_TAG = b"hubd-tree-v2\n"
MAX_LINK_HOPS = 40
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# The files TensorFlow reads to load a model: always regular files, never reached through a link.
PROTECTED_FILES = frozenset({"saved_model.pb", "saved_model.pbtxt", "fingerprint.pb"})
PROTECTED_DIR = "variables"


@dataclass
class FileRecord:
    size: int
    sha256: str


@dataclass
class TreeListing:
    """What an extracted tree holds: files with sizes and digests, symlinks with their targets. (A prefetch
    manifest, the list of models to fetch, is another thing: hubd.manifest.)"""

    files: dict[str, FileRecord] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    @property
    def total_bytes(self) -> int:
        return sum(record.size for record in self.files.values())

    def digest(self) -> str:
        """A digest of the tree's content alone: equal trees get equal digests, whatever archive carried them."""
        digest = hashlib.sha256(DIGEST_TAG)
        for path, rec in sorted(self.files.items()):
            digest.update(json.dumps(["f", path, rec.size, rec.sha256]).encode() + b"\n")
        for path, target in sorted(self.symlinks.items()):
            digest.update(json.dumps(["l", path, target]).encode() + b"\n")
        return digest.hexdigest()

    def legacy_digest(self) -> str:
        """Layout version 1's digest (ambiguous: paths may hold newlines). Only for migrating old caches."""
        lines = [f"f {path} {rec.size} {rec.sha256}" for path, rec in sorted(self.files.items())]
        lines += [f"l {path} {target}" for path, target in sorted(self.symlinks.items())]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def all_dirs(self) -> set[str]:
        """Every directory of the tree, including those only implied by a deeper member."""
        found = {""}
        for path in [*self.files, *self.symlinks, *self.dirs]:
            parts = path.split("/")
            end = len(parts) if path in self.dirs else len(parts) - 1
            found.update("/".join(parts[:i]) for i in range(1, end + 1))
        return found

    def name_problems(self) -> list[str]:
        """Member names that hubd refuses: control characters (newlines included) anywhere in a path."""
        return [f"{path!r}: control character in a name" for path in self._names() if CONTROL_CHARS.search(path)]

    def link_problems(self) -> list[str]:
        """Links that leave the tree, loop, dangle, or stand where TensorFlow expects a regular file."""
        problems: list[str] = []
        dirs = self.all_dirs()
        for name, target in sorted(self.symlinks.items()):
            if name in PROTECTED_FILES or name == PROTECTED_DIR or name.startswith(PROTECTED_DIR + "/"):
                problems.append(f"{name!r}: must be a regular file or directory, not a link")
                continue
            if CONTROL_CHARS.search(target):
                problems.append(f"{name!r}: control character in the link target")
                continue
            why = self._resolve(name, dirs)
            if why:
                problems.append(f"{name!r} -> {target!r}: {why}")
        return problems

    def _resolve(self, name: str, dirs: set[str]) -> str | None:
        """Follow `name` through the tree as the kernel would; None when it ends at a member inside the tree."""
        todo = list(reversed(name.split("/")))
        stack: list[str] = []
        hops = 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not stack:
                    return "leaves the model directory"
                stack.pop()
                continue
            path = "/".join([*stack, part])
            if path in self.symlinks:
                hops += 1
                if hops > MAX_LINK_HOPS:
                    return "too many levels of links (a loop)"
                target = self.symlinks[path]
                if target.startswith("/"):
                    return "absolute link target"
                todo.extend(reversed(target.split("/")))
                continue
            if path in self.files:
                if any(rest not in ("", ".") for rest in todo):
                    return "goes through a file as if it were a directory"
                stack.append(part)
                continue
            if path in dirs:
                stack.append(part)
                continue
            return "points at nothing in the model"
        return None

    def _names(self) -> list[str]:
        return [*self.files, *self.symlinks, *self.dirs]

    def to_json(self) -> dict[str, Any]:
        return {
            "files": {p: {"size": r.size, "sha256": r.sha256} for p, r in sorted(self.files.items())},
            "symlinks": dict(sorted(self.symlinks.items())),
            "dirs": sorted(self.dirs),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TreeListing:
        return cls(
            files={p: FileRecord(int(r["size"]), str(r["sha256"])) for p, r in data.get("files", {}).items()},
            symlinks=dict(data.get("symlinks", {})),
            dirs=set(data.get("dirs", [])),
        )
