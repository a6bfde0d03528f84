"""Resume spools (<cache>/partial/) are bounded: in bytes (HUBD_MAX_SPOOL_BYTES), per uid (SPOOLS_PER_UID) and in
age; they count against the quota and the free disk, and `hubd gc` drops them. Red team #10: one user pulling
many handles and leaving each just before its end filled partial/ past the quota and the disk (507 for everyone).

Each pull is held by the hosting server 4 KiB before its end (`Behaviour.pause_after`), the client leaves, and
the response is released; synchronisation is on the server's counters and on the daemon's open files, never on
sleeps."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubd.config import Settings
from hubd.engine import SPOOL_MAX_AGE
from hubd.fetch import SPOOLS_PER_UID, list_spools, trim_spools
from tests.daemon import Daemon, start_daemon
from tests.hosting import Behaviour, HostingServer
from tests.test_resume import _send_pull

MiB = 1 << 20


def _archive(seed: int, mib: int) -> bytes:
    """A SavedModel-shaped archive of about `mib` MiB (random weights: it does not compress)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (
            ("saved_model.pb", b"\x08\x01graph%d" % seed),
            ("variables/variables.index", b"index"),
            ("variables/variables.data-00000-of-00001", os.urandom(mib * MiB)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1)


def _partial(settings: Settings) -> Path:
    return settings.cache_dir / "partial"


def _spool_bytes(settings: Settings) -> int:
    partial = _partial(settings)
    return sum(p.lstat().st_size for p in partial.iterdir()) if partial.is_dir() else 0


def _parts(settings: Settings) -> list[Path]:
    partial = _partial(settings)
    return sorted(partial.glob("*.part")) if partial.is_dir() else []


QUICK_NOTICE = {"HUBD_STREAM_HEARTBEAT": "0.2"}
"""A client that leaves a held pull is noticed at the stream's next write: the heartbeat's, 5 s by default."""


def _wait_spools_closed(daemon: Daemon, settings: Settings, timeout: float = 30.0) -> None:
    """Until the daemon holds no file under partial/ open (every abandoned fetch has closed its spool)."""
    partial = str(_partial(settings))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fds = Path(f"/proc/{daemon.proc.pid}/fd")
        targets = []
        for fd in fds.iterdir():
            try:
                targets.append(os.readlink(fd))
            except OSError:
                continue
        if not any(target.startswith(partial + "/") for target in targets):
            return
        time.sleep(0.01)  # polling a condition (open files), not waiting for time to pass
    raise AssertionError("the daemon still holds a spool open")


def _wait_spooled(settings: Settings, path: str, size: int, timeout: float = 30.0) -> None:
    """Until the spool of `path` holds `size` bytes (the daemon read all that was sent, and waits for more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sidecar in _partial(settings).glob("*.json"):
            try:
                ours = f"/{path}?" in json.loads(sidecar.read_text())["url"]
                if ours and sidecar.with_suffix(".part").stat().st_size >= size:
                    return
            except (OSError, ValueError, KeyError):
                continue
        time.sleep(0.01)  # polling a condition (the spool's size), not waiting for time to pass
    raise AssertionError(f"the spool of {path} never reached {size} bytes")


def _abandon(
    daemon: Daemon, settings: Settings, hosting: HostingServer, path: str, data: bytes, spooled: int | None = None
) -> None:
    """Pull `path`, leave once all but its last 4 KiB were received (and `spooled` bytes spooled), wait until
    the daemon has given the fetch up, then let the held response go on."""
    hosting.add(path, data, Behaviour(pause_after=len(data) - 4096))
    sock = _send_pull(daemon, f"https://tfhub.dev/{path}")
    assert hosting.wait_sent(path, len(data) - 4096)
    _wait_spooled(settings, path, len(data) - 4096 if spooled is None else spooled)
    sock.close()  # the only waiter leaves: the fetch is cancelled, its spool kept for a resume
    _wait_spools_closed(daemon, settings)
    hosting.release(path)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop()


def test_many_abandoned_pulls_keep_partial_within_the_caps_and_gc_frees_them(
    settings: Settings, hosting: HostingServer, tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    cap = 8 * MiB
    env = {"HUBD_MAX_SIZE": str(40 * MiB), "HUBD_MAX_SPOOL_BYTES": str(cap), **QUICK_NOTICE}
    daemon = start_daemon(settings, tmp_path, env_extra=env)
    daemon_factory.append(daemon)
    tag = tmp_path.name[-12:]
    for i in range(5):
        _abandon(daemon, settings, hosting, f"abandon-{tag}-{i}/model/1", _archive(i, 3))
        _wait_spools_closed(daemon, settings)
        assert _spool_bytes(settings) <= cap  # at every moment, not only at the end
        assert len(_parts(settings)) <= SPOOLS_PER_UID
    _wait_spools_closed(daemon, settings)
    parts = _parts(settings)
    assert len(parts) == SPOOLS_PER_UID  # the newest ones, each a resumable prefix of its archive
    assert _spool_bytes(settings) <= cap
    for part in parts:
        assert json.loads(part.with_suffix(".json").read_text())["uid"] == os.getuid()

    reply = daemon.request("POST", "/v1/gc", {})
    assert reply.status == 200, reply.body
    report = reply.json()
    assert report["spools_dropped"] == SPOOLS_PER_UID
    assert report["spool_bytes_freed"] > 5 * MiB
    assert _parts(settings) == [] and _spool_bytes(settings) == 0

    victim = f"victim-{tag}/model/1"
    hosting.add(victim, _archive(99, 3))
    reply = daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{victim}"})
    assert reply.status == 200, reply.body


def test_the_byte_cap_drops_the_oldest_spool_and_never_lets_one_grow_past_it(
    settings: Settings, hosting: HostingServer, tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    cap = 5 * MiB  # room for one 3 MiB spool, not two
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_MAX_SPOOL_BYTES": str(cap), **QUICK_NOTICE})
    daemon_factory.append(daemon)
    tag = tmp_path.name[-12:]
    for i in range(3):
        _abandon(daemon, settings, hosting, f"bytecap-{tag}-{i}/model/1", _archive(i, 3))
        _wait_spools_closed(daemon, settings)
        assert _spool_bytes(settings) <= cap
        assert len(_parts(settings)) == 1  # the newest: the older one was dropped to make room

    big = f"bytecap-{tag}-big/model/1"  # larger than the cap: spooled only up to it, a resumable prefix
    data = _archive(7, 8)
    _abandon(daemon, settings, hosting, big, data, spooled=cap - 4096)
    _wait_spools_closed(daemon, settings)
    assert _spool_bytes(settings) <= cap
    reply = daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{big}"})
    assert reply.status == 200, reply.body
    assert hosting.range_requests[big] == 1  # resumed from the capped prefix, not from zero
    assert _parts(settings) == []


def _plant(partial: Path, key: str, uid: int, size: int, age: float) -> None:
    """A spool some earlier download left: its part, and a sidecar naming its uid, `age` seconds old."""
    partial.mkdir(mode=0o700, parents=True, exist_ok=True)
    (partial / f"{key}.part").write_bytes(b"\0" * size)
    sidecar = {"url": f"http://127.0.0.1:1/{key}", "resume_url": "", "validator": '"x"', "total": None, "uid": uid}
    (partial / f"{key}.json").write_text(json.dumps(sidecar))
    when = time.time() - age
    for name in (f"{key}.part", f"{key}.json"):
        os.utime(partial / name, (when, when))


def test_a_new_spool_ages_out_stale_ones_keeps_other_users_and_gc_dry_run_only_reports(
    settings: Settings, hosting: HostingServer, tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    daemon = start_daemon(settings, tmp_path, env_extra=QUICK_NOTICE)
    daemon_factory.append(daemon)
    partial = _partial(settings)
    _plant(partial, "a" * 32, 4242, 1000, age=SPOOL_MAX_AGE + 3600)  # planted after start: only a trim drops it
    _plant(partial, "b" * 32, 4242, 1000, age=60)
    _abandon(daemon, settings, hosting, f"dry-{tmp_path.name[-12:]}/model/1", _archive(3, 2))
    assert not (partial / f"{'a' * 32}.part").exists()  # too old: dropped when the new spool began
    assert (partial / f"{'b' * 32}.part").exists()  # another uid's, young: the per-uid cap is per uid
    assert len(_parts(settings)) == 2
    held = _spool_bytes(settings)
    reply = daemon.request("POST", "/v1/gc", {"dry_run": True})
    assert reply.status == 200, reply.body
    assert (reply.json()["spools_dropped"], reply.json()["spool_bytes_freed"]) == (2, held)
    assert _spool_bytes(settings) == held


def test_trim_spools_caps_per_uid_and_bytes_oldest_first(tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    for n, (uid, age) in enumerate([(1, 50), (1, 40), (1, 30), (2, 20), (2, 10)]):
        _plant(partial, f"{n}" * 32, uid, 1000, age)
    dropped = trim_spools(partial, uid=1, per_uid=2)  # room for one more of uid 1: its two oldest go
    assert sorted(spool.key for spool in dropped) == ["0" * 32, "1" * 32]
    dropped = trim_spools(partial, max_bytes=3000, want=1500)  # 3 x 1 KB spools + 1.5 KB wanted > 3 KB
    assert [spool.key for spool in dropped] == ["2" * 32, "3" * 32]
    assert [spool.key for spool in list_spools(partial)] == ["4" * 32]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs, so that a full disk is real (skipped where mounting is not allowed)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_spools_filling_the_disk_do_not_refuse_another_users_fetch(
    settings: Settings, hosting: HostingServer, tmp_path: Path, small_fs: Path, daemon_factory: list[Daemon]
) -> None:
    settings = settings.model_copy(update={"cache_dir": small_fs / "cache"})
    daemon = start_daemon(settings, tmp_path, env_extra={"HUBD_MAX_SPOOL_BYTES": str(16 * MiB), **QUICK_NOTICE})
    daemon_factory.append(daemon)
    tag = tmp_path.name[-12:]
    for i in range(4):
        _abandon(daemon, settings, hosting, f"fill-{tag}-{i}/model/1", _archive(i, 6))
    _wait_spools_closed(daemon, settings)
    assert 10 * MiB < _spool_bytes(settings) <= 16 * MiB
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    with open(small_fs / "filler", "wb") as filler:  # what other files took: 4 MiB are left
        filler.write(b"\0" * (free - 4 * MiB))

    victim = f"fill-victim-{tag}/model/1"
    hosting.add(victim, _archive(99, 6))
    reply = daemon.request("POST", "/v1/resolve", {"handle": f"https://tfhub.dev/{victim}"})
    assert reply.status == 200, reply.body  # idle spools were dropped to make room, oldest first
    assert _spool_bytes(settings) <= 16 * MiB


def test_a_spool_file_removed_while_spools_are_listed_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the 64-client load test: a file listed, then removed by a publish before its lstat, made an empty
    group and a 500 (`max()` of nothing). The race is made deterministic by listing a name that is already gone."""
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / ("a" * 32 + ".part")).write_bytes(b"x" * 10)
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: [*listdir(path), "b" * 32 + ".part", "b" * 32 + ".json"])
    assert [(spool.key, spool.size) for spool in list_spools(partial)] == [("a" * 32, 10)]
