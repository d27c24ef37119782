"""The page table: its size per page, and `base:allocation` extents."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tier_helpers import TIER_SETTINGS

from nbdcache.tier import DISK, HOLE, PAGE_SIZE, RAM, SAME, STATE_HOLE, STATE_ZERO, ZERO
from nbdcache.tier.pagetable import MAX_EXTENTS, PageTable
from nbdcache.tier.ram import ALLOCATORS, RamTier

GIB = 1 << 30
FLAGS = {HOLE: STATE_HOLE | STATE_ZERO, ZERO: STATE_ZERO, SAME: 0, RAM: 0, DISK: 0}


def per_page_arrays(tier: RamTier) -> int:
    """Bytes of every array in the tier that has one entry per device page."""
    n = tier.page_count
    arrays: dict[int, bytearray | memoryview] = {}
    for owner in (tier, tier.table, tier.allocator, getattr(tier.allocator, "lru", None)):
        for name in dir(owner):
            value = getattr(owner, name, None)
            if isinstance(value, bytearray | memoryview) and len(value) == n:
                arrays[id(value)] = value
    return sum(a.nbytes if isinstance(a, memoryview) else len(a) for a in arrays.values())


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
def test_64_gib_device_costs_at_most_16_bytes_a_page(allocator: str) -> None:
    pages = 64 * GIB // PAGE_SIZE
    tier = RamTier(pages, 64 * PAGE_SIZE, allocator=allocator)
    try:
        measured = per_page_arrays(tier)
        assert measured == tier.page_metadata_bytes  # nothing per page is left out
        assert measured / pages <= 16
        # The table is real: the last page works like the first.
        tier.store(pages - 1, b"z" * 100 + bytes(PAGE_SIZE - 100))
        assert bytes(tier.load(pages - 1)).startswith(b"z" * 100)
    finally:
        tier.close()


def naive_extents(states: bytes, first: int, count: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for state in states[first : first + count]:
        flags = FLAGS[state]
        if runs and runs[-1][1] == flags:
            runs[-1] = (runs[-1][0] + 1, flags)
        else:
            runs.append((1, flags))
    return runs


states_strategy = st.lists(st.sampled_from([HOLE, ZERO, SAME, RAM, DISK]), min_size=1, max_size=300)


@TIER_SETTINGS
@given(states_strategy, st.data())
def test_extents_match_a_page_by_page_scan(states: list[int], data: st.DataObject) -> None:
    table = PageTable(len(states))
    table.state[:] = bytes(states)
    first = data.draw(st.integers(0, len(states) - 1))
    count = data.draw(st.integers(1, len(states) - first))
    assert table.extents(first, count) == naive_extents(bytes(states), first, count)


@TIER_SETTINGS
@given(states_strategy, st.integers(1, 5))
def test_extents_stop_short_with_whole_runs(states: list[int], max_runs: int) -> None:
    table = PageTable(len(states))
    table.state[:] = bytes(states)
    full = naive_extents(bytes(states), 0, len(states))
    assert table.extents(0, len(states), max_runs) == full[:max_runs]


def test_trimmed_huge_device_is_one_run() -> None:
    pages = 64 * GIB // PAGE_SIZE
    table = PageTable(pages)
    table.state[12345] = RAM
    assert table.extents(0, pages) == [
        (12345, STATE_HOLE | STATE_ZERO),
        (1, 0),
        (pages - 12346, STATE_HOLE | STATE_ZERO),
    ]


def test_alternating_states_are_capped() -> None:
    table = PageTable(4 * MAX_EXTENTS)
    table.state[::2] = bytes([RAM]) * (2 * MAX_EXTENTS)
    runs = table.extents(0, 4 * MAX_EXTENTS)
    assert len(runs) == MAX_EXTENTS
    assert sum(n for n, _ in runs) == MAX_EXTENTS


@pytest.mark.parametrize(("first", "count"), [(-1, 1), (0, 0), (5, 6), (10, 1)])
def test_bad_extent_range_is_refused(first: int, count: int) -> None:
    with pytest.raises(ValueError, match="extent range"):
        PageTable(10).extents(first, count)


@pytest.mark.parametrize("pages", [0, -1, 1 << 33])
def test_bad_page_count_is_refused(pages: int) -> None:
    with pytest.raises(ValueError, match="page count"):
        PageTable(pages)
