"""The eviction planner (#12 item 2): a pure function of the cache's state, checked with tables.

No daemon, no TensorFlow, no files: each case is a `CacheState`, a quota and a clock, and the plan it gives."""

from __future__ import annotations

import dataclasses

import pytest

from hubd.eviction import CachedEntry, CacheState, GcPlan, QuarantinedTree, plan

NOW = 1_000_000.0
GRACE = 600.0
OLD = NOW - 10 * GRACE


def entry(digest: str, size: int = 10, age: float = 0.0, **kwargs: object) -> CachedEntry:
    """An entry last used `age` seconds before OLD (so older ones have larger ages), outside the grace."""
    return CachedEntry(digest=digest, size=size, last_used=OLD - age, **kwargs)  # type: ignore[arg-type]


def evicted(result: GcPlan) -> list[str]:
    return [item.digest for item in result.to_evict]


# (case, entries, quota, need, protect, evicted in order, fits)
CASES = [
    ("no quota: nothing in use goes", [entry("a"), entry("b")], None, 0, (), [], True),
    ("fits already", [entry("a"), entry("b")], 20, 0, (), [], True),
    (
        "least recently used first",
        [entry("new", age=1), entry("old", age=3), entry("mid", age=2)],
        20,
        0,
        (),
        ["old"],
        True,
    ),
    (
        "just enough, in LRU order",
        [entry("a", age=3), entry("b", age=2), entry("c", age=1)],
        15,
        0,
        (),
        ["a", "b"],
        True,
    ),
    ("a big one alone is enough", [entry("small", 5, age=1), entry("big", 50, age=2)], 10, 0, (), ["big"], True),
    ("pins never", [entry("p", pinned=True, age=9), entry("a", age=1)], 10, 0, (), ["a"], True),
    ("grace period keeps recent use", [entry("a", age=1), CachedEntry("r", 10, NOW - 1)], 10, 0, (), ["a"], True),
    (
        "grace boundary: exactly `grace` old may go",
        [CachedEntry("edge", 10, NOW - GRACE)],
        0,
        0,
        (),
        ["edge"],
        True,
    ),
    (
        "the model being published never goes",
        [entry("new", age=9), entry("a", age=1)],
        10,
        0,
        ("new",),
        ["a"],
        True,
    ),
    (
        "orphans first, whatever their age",
        [entry("a", age=9), entry("o", referenced=False)],
        10,
        0,
        (),
        ["o"],
        True,
    ),
    ("orphans go without a quota", [entry("a"), entry("o", referenced=False)], None, 0, (), ["o"], True),
    ("room for what is about to come", [entry("a", age=2), entry("b", age=1)], 25, 10, (), ["a"], True),
    ("cannot fit: everything evictable goes", [entry("p", pinned=True), entry("a")], 5, 0, (), ["a"], False),
    ("ties broken by digest", [entry("b"), entry("a")], 10, 0, (), ["a"], True),
]


@pytest.mark.parametrize(
    ("entries", "quota", "need", "protect", "expected", "fits"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(
    entries: list[CachedEntry],
    quota: int | None,
    need: int,
    protect: tuple[str, ...],
    expected: list[str],
    fits: bool,
) -> None:
    result = plan(CacheState(tuple(entries)), quota, need, now=NOW, grace=GRACE, protect=frozenset(protect))
    assert evicted(result) == expected
    assert result.fits is fits
    assert result.bytes_freed == sum(e.size for e in entries if e.digest in expected)
    assert result.size_after == sum(e.size for e in entries) - result.bytes_freed


# (case, entries, quota, need, fits, floor)
CANNOT_FIT = [
    ("pins alone exceed the quota", [entry("p", 30, pinned=True), entry("a")], 20, 0, False, 30),
    ("recent use and the new model exceed it", [CachedEntry("r", 15, NOW), entry("a")], 20, 10, False, 15),
    ("published model protected", [entry("new", 25), entry("a")], 20, 0, False, 25),
]


@pytest.mark.parametrize(
    ("entries", "quota", "need", "fits", "floor"),
    [case[1:] for case in CANNOT_FIT],
    ids=[case[0] for case in CANNOT_FIT],
)
def test_a_cache_that_cannot_fit_loses_nothing_when_only_fitting_is_allowed(
    entries: list[CachedEntry], quota: int, need: int, fits: bool, floor: int
) -> None:
    state = CacheState((*entries, entry("orphan", referenced=False)), (QuarantinedTree("x.1", 3),))
    result = plan(state, quota, need, now=NOW, grace=GRACE, protect={"new"}, only_if_fits=True)
    assert result.fits is fits and result.floor == floor
    assert result.to_evict == () and result.bytes_freed == 0 and result.drop_quarantine == ()
    assert result.size_after == result.size_before


def test_counts_and_quarantine() -> None:
    state = CacheState(
        (entry("p", pinned=True), CachedEntry("r", 10, NOW), entry("a"), entry("o", referenced=False)),
        (QuarantinedTree("dead.1", 7), QuarantinedTree("dead.1.reason", 0)),
    )
    result = plan(state, 1000, now=NOW, grace=GRACE)
    assert (result.kept_pinned, result.kept_recent, result.orphans) == (1, 1, 1)
    assert result.floor == 20 and result.size_before == 40
    assert result.drop_quarantine == state.quarantine and result.quarantine_bytes == 7
    assert evicted(result) == ["o"]


def test_the_plan_and_state_are_frozen_and_the_state_untouched() -> None:
    entries = (entry("b", age=1), entry("a", age=2))
    state = CacheState(entries)
    result = plan(state, 10, now=NOW, grace=GRACE)
    assert state.entries == entries  # sorting happened on a copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.fits = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.entries[0].size = 1  # type: ignore[misc]


def test_planning_ten_thousand_entries_is_one_pass() -> None:
    state = CacheState(tuple(entry(f"{i:064x}", age=i) for i in range(10_000)))
    result = plan(state, 9_000 * 10, now=NOW, grace=GRACE)
    assert len(result.to_evict) == 1_000
    assert [e.digest for e in result.to_evict[:2]] == [f"{9_999:064x}", f"{9_998:064x}"]
