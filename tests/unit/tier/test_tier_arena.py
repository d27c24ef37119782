"""The arena's frame pool, its lists and the LRU every allocator keeps."""

from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tier_helpers import TIER_SETTINGS

from nbdcache.tier import PAGE_SIZE
from nbdcache.tier.arena import NIL, Arena, FrameLists, StampLRU


def test_reserve_is_only_for_those_allowed() -> None:
    arena = Arena(6 * PAGE_SIZE, reserve=2)
    got = [arena.alloc_frame(reserve=False) for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3]
    assert arena.alloc_frame(reserve=False) == NIL
    assert arena.alloc_frames(1, reserve=False) == []
    assert arena.alloc_frame(reserve=True) != NIL
    assert arena.alloc_frames(2, reserve=True) == []  # all or nothing
    assert arena.alloc_frames(1, reserve=True) != []
    assert arena.alloc_frame(reserve=True) == NIL
    assert arena.frames_used == arena.frames_max == 6


def test_alloc_frames_hands_out_frames_in_address_order() -> None:
    arena = Arena(16 * PAGE_SIZE)
    frames = arena.alloc_frames(5, reserve=False)
    assert frames == [0, 1, 2, 3, 4]
    for frame in frames:
        arena.free_frame(frame)
    assert arena.alloc_frames(3, reserve=False) == [2, 3, 4]  # the last freed first


def test_a_locked_arena_keeps_its_frames_and_goes_on() -> None:
    # With --mlock the kernel refuses MADV_DONTNEED on the arena: frames stay
    # resident, nothing is counted as released, allocation goes on.
    arena = Arena(64 * PAGE_SIZE, release_batch=8)
    libc = ctypes.CDLL(None, use_errno=True)
    address = ctypes.addressof(ctypes.c_char.from_buffer(arena.map))
    if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(64 * PAGE_SIZE)) != 0:
        pytest.fail(f"mlock: {os.strerror(ctypes.get_errno())} (RLIMIT_MEMLOCK too low?)")
    try:
        frames = arena.alloc_frames(40, reserve=False)
        for frame in frames:
            arena.map[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE] = b"\xab" * PAGE_SIZE
        for frame in frames:
            arena.free_frame(frame)
        assert arena.release_free() == 0
        assert arena.frames_released == 0
        assert arena.map[0:PAGE_SIZE] == b"\xab" * PAGE_SIZE  # still resident
        again = arena.alloc_frames(64, reserve=False)
        assert sorted(again) == list(range(64))
        for frame in again:
            arena.free_frame(frame)
    finally:
        libc.munlock(ctypes.c_void_p(address), ctypes.c_size_t(64 * PAGE_SIZE))
        arena.close()


def test_frames_that_stay_free_go_back_to_the_kernel() -> None:
    arena = Arena(64 * PAGE_SIZE, release_batch=8)
    frames = arena.alloc_frames(40, reserve=False)
    for frame in frames:
        arena.map[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE] = b"\xab" * PAGE_SIZE
    for frame in frames:
        arena.free_frame(frame)
    # All but the last few freed are released: their memory reads as zeroes.
    released = arena.frames_released
    assert 40 - 8 <= released < 40
    assert arena.map[0:PAGE_SIZE] == bytes(PAGE_SIZE)
    assert arena.map[39 * PAGE_SIZE : 40 * PAGE_SIZE] == b"\xab" * PAGE_SIZE
    assert arena.release_free() == 40 - released  # the rest, on demand
    assert arena.map[39 * PAGE_SIZE : 40 * PAGE_SIZE] == bytes(PAGE_SIZE)
    assert arena.alloc_frame(reserve=False) != NIL  # released frames are reusable


@TIER_SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 31), st.integers(0, 3)), max_size=200))
def test_frame_lists_match_a_model(ops: list[tuple[bool, int, int]]) -> None:
    lists = FrameLists(32, 4)
    model: dict[int, list[int]] = {i: [] for i in range(4)}
    for push, frame, lst in ops:
        if push:
            lists.remove(frame)
            for frames in model.values():
                if frame in frames:
                    frames.remove(frame)
            lists.push(lst, frame)
            model[lst].insert(0, frame)
        else:
            lists.remove(frame)
            for frames in model.values():
                if frame in frames:
                    frames.remove(frame)
        for i in range(4):
            assert lists.walk(i) == model[i]
            assert bool(lists.nonempty >> i & 1) == bool(model[i])
        assert lists.count() == sum(len(f) for f in model.values())


class _Keys:
    """The live keys of a StampLRU under test."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def is_live(self, key: int) -> bool:
        return key in self.live

    def count(self) -> int:
        return len(self.live)


@TIER_SETTINGS
@given(st.lists(st.tuples(st.sampled_from("pdc"), st.integers(0, 15)), max_size=300))
def test_stamp_lru_matches_an_ordered_model(ops: list[tuple[str, int]]) -> None:
    keys = _Keys()
    lru = StampLRU(16, keys.is_live, keys.count)
    lru.limit = 8  # clean often
    order: list[int] = []  # coldest first
    for op, key in ops:
        if op == "p":  # used: most recent
            keys.live.add(key)
            if key in order:
                order.remove(key)
            order.append(key)
            lru.push(key)
        elif op == "d":  # died
            keys.live.discard(key)
            if key in order:
                order.remove(key)
        elif key in keys.live:  # made cold
            order.remove(key)
            order.insert(0, key)
            lru.make_cold(key)
        assert lru.coldest(16) == order
        assert len(lru.queue) + len(lru.cold) <= 2 * len(keys.live) + 2 * lru._SLACK


def test_stamp_lru_queue_stays_bounded() -> None:
    keys = _Keys()
    lru = StampLRU(4, keys.is_live, keys.count)
    keys.live.update(range(4))
    for i in range(100_000):
        lru.push(i % 4)
    assert len(lru.queue) <= 2 * 4 + 2 * lru._SLACK
    assert lru.coldest(4) == [0, 1, 2, 3]


def test_a_queue_drained_from_its_cold_end_is_not_cleaned_at_every_push(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writeback's pattern: keys are pushed, and the coldest die a few at a
    time.  The stale entries `coldest` skips at the cold end go at the next
    clean, so cleans stay rare (amortised) instead of coming at every push,
    and the queue keeps room for the entries a run of stores adds."""
    keys = _Keys()
    lru = StampLRU(1000, keys.is_live, keys.count)
    cleans = 0
    real_clean = StampLRU.clean

    def counted(self: StampLRU) -> None:
        nonlocal cleans
        cleans += 1
        real_clean(self)

    monkeypatch.setattr(StampLRU, "clean", counted)
    pushes = 30_000
    for i in range(pushes):
        key = i % 1000
        keys.live.add(key)
        lru.push(key)
        if len(keys.live) > 100:  # written back: the coldest leave the tier
            keys.live.difference_update(lru.coldest(10))
    assert cleans < pushes // 1000, f"{cleans} cleans in {pushes} pushes"
    assert len(lru.queue) < lru.limit
    assert sorted(lru.coldest(1000)) == sorted(keys.live)


def test_too_small_an_arena_is_refused() -> None:
    with pytest.raises(ValueError, match="frame"):
        Arena(PAGE_SIZE - 1)
