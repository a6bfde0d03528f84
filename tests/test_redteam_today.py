"""Attacks on the day's changes: the quota's totals row (a fetch under its quota no longer reads every meta),
the prefetch CPU gate, and the writeback kick during extraction. Real daemons, a real hosting server, real
in-process `hubd` processes on the same cache; the gate's scheduling with its own event loop."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubd.config import Settings
from hubd.index import Index
from hubd.layout import open_cache
from hubd.prefetch_gate import CpuMeter, PrefetchGate
from hubd.store import ObjectMeta, Store
from hubd.writeback import WRITEBACK_STEP
from tests import hostile
from tests.conftest import Upstream, cli_env
from tests.daemon import Daemon, UnixHTTPConnection, call, start_daemon
from tests.unit.test_index import published
from tests.users import LocalUser, shared_dir

WEIGHTS = 256 << 10
"""Each synthetic model's weights: the quota below is counted in these."""


def _model(seed: bytes, weights: int = WEIGHTS) -> bytes:
    """A small SavedModel-shaped archive whose weights (and so digest) differ by `seed`."""
    block = hashlib.sha256(seed).digest() * (1 << 10)  # 32 KiB, cheap to make, distinct per seed
    data = (block * (weights // len(block) + 1))[:weights]
    return hostile._tar(
        [
            *hostile.saved_model_members(),
            hostile._file("variables/variables.index", b"index"),
            hostile._file("variables/variables.data-00000-of-00001", data),
        ]
    )


def _resolve(daemon: Daemon, handle: str) -> dict[str, object]:
    reply = daemon.request("POST", "/v1/resolve", {"handle": handle})
    assert reply.status == 200, reply.body
    body: dict[str, object] = reply.json()
    return body


def _published_bytes(cache: Path) -> int:
    """What the published models take by the files (the source of truth), not by the index."""
    store = Store(cache, fsync=False)
    present = store.object_digests()
    return sum(meta.size_bytes for meta in store.iter_meta() if meta.digest in present)


# -- the quota: can the totals row under-report, so that nothing is evicted? --------------------------------------


def test_a_crashed_in_process_pull_beside_the_daemon_cannot_take_the_cache_past_its_quota(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    """`hubd pull` works in its own process when no daemon answers its socket (a per-user daemon restarting, a
    HUBD_SOCKET that differs) on the very cache the daemon serves. Killed between its publish and its index
    update, it leaves a model the daemon's totals row never counts: the daemon must still find it over quota
    (before the totals row, every fetch with a quota read the files; with the row alone it evicted nothing)."""
    a, b, c = (f"https://tfhub.dev/{upstream.publish(_model(name))}" for name in (b"a", b"b", b"c"))
    quota = WEIGHTS * 5 // 2  # two models fit, three do not
    env = {"HUBD_MAX_SIZE": str(quota), "HUBD_GC_GRACE": "0"}
    daemon = start_daemon(settings, tmp_path, env_extra=env)
    try:
        _resolve(daemon, a)
        crashed = subprocess.run(
            [sys.executable, "-m", "hubd", "pull", "-q", b],
            env={**cli_env(settings), **env, "HUBD_TEST_FAULT": "kill:done"},  # killed before its index update
            capture_output=True,
            timeout=120,
        )
        assert crashed.returncode == -9, crashed.stderr
        assert len(Store(settings.cache_dir, fsync=False).object_digests()) == 2  # a's, and b's on disk
        _resolve(daemon, c)
        assert _published_bytes(settings.cache_dir) <= quota, daemon.log()
    finally:
        daemon.stop()


def test_a_publish_that_lands_while_the_index_is_rebuilt_never_makes_the_totals_under_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild (a corrupt or replaced index, repaired while the daemon serves) lists meta/, then writes the
    totals it counted; a publish whose index update lands in between is overwritten out of the totals row while
    its entry row stays. The row may then say less than the files hold: it must not be believed. The interleaving
    is forced in one thread, where the rebuild's listing ends."""
    store = open_cache(Store(tmp_path / "cache", fsync=False))
    index = Index(store)
    index.rebuild_if_needed()
    index.record(published(store, 1, "tfhub.dev/a/one/1"))
    listed = store.iter_meta
    late: list[ObjectMeta] = []

    def listing_then_a_publish() -> Iterator[ObjectMeta]:
        yield from listed()
        late.append(published(store, 2, "tfhub.dev/a/two/1"))  # another fetch publishes and indexes now
        index.record(late[0])

    monkeypatch.setattr(store, "iter_meta", listing_then_a_publish)
    index.rebuild()
    monkeypatch.undo()
    assert late and index.summary(late[0].digest) is not None
    by_files = sum(meta.size_bytes for meta in store.iter_meta())
    assert index.size_bytes() in (None, by_files)


HOLD_THE_WAL_WRITE_LOCK = """
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 120)  # the WAL-index's write-lock byte: no writer begins
except OSError as exc:
    print("refused", exc, flush=True)
else:
    print("locked", flush=True)
sys.stdin.read()  # held until the test closes stdin
"""


@pytest.mark.slow
def test_a_local_user_cannot_stall_every_publish_and_hit_by_locking_the_index(
    settings: Settings, upstream: Upstream, attacker: LocalUser, tmp_path: Path
) -> None:
    """The index is only the daemon's: no client reads it. But its directory is world-readable, and a POSIX read
    lock on one byte of cache.db-shm (opened read-only) keeps every SQLite writer out; diskcache retries a
    transaction forever, so each fetch stalls in its publish and each hit in its index update for as long as the
    attacker likes (found while attacking the quota's totals row through the index's permissions)."""
    with shared_dir() as public:
        shared = settings.model_copy(update={"cache_dir": public / "cache"})
        daemon = start_daemon(shared, tmp_path)
        try:
            cached, new = (f"https://tfhub.dev/{upstream.publish(_model(name))}" for name in (b"hit", b"miss"))
            _resolve(daemon, cached)
            with subprocess.Popen(
                ["/usr/bin/python3", "-c", HOLD_THE_WAL_WRITE_LOCK, str(public / "cache/index/cache.db-shm")],
                user=attacker.uid,
                group=attacker.gid,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin", "HOME": str(attacker.home)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            ) as holder:
                try:
                    assert holder.stdout is not None and holder.stdout.readline()  # locked, or refused
                    for handle in (new, cached):
                        conn = UnixHTTPConnection(str(daemon.socket_path), timeout=4)  # a hit takes milliseconds
                        try:
                            reply = call(conn, "POST", "/v1/resolve", {"handle": handle})
                        finally:
                            conn.close()
                        assert reply.status == 200, reply.body
                finally:
                    holder.kill()
        finally:
            daemon.stop()


# -- the prefetch gate: can a waiting prefetch leak a slot, or wait forever? ------------------------------------


class _Busy(CpuMeter):
    """A daemon whose CPU someone else keeps busy: the gate never sees a core to spare."""

    def __init__(self) -> None:
        pass

    def cores_busy(self) -> float | None:
        return 1.9


async def _hold(gate: PrefetchGate, entered: asyncio.Event, leave: asyncio.Event) -> None:
    async with gate:
        entered.set()
        await leave.wait()


def test_prefetches_cancelled_while_they_wait_at_the_gate_or_run_leave_no_slot_taken() -> None:
    """A client that disconnects cancels its prefetch's fetches (`resolve_many` cancels its worker): those
    waiting at the gate, whatever point of their poll the cancel reaches (even as the poll's own timeout fires),
    must end cancelled without taking a slot, and those running must give theirs back."""

    async def scenario() -> None:
        gate = PrefetchGate(limit=4, cores=2, meter=_Busy(), poll=0.0005, stalled_after=3600)
        leave = asyncio.Event()
        first_in = asyncio.Event()
        first = asyncio.create_task(_hold(gate, first_in, leave))
        await first_in.wait()
        for turns in range(60):  # cancel at every point of a waiter's polling loop
            waiter_in = asyncio.Event()
            waiter = asyncio.create_task(_hold(gate, waiter_in, leave))
            for _ in range(turns):
                await asyncio.sleep(0)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            assert waiter.cancelled() and not waiter_in.is_set()
            assert gate._running == 1
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert gate._running == 0
        again = asyncio.Event()
        after = asyncio.create_task(_hold(gate, again, leave))
        await asyncio.wait_for(again.wait(), 10)  # nothing was leaked: the next fetch starts at once
        leave.set()
        await after

    asyncio.run(scenario())


def test_a_fetch_stuck_on_a_slow_upstream_does_not_hold_back_the_rest_of_a_busy_daemons_prefetch() -> None:
    """An upstream may dribble a byte each `read_timeout` and keep one fetch alive indefinitely; with the
    daemon's CPU busy (other users' work) the gate admitted nothing else while it ran, so every other model of
    the manifest waited behind it (with the semaphore before, three of them kept moving). A fetch that neither
    ends nor lets another start for `stalled_after` seconds lets the next one in."""

    async def scenario() -> None:
        now = [1000.0]
        gate = PrefetchGate(limit=4, cores=2, meter=_Busy(), poll=0.001, stalled_after=30.0, clock=lambda: now[0])
        stuck_in, second_in, leave = asyncio.Event(), asyncio.Event(), asyncio.Event()
        stuck = asyncio.create_task(_hold(gate, stuck_in, leave))
        await stuck_in.wait()
        second = asyncio.create_task(_hold(gate, second_in, leave))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not second_in.is_set()  # busy: the second waits, as the gate intends
        now[0] += 30.0  # the first has neither ended nor let anything start for that long
        await asyncio.wait_for(second_in.wait(), 10)
        leave.set()
        await asyncio.gather(stuck, second)

    asyncio.run(scenario())


# -- the writeback kick: exact content around its 16 MiB steps, on the descriptors being written ----------------

STEP = WRITEBACK_STEP
SIZES = {"under": STEP - 1, "at": STEP, "over": STEP + 1, "two_under": 2 * STEP - 1, "two_over": 2 * STEP + 1}
"""Files just under, at and over one and two writeback steps."""


def _blocks(seed: bytes, size: int) -> bytes:
    """`size` bytes of 4 KiB blocks that each name their file and position: any block written twice, dropped or
    moved changes the file's digest (and they compress, so the archive is quick to build)."""
    count = (size + 4095) // 4096
    return b"".join(seed.ljust(8, b".") + index.to_bytes(8, "big") * 511 for index in range(count))[:size]


@pytest.mark.slow
def test_files_around_each_writeback_step_are_published_exactly_and_kicked_only_where_written(
    settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    """Through a real daemon with fsync on (the only case that kicks writeback), on this disk: every file's bytes
    are the archive's, and (traced with strace where it is installed) every sync_file_range the daemon made
    named the start of a file's bytes or continued where the last stopped, a step or more at a time, within the
    file, and succeeded."""
    contents = {name: _blocks(name.encode(), size) for name, size in SIZES.items()}
    members = [hostile._file(f"variables/{name}.bin", data) for name, data in contents.items()]
    raw = hostile._tar(
        [
            *hostile.saved_model_members(),
            hostile._file("variables/variables.index", b"i"),
            hostile._file("variables/variables.data-00000-of-00001", b"d"),
            *members,
        ],
        compress=False,
    )
    handle = f"https://tfhub.dev/{upstream.publish(gzip.compress(raw, 1))}"
    trace = tmp_path / "sync_file_range.trace"
    strace = shutil.which("strace")
    daemon = start_daemon(settings.model_copy(update={"fsync": True}), tmp_path, env_extra={"HUBD_FSYNC": "1"})
    try:
        tracer = None
        if strace is not None:  # attached to every thread of the running daemon; it says so on stderr
            command = [strace, "-f", "-p", str(daemon.proc.pid), "-e", "trace=sync_file_range", "-o", str(trace)]
            tracer = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
            assert tracer.stderr is not None and "attached" in tracer.stderr.readline()
        try:
            entry = _resolve(daemon, handle)
        finally:
            if tracer is not None:
                tracer.terminate()  # detaches, leaving the daemon running
                tracer.communicate(timeout=30)
    finally:
        daemon.stop()
    tree = Path(str(entry["path"]))
    for name, data in contents.items():
        on_disk = (tree / "variables" / f"{name}.bin").read_bytes()
        assert len(on_disk) == len(data) and hashlib.sha256(on_disk).digest() == hashlib.sha256(data).digest(), (
            name
        )
    if strace is None:
        return
    kicks = [
        (int(offset), int(length), result)
        for offset, length, result in re.findall(
            r"sync_file_range\(\d+, (\d+), (\d+), SYNC_FILE_RANGE_WRITE\) = (\S+)", trace.read_text()
        )
    ]
    assert all(result == "0" for _, _, result in kicks), kicks
    assert all(length >= STEP and offset + length <= max(SIZES.values()) for offset, length, _ in kicks), kicks
    starts = [index for index, (offset, _, _) in enumerate(kicks) if offset == 0]
    assert len(starts) == sum(size >= STEP for size in SIZES.values()), kicks  # one run of kicks per large file
    for (last_offset, last_length, _), (offset, _, _) in itertools.pairwise(kicks):
        assert offset in (0, last_offset + last_length), kicks  # a file's next kick goes on from its last
