"""hubd.prefetch_gate: a prefetch runs one fetch always, more only while the daemon leaves a core idle."""

from __future__ import annotations

import asyncio

import pytest

from hubd.prefetch_gate import SAMPLE_SECONDS, CpuMeter, PrefetchGate


class FixedMeter(CpuMeter):
    """Reports `busy` cores (None: the window is not long enough yet)."""

    def __init__(self, busy: float | None) -> None:
        self.busy = busy

    def cores_busy(self) -> float | None:
        return self.busy


async def _start(gate: PrefetchGate, entered: asyncio.Event, leave: asyncio.Event) -> None:
    async with gate:
        entered.set()
        await leave.wait()


async def _settle() -> None:
    """Let every task that can run, run (loop turns, not wall time)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_the_meter_judges_only_a_full_window_and_counts_cores() -> None:
    now, cpu = [100.0], [5.0]
    meter = CpuMeter(clock=lambda: now[0], cpu_seconds=lambda: cpu[0])
    now[0] += SAMPLE_SECONDS / 2
    assert meter.cores_busy() is None  # too short a window to judge
    now[0] += SAMPLE_SECONDS / 2
    cpu[0] += 1.5 * SAMPLE_SECONDS  # 1.5 cores busy over the window
    assert meter.cores_busy() == pytest.approx(1.5)
    now[0] += SAMPLE_SECONDS
    assert meter.cores_busy() == pytest.approx(0.0)  # judged from the last mark, not from the start


@pytest.mark.parametrize(("busy", "admitted"), [(1.6, 1), (None, 1), (0.2, 4)])
def test_a_fetch_beyond_the_first_needs_a_core_to_spare_and_the_limit_holds(
    busy: float | None, admitted: int
) -> None:
    async def scenario() -> None:
        gate = PrefetchGate(limit=4, cores=2, meter=FixedMeter(busy), poll=3600)
        leave = asyncio.Event()
        entered = [asyncio.Event() for _ in range(6)]
        tasks = [asyncio.create_task(_start(gate, e, leave)) for e in entered]
        await _settle()
        assert sum(e.is_set() for e in entered) == admitted
        leave.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)  # each that leaves lets another in: all finish
        assert gate.peak == admitted

    asyncio.run(scenario())


def test_a_busy_machine_still_moves_one_fetch_at_a_time() -> None:
    async def scenario() -> None:
        gate = PrefetchGate(limit=4, cores=2, meter=FixedMeter(1.9), poll=3600)
        first_in, second_in, first_out, second_out = (asyncio.Event() for _ in range(4))
        first = asyncio.create_task(_start(gate, first_in, first_out))
        second = asyncio.create_task(_start(gate, second_in, second_out))
        await _settle()
        assert first_in.is_set() and not second_in.is_set()
        first_out.set()  # the first one's end wakes the waiter at once, without waiting for the poll
        await asyncio.wait_for(second_in.wait(), 10)
        second_out.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)

    asyncio.run(scenario())


def test_a_one_core_machine_never_runs_two() -> None:
    async def scenario() -> None:
        gate = PrefetchGate(limit=4, cores=1, meter=FixedMeter(0.0), poll=3600)
        leave = asyncio.Event()
        entered = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(_start(gate, e, leave)) for e in entered]
        await _settle()
        assert sum(e.is_set() for e in entered) == 1
        leave.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    asyncio.run(scenario())
