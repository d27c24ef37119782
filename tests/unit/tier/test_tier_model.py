"""Every allocator against a plain dict: random store/overwrite/discard/zero/load.

A hypothesis state machine drives a small `RamTier` (48 pages over 24
frames, 8 of them reserve) so that capacity errors happen often, and a
roomier one (160 pages over 64 frames) where many objects share zspages and
compaction has work to do.  After every step it checks that:

- every page reads back exactly what was stored last (zeroes for holes);
- a refused write left the page as it was, with ENOSPC only for holes and
  EIO only for allocated pages;
- no two live objects overlap, each sits in frames the arena has handed
  out, and its payload fits in its slot;
- the allocator's own invariants hold (lists, counts, LRU, free frames);
- the counters add up, and an empty tier holds no frame (freed space
  really goes back to the arena).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tier_helpers import TIER_SETTINGS, page_of

from nbdcache.tier import (
    DISK,
    HOLE,
    PAGE_SHIFT,
    PAGE_SIZE,
    RAM,
    SAME,
    ZERO,
    ZERO_PAGE,
    NoSpace,
    StoreIOError,
)
from nbdcache.tier.arena import HANDLE_LENGTH_MASK, HANDLE_SHIFT
from nbdcache.tier.ram import ALLOCATORS, RamTier

RESERVE = 8
#: (pages, frames) of the tiers the machines drive.
SHAPES = {"tight": (48, 24), "roomy": (160, 64)}

# Page numbers are drawn for the largest shape and folded into each tier.
PGNOS = st.integers(0, max(pages for pages, _ in SHAPES.values()) - 1)
kinds = st.sampled_from(["data", "data", "data", "zero", "same", "random"])
# Payload lengths spread over chunk counts and size classes, small to large.
lengths = st.one_of(st.integers(0, 400), st.integers(400, 2200), st.integers(2200, 3500))


def check_layout(tier: RamTier) -> None:
    """No overlap, objects inside handed-out frames, payloads inside slots."""
    free = set(tier.arena.free_frames())
    pieces: list[tuple[int, int, int]] = []
    for pgno, addr, owned in tier.allocator.objects():
        handle = tier.table.handle[pgno]
        size = handle & HANDLE_LENGTH_MASK
        assert handle >> HANDLE_SHIFT == addr
        first_start, first_end = owned[0]
        assert first_start <= addr < first_end, f"page {pgno} payload outside its slot"
        room = (first_end - addr) + sum(end - start for start, end in owned[1:])
        assert size <= room, f"page {pgno} payload overruns its slot"
        for start, end in owned:
            frame = start >> PAGE_SHIFT
            assert (end - 1) >> PAGE_SHIFT == frame, "a piece crosses a frame"
            assert frame not in free, f"page {pgno} lives in free frame {frame}"
            pieces.append((start, end, pgno))
    pieces.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(pieces):
        assert end <= start, f"pages {a} and {b} overlap"


class TierMachine(RuleBasedStateMachine):
    allocator = "zsmalloc"
    pages = 48
    frames = 24

    def __init__(self) -> None:
        super().__init__()
        self.tier = RamTier(
            self.pages, self.frames * PAGE_SIZE, allocator=self.allocator, reserve_frames=RESERVE
        )
        self.content: dict[int, bytes] = {}  # what every non-hole page reads as
        self.disk: set[int] = set()  # released to a (pretend) backing image

    def teardown(self) -> None:
        self.tier.close()

    def _expect_refusal(self, pgno: int, before: int, err: Exception) -> None:
        if isinstance(err, NoSpace):
            assert before == HOLE, "ENOSPC for an allocated page"
        else:
            assert before != HOLE, "EIO for a hole"
        assert self.tier.state(pgno) == before, "a refused write changed the page"

    @rule(
        pgno=PGNOS,
        kind=kinds,
        seed=st.integers(0, 2**16),
        length=lengths,
        view=st.booleans(),
    )
    def store(self, pgno: int, kind: str, seed: int, length: int, view: bool) -> None:
        pgno %= self.pages
        page = page_of(kind, seed, length)
        before = self.tier.state(pgno)
        try:
            self.tier.store(pgno, memoryview(bytearray(page)) if view else page)
        except (NoSpace, StoreIOError) as err:
            self._expect_refusal(pgno, before, err)
            return
        self.content[pgno] = page
        self.disk.discard(pgno)

    @rule(pgno=PGNOS)
    def discard(self, pgno: int) -> None:
        pgno %= self.pages
        self.tier.discard(pgno)
        self.content.pop(pgno, None)
        self.disk.discard(pgno)

    @rule(pgno=PGNOS, count=st.integers(2, 64))
    def discard_range(self, pgno: int, count: int) -> None:
        pgno %= self.pages
        count = min(count, self.pages - pgno)
        self.tier.discard(pgno, count)
        for p in range(pgno, pgno + count):
            self.content.pop(p, None)
            self.disk.discard(p)

    @rule(pgno=PGNOS, allocate=st.booleans())
    def zero(self, pgno: int, allocate: bool) -> None:
        pgno %= self.pages
        self.tier.zero(pgno, allocate)
        self.disk.discard(pgno)
        if allocate:
            self.content[pgno] = ZERO_PAGE
        else:
            self.content.pop(pgno, None)

    @rule(pgno=PGNOS)
    def load(self, pgno: int) -> None:
        pgno %= self.pages
        if pgno in self.disk:
            with pytest.raises(StoreIOError):
                self.tier.load(pgno)
        else:
            assert bytes(self.tier.load(pgno)) == self.content.get(pgno, ZERO_PAGE)

    @rule()
    def compact(self) -> None:
        frames = self.tier.arena.frames_used
        freed = self.tier.compact()
        assert self.tier.arena.frames_used == frames - freed

    @rule(pgno=PGNOS)
    def make_cold(self, pgno: int) -> None:
        pgno %= self.pages
        self.tier.make_cold(pgno)
        if self.tier.state(pgno) == RAM:
            cold = self.tier.coldest_pages(1)
            assert pgno in cold if self.allocator == "zsmalloc" else len(cold) >= 1
            if self.allocator != "zsmalloc":
                # Frame allocators hand back the whole coldest frame: the page's.
                frame = (self.tier.table.handle[pgno] >> HANDLE_SHIFT) >> PAGE_SHIFT
                assert pgno in self.tier.allocator.frame_pages(frame)  # type: ignore[attr-defined]
                assert set(cold) == set(self.tier.allocator.frame_pages(frame))  # type: ignore[attr-defined]

    @precondition(lambda self: any(s == RAM for s in self.tier.table.state))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        in_ram = [p for p in range(self.pages) if self.tier.state(p) == RAM]
        pgno = data.draw(st.sampled_from(in_ram))
        self.tier.release(pgno)
        self.disk.add(pgno)

    @rule(count=PGNOS)
    def coldest(self, count: int) -> None:
        pages = self.tier.coldest_pages(count)
        assert len(set(pages)) == len(pages), "a page listed twice"
        assert all(self.tier.state(p) == RAM for p in pages)
        in_ram = sum(1 for s in self.tier.table.state if s == RAM)
        assert len(pages) >= min(count, in_ram)

    @invariant()
    def pages_read_back(self) -> None:
        for pgno in range(self.pages):
            state = self.tier.state(pgno)
            if pgno in self.disk:
                assert state == DISK
                continue
            expected = self.content.get(pgno)
            if expected is None:
                assert state == HOLE
            else:
                assert state != HOLE
                assert bytes(self.tier.load(pgno)) == expected

    @invariant()
    def allocator_is_consistent(self) -> None:
        self.tier.check()
        check_layout(self.tier)

    @invariant()
    def counters_add_up(self) -> None:
        stats = self.tier.stats()
        states = bytes(self.tier.table.state)
        assert stats["pages_stored"] == states.count(RAM)
        assert stats["zero_pages"] == states.count(ZERO)
        assert stats["same_pages"] == states.count(SAME)
        assert stats["disk_pages"] == states.count(DISK)
        assert stats["orig_data_size"] == PAGE_SIZE * stats["pages_stored"]
        assert stats["mem_used_total"] == PAGE_SIZE * stats["frames_used"]
        assert stats["frames_used"] <= stats["frames_total"] == self.frames
        assert stats["mem_used_max"] <= stats["mem_limit"] == self.frames * PAGE_SIZE
        # Every ENOSPC is a failed allocation; EIO also counts reads of DISK pages.
        assert stats["enospc_errors"] <= stats["alloc_failures"]
        assert stats["alloc_failures"] <= stats["enospc_errors"] + stats["eio_errors"]
        if stats["pages_stored"] == 0:
            assert stats["frames_used"] == 0, "frames stay in use with nothing stored"
            assert stats["compr_data_size"] == 0


def machine_for(allocator: str, shape: str) -> type[TierMachine]:
    pages, frames = SHAPES[shape]
    name = f"{allocator.capitalize()}{shape.capitalize()}Machine"
    attrs = {"allocator": allocator, "pages": pages, "frames": frames}
    return TIER_SETTINGS(type(name, (TierMachine,), attrs))


TestZsmallocTight = machine_for("zsmalloc", "tight").TestCase
TestZsmallocRoomy = machine_for("zsmalloc", "roomy").TestCase
TestZbudTight = machine_for("zbud", "tight").TestCase
TestZbudRoomy = machine_for("zbud", "roomy").TestCase
TestZ3foldTight = machine_for("z3fold", "tight").TestCase
TestZ3foldRoomy = machine_for("z3fold", "roomy").TestCase


def test_every_allocator_is_covered() -> None:
    assert set(ALLOCATORS) == {"zsmalloc", "zbud", "z3fold"}
