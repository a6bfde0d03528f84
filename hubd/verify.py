"""Checks that a tree is a complete SavedModel and still the tree that was published.

Three depths, cheapest first: `structural_problems` (is this a loadable SavedModel layout at all),
`quick_problems` (every recorded file present with its recorded size: cheap enough for every cache hit) and
`full_problems` (every byte re-hashed against the listing, and nothing added).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from contextlib import suppress
from pathlib import Path

from hubd_client.layout import quick_problems as _quick

from hubd.tree import PROTECTED_DIR, PROTECTED_FILES, TreeListing

_SHARD = re.compile(r"^variables\.data-(\d{5})-of-(\d{5})$")
_HASH_CHUNK = 1 << 20


def structural_problems(tree: Path) -> list[str]:
    """What keeps `tree` from being a SavedModel: missing graph, or variables whose shards do not add up."""
    problems = _link_problems(tree)
    graphs = [tree / name for name in ("saved_model.pb", "saved_model.pbtxt")]
    present = [g for g in graphs if g.is_file()]
    if not present:
        problems.append("no saved_model.pb or saved_model.pbtxt at the top of the archive")
    elif all(g.stat().st_size == 0 for g in present):
        problems.append("saved_model.pb is empty")
    variables = tree / "variables"
    if variables.is_dir():
        names = {p.name for p in variables.iterdir()}
        shards = [m for m in (_SHARD.match(n) for n in names) if m]
        has_index = "variables.index" in names
        if shards and not has_index:
            problems.append("variables/variables.index is missing")
        if has_index and not shards:
            problems.append("variables/variables.index has no data shards")
        if shards:
            counts = {int(m.group(2)) for m in shards}
            if len(counts) != 1:
                problems.append("variables data shards disagree on the shard count")
            else:
                total = counts.pop()
                found = {int(m.group(1)) for m in shards}
                missing = sorted(set(range(total)) - found)
                if missing:
                    problems.append(f"variables data shards missing: {missing} of {total}")
    return problems


def quick_problems(tree: Path, listing: TreeListing) -> list[str]:
    """Every recorded file exists with its recorded size; every recorded link still points where it did (the
    check the client's offline reader runs too: one implementation, in hubd_client.layout)."""
    return _quick(tree, ((n, r.size) for n, r in listing.files.items()), listing.symlinks)


def _link_problems(tree: Path) -> list[str]:
    """The files TensorFlow loads are regular files in real directories, never links (nor reached through one)."""
    problems: list[str] = []
    for name in sorted(PROTECTED_FILES):
        with suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(tree / name).st_mode):
                problems.append(f"{name} is not a regular file")
    variables = tree / PROTECTED_DIR
    with suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(variables).st_mode):
            return [*problems, "variables is not a directory"]
        for entry in os.scandir(variables):
            if not entry.is_file(follow_symlinks=False):
                problems.append(f"variables/{entry.name} is not a regular file")
    return problems


def full_problems(tree: Path, listing: TreeListing) -> list[str]:
    """`quick_problems`, plus every file's sha256 re-computed, plus anything added since publishing."""
    problems = quick_problems(tree, listing)
    if not tree.is_dir():
        return problems
    problems += listing.name_problems() + listing.link_problems() + _link_problems(tree)
    broken = {p.split(":", 1)[0] for p in problems}
    for name, record in listing.files.items():
        if name in broken:
            continue
        if _sha256_file(tree / name) != record.sha256:
            problems.append(f"{name}: content changed (sha256 mismatch)")
    known = set(listing.files) | set(listing.symlinks) | listing.all_dirs()  # sets: O(1) per path
    for dirpath, dirnames, filenames in os.walk(tree):
        rel_dir = os.path.relpath(dirpath, tree)
        for name in [*filenames, *dirnames]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel not in known:
                problems.append(f"{rel}: added after publishing")
    return problems


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
