"""Capacity without a backing image: ENOSPC for holes, a reserve, then EIO.

The rules of "Capacity" in the design brief, for every allocator: a write
to a hole fails with ENOSPC once only the reserve is left; an overwrite of
an allocated page may use the reserve and fails with EIO beyond it; zero and
same-filled pages need no room; in every failure the page keeps its old
content; the arena never grows past `ram_bytes`.
"""

from __future__ import annotations

import pytest
from tier_helpers import page_of

from nbdcache.tier import HOLE, PAGE_SIZE, RAM, ZERO, ZERO_PAGE, NoSpace, StoreIOError
from nbdcache.tier.arena import ArenaFull
from nbdcache.tier.ram import ALLOCATORS, RamTier

FRAMES = 20
RESERVE = 8

allocators = pytest.mark.parametrize("allocator", list(ALLOCATORS))


def raw(seed: int) -> bytes:
    """An incompressible page: one whole frame in every allocator."""
    return page_of("random", seed, 0)


def full_tier(allocator: str) -> tuple[RamTier, int]:
    """A tier whose frames outside the reserve all hold raw pages 0..n-1."""
    tier = RamTier(64, FRAMES * PAGE_SIZE, allocator=allocator, reserve_frames=RESERVE)
    stored = 0
    while True:
        try:
            tier.store(stored, raw(stored))
        except NoSpace:
            return tier, stored
        stored += 1


@allocators
def test_hole_write_gets_enospc_once_only_the_reserve_is_left(allocator: str) -> None:
    tier, stored = full_tier(allocator)
    assert stored == FRAMES - RESERVE
    assert tier.state(stored) == HOLE
    assert tier.load(stored) == ZERO_PAGE
    stats = tier.stats()
    assert stats["enospc_errors"] == 1 and stats["eio_errors"] == 0
    assert stats["frames_used"] == FRAMES - RESERVE
    for pgno in range(stored):
        assert bytes(tier.load(pgno)) == raw(pgno)


@allocators
def test_overwrite_of_allocated_page_uses_the_reserve_then_gets_eio(allocator: str) -> None:
    tier, stored = full_tier(allocator)
    # Zero pages with NO_HOLE are allocated but cost nothing yet.
    zeros = range(stored, stored + RESERVE + 1)
    for pgno in zeros:
        tier.zero(pgno, allocate=True)
    for pgno in zeros[:RESERVE]:
        tier.store(pgno, raw(pgno))  # draws on the reserve
    last = zeros[RESERVE]
    with pytest.raises(StoreIOError):
        tier.store(last, raw(last))
    assert tier.state(last) == ZERO
    assert tier.load(last) == ZERO_PAGE
    stats = tier.stats()
    assert stats["eio_errors"] == 1
    assert stats["frames_used"] == FRAMES
    # A hole still gets ENOSPC, not EIO.
    with pytest.raises(NoSpace):
        tier.store(63, raw(63))
    for pgno in [*range(stored), *zeros[:RESERVE]]:
        assert bytes(tier.load(pgno)) == raw(pgno)


@allocators
def test_failed_overwrite_keeps_the_old_content(allocator: str) -> None:
    tier = RamTier(64, FRAMES * PAGE_SIZE, allocator=allocator, reserve_frames=RESERVE)
    small = page_of("data", 1, 300)
    tier.store(0, small)
    tier.store(63, page_of("data", 2, 300))  # shares page 0's frame or zspage
    pgno = 1
    while True:  # fill everything, the reserve included
        tier.zero(pgno, allocate=True)
        try:
            tier.store(pgno, raw(pgno))
        except StoreIOError:
            break
        pgno += 1
    # Page 0 cannot grow where it is, and there is no frame left.
    with pytest.raises(StoreIOError):
        tier.store(0, raw(1000))
    assert tier.state(0) == RAM
    assert bytes(tier.load(0)) == small


@allocators
def test_raw_overwrite_in_place_needs_no_room(allocator: str) -> None:
    tier, stored = full_tier(allocator)
    for pgno in range(stored):
        tier.zero(stored + pgno, allocate=True)
    # Use up the reserve as well.
    with pytest.raises(StoreIOError):
        for pgno in range(stored, 2 * stored):
            tier.store(pgno, raw(pgno))
    assert tier.stats()["frames_used"] == FRAMES
    tier.store(0, raw(999))
    assert bytes(tier.load(0)) == raw(999)


@allocators
def test_zero_and_same_filled_pages_need_no_room(allocator: str) -> None:
    tier, stored = full_tier(allocator)
    tier.store(stored, ZERO_PAGE)
    same = page_of("same", 5, 0)
    tier.store(stored + 1, same)
    assert tier.load(stored) == ZERO_PAGE
    assert bytes(tier.load(stored + 1)) == same
    # Replacing a RAM page by a same-filled one frees its frame.
    tier.store(0, same)
    assert tier.stats()["frames_used"] == FRAMES - RESERVE - 1


@allocators
def test_discard_gives_room_back(allocator: str) -> None:
    tier, stored = full_tier(allocator)
    with pytest.raises(NoSpace):
        tier.store(stored, raw(stored))
    tier.discard(3)
    assert tier.state(3) == HOLE and tier.load(3) == ZERO_PAGE
    tier.store(stored, raw(stored))
    assert bytes(tier.load(stored)) == raw(stored)


@pytest.mark.parametrize("ram_bytes", [PAGE_SIZE, 5 * PAGE_SIZE + 1, 7 * PAGE_SIZE - 1])
def test_arena_never_exceeds_ram_bytes(ram_bytes: int) -> None:
    tier = RamTier(16, ram_bytes, reserve_frames=0)
    assert len(tier.arena.map) == ram_bytes // PAGE_SIZE * PAGE_SIZE <= ram_bytes
    assert tier.stats()["mem_limit"] <= ram_bytes


def test_too_little_ram_is_refused() -> None:
    with pytest.raises(ValueError, match="frame"):
        RamTier(16, PAGE_SIZE - 1)


def test_reserve_must_leave_room() -> None:
    with pytest.raises(ValueError, match="reserve"):
        RamTier(16, 4 * PAGE_SIZE, reserve_frames=4)


def test_unknown_allocator_is_refused() -> None:
    with pytest.raises(ValueError, match="allocator"):
        RamTier(16, 4 * PAGE_SIZE, allocator="buddy")


@allocators
def test_wrong_page_size_is_refused_and_changes_nothing(allocator: str) -> None:
    tier = RamTier(4, 16 * PAGE_SIZE, allocator=allocator, reserve_frames=1)
    page = page_of("data", 2, 1000)
    tier.store(0, page)
    for bad in (page[:-1], page + b"x", b""):
        with pytest.raises(ValueError, match="4096"):
            tier.store(0, bad)
    assert bytes(tier.load(0)) == page


@allocators
def test_with_a_backing_image_a_full_tier_says_arena_full(allocator: str) -> None:
    tier = RamTier(64, FRAMES * PAGE_SIZE, allocator=allocator, overcommit=False)
    assert tier.arena.reserve == 0
    pgno = 0
    with pytest.raises(ArenaFull):
        while True:
            tier.store(pgno, raw(pgno))
            pgno += 1
    assert pgno == FRAMES
    assert tier.state(pgno) == HOLE
    tier.zero(pgno, allocate=True)
    with pytest.raises(ArenaFull):  # allocated or not: the caller makes room
        tier.store(pgno, raw(pgno))
    assert tier.load(pgno) == ZERO_PAGE
    stats = tier.stats()
    assert stats["alloc_failures"] == 2
    assert stats["enospc_errors"] == stats["eio_errors"] == 0
    tier.release(0)  # written back: room again
    tier.store(pgno, raw(pgno))
    assert bytes(tier.load(pgno)) == raw(pgno)
