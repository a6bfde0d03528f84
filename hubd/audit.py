"""The audit trail: who deleted, evicted, pinned, unpinned, quarantined, healed or imported which model, and how
it ended.

One JSON object per line in `<cache>/audit/audit.jsonl` (directory 0700, files 0600: the daemon's user and root
read it, admins through `GET /v1/audit`). Each record is appended with one `write` and fsynced before the
operation is reported done, so a record that a client saw acknowledged survives a crash. A crash in the middle of
a write leaves at most a torn last line: readers skip it, and the next writer ends it with a newline first. Past
`max_bytes` the file is rotated (`audit.jsonl.1` ... `.keep`, oldest dropped).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from hubd_client.layout import CacheLayout
from pydantic import BaseModel, ConfigDict

from hubd.actions import ACTIONS as ACTIONS
from hubd.actions import Action
from hubd.errors import BadRequest

MAX_BYTES = 10 * 2**20
KEEP = 5

log = logging.getLogger("hubd.audit")


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    time: float
    uid: int | None = None
    """Who asked (SO_PEERCRED on the socket); None for the daemon itself (eviction, the watcher, a manifest)."""
    user: str | None = None
    action: str
    model_id: str | None = None
    handle: str | None = None
    outcome: str = "ok"
    """"ok", or why it did not happen ("refused: ...", "failed: ...")."""
    detail: str = ""


class AuditLog:
    def __init__(self, cache_dir: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP, fsync: bool = True) -> None:
        self.dir = CacheLayout(cache_dir).audit
        self.path = self.dir / "audit.jsonl"
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self._lock = threading.Lock()

    def record(
        self,
        action: Action,
        uid: int | None = None,
        model_id: str | None = None,
        handle: str | None = None,
        outcome: str = "ok",
        detail: str = "",
    ) -> None:
        """Append one record, durably. A failure to write is logged, never fails the operation it describes."""
        entry = AuditRecord(
            time=time.time(),
            uid=uid,
            user=user_name(uid),
            action=action,
            model_id=model_id,
            handle=handle,
            outcome=outcome,
            detail=detail,
        )
        line = entry.model_dump_json().encode() + b"\n"
        try:
            with self._lock:
                self._append(line)
        except OSError as exc:
            log.error("audit record not written (%s): %s", exc, line.decode().strip())

    def _append(self, line: bytes) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the daemon and an in-process CLI may both write
            size = os.fstat(fd).st_size
            if size >= self.max_bytes:
                os.close(fd)
                fd = -1
                fd = self._rotate()
                size = 0
            if size and not _ends_with_newline(self.path, size):
                line = b"\n" + line  # a crash tore the last line: end it, so this record stays whole
            os.write(fd, line)
            if self.fsync:
                os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _rotate(self) -> int:
        """Shift audit.jsonl -> .1 -> .2 ...; returns a descriptor (locked) of the new, empty file."""
        with open(self.dir / ".rotate.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if os.stat(self.path).st_size >= self.max_bytes:  # nobody rotated while we waited
                self._rotated(self.keep).unlink(missing_ok=True)
                for n in range(self.keep - 1, 0, -1):
                    if self._rotated(n).exists():
                        os.replace(self._rotated(n), self._rotated(n + 1))
                os.replace(self.path, self._rotated(1))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.fsync:
                _fsync_dir(self.dir)
            return fd

    def _rotated(self, n: int) -> Path:
        return self.dir / f"audit.jsonl.{n}"

    def files(self) -> list[Path]:
        """Oldest first."""
        older = [self._rotated(n) for n in range(self.keep, 0, -1)]
        return [p for p in [*older, self.path] if p.exists()]

    def read(
        self,
        since: float | None = None,
        until: float | None = None,
        uid: int | None = None,
        action: str | None = None,
    ) -> Iterator[AuditRecord]:
        """Records in time order, filtered; lines that do not parse (a torn last line) are skipped."""
        for path in self.files():
            try:
                with open(path, "rb") as f:
                    lines = f.readlines()
            except FileNotFoundError:  # rotated away meanwhile
                continue
            for raw in lines:
                try:
                    entry = AuditRecord.model_validate_json(raw)
                except ValueError:
                    continue
                if since is not None and entry.time < since:
                    continue
                if until is not None and entry.time > until:
                    continue
                if uid is not None and entry.uid != uid:
                    continue
                if action is not None and entry.action != action:
                    continue
                yield entry


def user_name(uid: int | None) -> str | None:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def uid_of(user: str) -> int:
    """A uid from a number or an account name."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise BadRequest(f"no such user: {user!r}", "give an account name or a numeric uid") from None


def parse_time(text: str) -> float:
    """Seconds since the epoch, from a number or an ISO 8601 date/time (local time when no zone is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BadRequest(
            f"not a time: {text!r}", "give seconds since the epoch or an ISO 8601 time, e.g. 2026-11-26T09:00"
        ) from None


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
