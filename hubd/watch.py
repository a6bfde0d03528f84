"""watchdog observers: manifests the daemon prefetches, and published entries someone tampers with.

Observer threads only hand paths to the event loop; all work happens there, one check per entry at a time.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from hubd.config import Settings
from hubd.engine import Engine
from hubd.errors import BadRequest, HubdError
from hubd.manifest import load_manifest
from hubd.prefetch import pin_name

log = logging.getLogger("hubd.watch")

_CHANGES = (
    FileModifiedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileCreatedEvent,
    FileClosedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    DirCreatedEvent,
    DirModifiedEvent,
)


class _Forward(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, callback: object) -> None:
        self.loop = loop
        self.callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, _CHANGES):
            paths = [event.src_path, getattr(event, "dest_path", "")]
            for path in paths:
                if path:
                    self.loop.call_soon_threadsafe(self.callback, str(path))  # type: ignore[arg-type]


class Watchers:
    """Starts and stops both observers; `checked` and `prefetched` let callers (and tests) see their work."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._manifests = {p.resolve() for p in settings.manifests}
        self.events_seen = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        observer = Observer()
        if self.settings.watch_cache:
            observer.schedule(_Forward(loop, self._object_changed), str(self.engine.store.objects), recursive=True)
        for folder in {p.parent for p in self._manifests}:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BadRequest(
                    f"cannot watch manifests in {folder}: {exc.strerror}",
                    "create that directory for the daemon's user, or fix --manifest / HUBD_MANIFESTS",
                ) from None
            observer.schedule(_Forward(loop, self._manifest_changed), str(folder), recursive=False)
        observer.start()
        self._observer = observer
        self._tasks.append(loop.create_task(self._check_loop()))
        for manifest in self._manifests:
            self._tasks.append(loop.create_task(self._prefetch(manifest)))

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
        for task in self._tasks:
            task.cancel()

    # -- tampering ----------------------------------------------------------------------------------

    def _object_changed(self, path: str) -> None:
        """A path inside objects/<digest>/ changed: that entry gets re-verified. Top-level renames are ours."""
        try:
            relative = Path(path).relative_to(self.engine.store.objects)
        except ValueError:
            return
        if len(relative.parts) < 2:
            return  # publish, quarantine and removal rename whole object dirs
        self.events_seen += 1
        self._pending.add(relative.parts[0])
        self._wake.set()

    async def _check_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                digest = self._pending.pop()
                if len(digest) != 64 or not self.engine.store.object_path(digest).is_dir():
                    continue
                try:
                    reports = await self.engine.verify(digest, heal=True)
                except HubdError as exc:
                    log.warning("re-verifying %s failed: %s", digest[:12], exc)
                    continue
                for report in reports:
                    if report.problems:
                        state = "re-fetched" if report.healed else "quarantined until the network allows"
                        log.warning(
                            "entry %s changed on disk (%s); %s", digest[:12], "; ".join(report.problems), state
                        )

    # -- manifests ----------------------------------------------------------------------------------

    def _manifest_changed(self, path: str) -> None:
        resolved = Path(path).resolve()
        if resolved in self._manifests:
            self._tasks.append(asyncio.get_running_loop().create_task(self._prefetch(resolved)))

    async def _prefetch(self, path: Path) -> None:
        try:
            manifest = load_manifest(path)
        except HubdError as exc:
            log.warning("manifest %s ignored: %s", path, exc)
            return
        try:
            self.engine.claim_aliases(
                str(path), [(item.name, item.handle, item.sha256) for item in manifest.model]
            )
        except HubdError as exc:  # the models are still fetched; its names wait until the conflict is fixed
            log.error("the names in manifest %s are not used: %s (%s)", path, exc.message, exc.hint)
        for item in manifest.model:
            try:
                entry = await self.engine.resolve(item.handle, sha256=item.sha256, interactive=False)
                if item.pin:
                    self.engine.pin(entry.id, pin_name(item, str(path)))
            except HubdError as exc:
                log.warning("prefetch of %s from %s failed: %s", item.handle, path, exc)
