"""hubd.audit: one durable JSON line per action, readable after a torn write, filtered, rotated by size."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from hubd.audit import AuditLog, parse_time, uid_of
from hubd.errors import BadRequest


def test_records_are_read_back_in_order_with_who_did_them(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync=False)
    log.record("pin", uid=0, model_id="a" * 64, handle="tfhub.dev/a/b/1")
    log.record("evict", None, "b" * 64, detail="10 bytes")
    records = list(log.read())
    assert [(r.action, r.uid, r.user) for r in records] == [("pin", 0, "root"), ("evict", None, None)]
    assert records[1].detail == "10 bytes" and records[0].time <= records[1].time


def test_the_trail_is_private_to_the_daemons_user(tmp_path: Path) -> None:
    AuditLog(tmp_path, fsync=False).record("delete", uid=0)
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "audit" / "audit.jsonl").stat().st_mode) == 0o600


def test_a_torn_last_line_is_skipped_and_the_next_record_stays_whole(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync=False)
    log.record("pin", uid=1)
    with open(log.path, "ab") as f:
        f.write(b'{"time": 1700000000.0, "uid": 0, "action": "del')  # a crash cut this write short
    log.record("unpin", uid=2)
    assert [(r.action, r.uid) for r in log.read()] == [("pin", 1), ("unpin", 2)]
    last = log.path.read_bytes().splitlines()[-1]
    assert json.loads(last)["action"] == "unpin"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"action": "pin"}, [1, 3]),
        ({"uid": 2}, [2]),
        ({"since": 2.0}, [2, 3]),
        ({"until": 2.0}, [1, 2]),
        ({"since": 2.0, "action": "pin"}, [3]),
    ],
)
def test_records_are_filtered_by_action_user_and_time(
    tmp_path: Path, filters: dict[str, object], expected: list[int]
) -> None:
    log = AuditLog(tmp_path, fsync=False)
    log.dir.mkdir()
    lines = [
        {"time": 1.0, "uid": 1, "action": "pin"},
        {"time": 2.0, "uid": 2, "action": "delete"},
        {"time": 3.0, "uid": 3, "action": "pin"},
    ]
    log.path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r.uid for r in log.read(**filters)] == expected  # type: ignore[arg-type]


def test_the_trail_is_rotated_by_size_and_keeps_the_newest(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, max_bytes=4096, keep=2, fsync=False)
    for n in range(200):
        log.record("pin", uid=n, model_id=f"{n:064x}")
    files = log.files()
    assert len(files) == 3  # audit.jsonl.2, .1 and the current one; older ones were dropped
    assert all(f.stat().st_size < 4096 + 1024 for f in files)
    kept = [uid for r in log.read() if (uid := r.uid) is not None]
    assert kept == sorted(kept) and kept[-1] == 199 and kept[0] > 0


def test_a_trail_that_cannot_be_written_is_logged_never_fails_the_action(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "audit").write_text("a file where the directory should be")
    with caplog.at_level(logging.ERROR, logger="hubd.audit"):
        AuditLog(tmp_path, fsync=False).record("delete", uid=0, model_id="c" * 64)
    assert "audit record not written" in caplog.text and "c" * 64 in caplog.text


def test_users_are_given_by_name_or_number() -> None:
    assert uid_of("root") == 0 and uid_of(str(os.getuid())) == os.getuid()
    with pytest.raises(BadRequest, match="no such user"):
        uid_of("no-such-user-hubd-test")


def test_times_are_epoch_seconds_or_iso_8601() -> None:
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2023-11-14T22:13:20+00:00") == 1700000000.0
    with pytest.raises(BadRequest, match="not a time"):
        parse_time("yesterday")
