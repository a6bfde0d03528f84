"""A directory laid out like tensorflow_hub's TFHUB_CACHE_DIR, pointing at published entries.

tensorflow_hub (0.16.1, `compressed_module_resolver`) caches a handle in `<cache>/<sha1(handle)>` and treats an
existing, non-empty directory there as a hit, with no network and no lock. So `tfhub_modules/<sha1>` is a
relative symlink to `../objects/<digest>` for every spelling of every cached handle, and an unmodified program
with `TFHUB_CACHE_DIR=<cache root>/tfhub_modules` loads every cached model offline. The sha1 is of the handle
string exactly as written, so the usual spellings each get a link. Links of broken or removed entries are
dropped, so tensorflow_hub never loads a damaged tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from hubd_client.handles import AnyHost, parse_handle
from hubd_client.kinds import KINDS
from hubd_client.layout import VIEW, descriptor_of, view_target

from hubd.errors import HubdError
from hubd.store import Ref, Store

VIEW_DIR = VIEW


def spellings(handle: str) -> set[str]:
    """The handle strings people write for the same model: the handle, its kind's spellings (`HubKind.spellings`),
    each with and without a trailing slash."""
    try:
        source = parse_handle(handle, AnyHost())
    except HubdError:
        return {handle}
    names = {handle, *KINDS[source.kind].spellings(source)}
    return names | {f"{name}/" for name in names}


def link_name(handle: str) -> str:
    return hashlib.sha1(handle.encode("utf8")).hexdigest()


class TfhubView:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.layout.view

    def link(self, ref: Ref) -> None:
        self.root.mkdir(mode=0o755, exist_ok=True)
        target = view_target(ref.digest)
        for handle in _linked_spellings(ref):
            name = link_name(handle)
            _replace_symlink(self.store.layout.view_link(name), target)
            descriptor = self.store.layout.view_descriptor(name)
            if not descriptor.exists():  # written whole or not at all: a full disk must not leave an empty one
                _replace_file(descriptor, f"Module: {handle}\nServed by: hubd ({ref.canonical})\n")

    def unlink_refs(self, digest: str, refs: Iterable[Ref]) -> None:
        """Remove the links `link` made for `refs` that still point at `digest`, and their descriptors: a few
        look-ups, where `unlink_digest` reads every link in the view (100,000 models have several each)."""
        self._unlink_if_at(digest, {spelling for ref in refs for spelling in _linked_spellings(ref)})

    def unlink_dropped(self, before: Ref, now: Ref) -> None:
        """A ref was rewritten (fetched again under another spelling, or re-pointed at another object): remove
        the links `before` had and `now` has not, where they still point at before's object. So every link to an
        object stays a spelling of a ref to it, which is what lets `unlink_refs` find them all; a spelling left
        behind would outlive a removal, or hand tensorflow_hub the old model after the handle moved on."""
        self._unlink_if_at(before.digest, _linked_spellings(before) - _linked_spellings(now))

    def _unlink_if_at(self, digest: str, handles: Iterable[str]) -> None:
        """Remove the links named after `handles` that point at `digest` (a link elsewhere is another's)."""
        target = view_target(digest)
        for handle in handles:
            link = self.store.layout.view_link(link_name(handle))
            with contextlib.suppress(OSError):  # no such link, or not a link
                if os.readlink(link) == target:
                    _remove_link(link)

    def unlink_spelling(self, handle: str) -> None:
        """Remove the links named after `handle` as written (and with a trailing slash), and their descriptors."""
        for spelling in (handle, handle + "/"):
            _remove_link(self.store.layout.view_link(link_name(spelling)))

    def unlink_digest(self, digest: str) -> None:
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.is_symlink() and os.readlink(entry).endswith(digest):
                _remove_link(entry)

    def links_by_target(self) -> dict[str, list[Path]]:
        """digest -> the links to its object, in one directory listing (for removing many objects at once)."""
        links: dict[str, list[Path]] = {}
        if not self.root.is_dir():
            return links
        for entry in self.root.iterdir():
            if entry.is_symlink():
                links.setdefault(os.path.basename(os.readlink(entry)), []).append(entry)
        return links

    def remove_links(self, links: Iterable[Path]) -> None:
        """Remove links (from `links_by_target`) and their descriptors."""
        for link in links:
            _remove_link(link)

    def rebuild(self) -> None:
        """Link every healthy ref; drop links to objects that are gone or quarantined."""
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.is_symlink() and not entry.exists():
                    _remove_link(entry)
        for ref in self.store.iter_refs():
            if self.store.layout.object(ref.digest).is_dir():
                self.link(ref)


def _linked_spellings(ref: Ref) -> set[str]:
    """Every handle string a ref is linked under: the spellings of the handle it was fetched by and of its name."""
    return spellings(ref.handle) | spellings(f"https://{ref.canonical}")


def _replace_symlink(path: Path, target: str) -> None:
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _remove_link(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(FileNotFoundError):
        descriptor_of(path).unlink()
