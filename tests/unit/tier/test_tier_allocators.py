"""What each allocator promises beyond the common model: packing, moves, LRU."""

from __future__ import annotations

import pytest
from tier_helpers import page_of

from nbdcache.tier import DISK, PAGE_SIZE, RAM, ZERO, NoSpace, StoreIOError
from nbdcache.tier.arena import HANDLE_SHIFT, HANDLE_SPLIT
from nbdcache.tier.ram import ALLOCATORS, RamTier
from nbdcache.tier.zsmalloc import build_classes

allocators = pytest.mark.parametrize("allocator", list(ALLOCATORS))


def data(seed: int, length: int) -> bytes:
    return page_of("data", seed, length)


def frame_of(tier: RamTier, pgno: int) -> int:
    return (tier.table.handle[pgno] >> HANDLE_SHIFT) // PAGE_SIZE


def test_zbud_puts_two_buddies_in_a_frame_and_no_third() -> None:
    tier = RamTier(8, 16 * PAGE_SIZE, allocator="zbud", reserve_frames=1)
    for pgno in range(3):
        tier.store(pgno, data(pgno, 1000))
    assert frame_of(tier, 0) == frame_of(tier, 1) != frame_of(tier, 2)
    stats = tier.stats()
    assert (stats["frames_used"], stats["buddied_frames"], stats["unbuddied_frames"]) == (2, 1, 1)
    tier.check()


def test_zbud_best_fit_picks_the_tightest_frame() -> None:
    tier = RamTier(8, 16 * PAGE_SIZE, allocator="zbud", reserve_frames=1)
    tier.store(0, data(0, 1000))  # frame A: about 3 KiB free
    tier.store(1, data(1, 3000))  # frame B: about 1 KiB free
    tier.store(2, data(2, 500))  # fits both: must go to B
    assert frame_of(tier, 2) == frame_of(tier, 1) != frame_of(tier, 0)


def test_z3fold_puts_three_in_a_frame_and_slides_the_middle() -> None:
    tier = RamTier(8, 16 * PAGE_SIZE, allocator="z3fold", reserve_frames=1)
    pages = {pgno: data(pgno, 1000) for pgno in range(3)}
    for pgno, page in pages.items():
        tier.store(pgno, page)
    assert {frame_of(tier, p) for p in pages} == {frame_of(tier, 0)}
    # 0 is first, 1 last, 2 middle: freeing the first slides the middle down.
    tier.discard(0)
    assert tier.stats()["middle_moves"] == 1
    assert tier.table.handle[2] >> HANDLE_SHIFT == frame_of(tier, 2) * PAGE_SIZE
    for pgno in (1, 2):
        assert bytes(tier.load(pgno)) == pages[pgno]
    # The free space is one run again: an object of almost all of it fits.
    tier.store(3, data(3, 1800))
    assert frame_of(tier, 3) == frame_of(tier, 1)
    tier.check()


def test_z3fold_is_denser_than_zbud_for_small_pages() -> None:
    frames = {}
    for allocator in ("zbud", "z3fold"):
        tier = RamTier(64, 64 * PAGE_SIZE, allocator=allocator, reserve_frames=1)
        for pgno in range(48):
            tier.store(pgno, data(pgno, 1100))
        frames[allocator] = tier.stats()["frames_used"]
    assert frames["zbud"] == 24
    assert frames["z3fold"] == 16


def test_zsmalloc_classes_cover_every_size() -> None:
    classes = build_classes()
    sizes = [size for size, _, _ in classes]
    assert sizes == sorted(sizes) and sizes[-1] == PAGE_SIZE
    for size, pages, objs in classes:
        assert 1 <= pages <= 8 and objs == pages * PAGE_SIZE // size


def test_zsmalloc_packs_close_to_the_compressed_size() -> None:
    tier = RamTier(512, 512 * PAGE_SIZE, allocator="zsmalloc")
    for pgno in range(512):
        tier.store(pgno, data(pgno, 700 + pgno % 7))
    stats = tier.stats()
    # About 712 bytes an object (class rounding and 4-byte header included).
    assert stats["frames_used"] * PAGE_SIZE < 1.08 * stats["compr_data_size"]


def test_zsmalloc_compaction_frees_frames_and_keeps_data() -> None:
    tier = RamTier(600, 400 * PAGE_SIZE, allocator="zsmalloc")
    pages = {pgno: data(pgno, 900) for pgno in range(600)}
    for pgno, page in pages.items():
        tier.store(pgno, page)
    for pgno in range(0, 600, 2):
        tier.discard(pgno)
        del pages[pgno]
    before = tier.stats()["frames_used"]
    freed = tier.compact()
    stats = tier.stats()
    assert freed > 0.3 * before
    assert stats["frames_used"] == before - freed
    assert stats["pages_compacted"] == freed and stats["compact_runs"] == 1
    assert stats["objects_moved"] > 0
    for pgno, page in pages.items():
        assert bytes(tier.load(pgno)) == page
    tier.check()
    assert tier.compact() == 0  # nothing more to gain


def test_zsmalloc_compacts_instead_of_refusing_a_write() -> None:
    tier = RamTier(1200, 100 * PAGE_SIZE, allocator="zsmalloc", reserve_frames=8)
    pgno = 0
    with pytest.raises(NoSpace):
        while True:
            tier.store(pgno, data(pgno, 900))
            pgno += 1
    full = pgno
    for p in range(0, full, 2):
        tier.discard(p)
    # Half the objects are gone, scattered over every zspage: pages of another
    # size class fit only once compaction has emptied some zspages.
    for p in range(full, full + full // 6):
        tier.store(p, data(p, 2000))
    assert tier.stats()["compact_runs"] >= 1
    for p in range(1, full, 2):
        assert bytes(tier.load(p)) == data(p, 900)
    for p in range(full, full + full // 6):
        assert bytes(tier.load(p)) == data(p, 2000)
    tier.check()


def test_zsmalloc_splits_objects_across_scattered_frames() -> None:
    tier = RamTier(64, 64 * PAGE_SIZE, allocator="zsmalloc", reserve_frames=1)
    arena = tier.arena
    # Leave only every other frame free at the top of the free stack, so
    # the next zspage gets frames that are not adjacent.
    taken = [arena.alloc_frame(False) for _ in range(20)]
    for frame in taken[::2]:
        arena.free_frame(frame)
    pages = {pgno: data(pgno, 1500) for pgno in range(12)}
    for pgno, page in pages.items():
        tier.store(pgno, page)
    split = [p for p in pages if tier.table.handle[p] & HANDLE_SPLIT]
    assert split, "no object straddled two scattered frames"
    for pgno, page in pages.items():
        assert bytes(tier.load(pgno)) == page
    for pgno in split:  # overwrite in place, then move by compaction
        pages[pgno] = data(pgno + 100, 1500)
        tier.store(pgno, pages[pgno])
    for pgno in range(0, 12, 3):
        tier.discard(pgno)
        del pages[pgno]
    tier.compact()
    for pgno, page in pages.items():
        assert bytes(tier.load(pgno)) == page
    for frame in taken[1::2]:
        arena.free_frame(frame)


def test_zsmalloc_lru_is_store_order() -> None:
    tier = RamTier(16, 32 * PAGE_SIZE, allocator="zsmalloc")
    for pgno in (5, 3, 9, 1):
        tier.store(pgno, data(pgno, 800))
    assert tier.coldest_pages(10) == [5, 3, 9, 1]
    tier.load(5)  # reading does not warm a page up
    tier.store(3, data(30, 800))  # storing does
    assert tier.coldest_pages(10) == [5, 9, 1, 3]
    tier.make_cold(1)
    assert tier.coldest_pages(2) == [1, 5]
    tier.discard(5)
    assert tier.coldest_pages(10) == [1, 9, 3]


@pytest.mark.parametrize("allocator", ["zbud", "z3fold"])
def test_frame_allocators_list_whole_frames_in_lru_order(allocator: str) -> None:
    tier = RamTier(16, 32 * PAGE_SIZE, allocator=allocator)
    for pgno in range(4):
        tier.store(pgno, data(pgno, 1900))  # two a frame: {0, 1}, {2, 3}
    assert sorted(tier.coldest_pages(1)) == [0, 1]
    assert tier.coldest_pages(3) == tier.coldest_pages(4)
    assert sorted(tier.coldest_pages(4)) == [0, 1, 2, 3]
    tier.store(0, data(10, 1900))  # in place: its frame becomes the hottest
    assert sorted(tier.coldest_pages(1)) == [2, 3]
    tier.make_cold(1)
    assert sorted(tier.coldest_pages(1)) == [0, 1]


@allocators
def test_release_leaves_the_page_to_the_image(allocator: str) -> None:
    tier = RamTier(16, 32 * PAGE_SIZE, allocator=allocator)
    tier.store(4, data(4, 800))
    used = tier.stats()["frames_used"]
    tier.release(4)
    assert tier.state(4) == DISK
    assert tier.stats()["frames_used"] < used
    assert tier.coldest_pages(5) == []
    with pytest.raises(StoreIOError):
        tier.load(4)
    with pytest.raises(ValueError, match="no RAM copy"):
        tier.release(4)
    tier.store(4, data(5, 800))  # a DISK page is allocated: it may be rewritten
    assert tier.state(4) == RAM


@allocators
def test_freed_frames_go_back_to_the_kernel(allocator: str) -> None:
    frames = 700
    tier = RamTier(frames, frames * PAGE_SIZE, allocator=allocator, reserve_frames=1)
    for pgno in range(frames - 1):
        tier.store(pgno, page_of("random", pgno, 0))
    for pgno in range(frames - 1):
        tier.discard(pgno)
    stats = tier.stats()
    assert stats["frames_used"] == 0
    assert stats["frames_released"] >= frames - 1 - tier.arena.release_batch
    for pgno in range(10):  # released frames are usable again
        tier.store(pgno, page_of("random", pgno + 1000, 0))
        assert bytes(tier.load(pgno)) == page_of("random", pgno + 1000, 0)


@allocators
def test_compressor_none_keeps_every_page_raw(allocator: str) -> None:
    tier = RamTier(16, 32 * PAGE_SIZE, allocator=allocator, compressor="none")
    for pgno in range(8):
        tier.store(pgno, data(pgno, 100))
    stats = tier.stats()
    assert stats["frames_used"] == 8 and stats["compr_data_size"] == 8 * PAGE_SIZE
    assert stats["huge_pages"] == 8 and stats["huge_pages_since"] == 0
    assert all(bytes(tier.load(p)) == data(p, 100) for p in range(8))


@allocators
def test_stats_name_what_they_count(allocator: str) -> None:
    tier = RamTier(16, 32 * PAGE_SIZE, allocator=allocator)
    tier.store(0, data(0, 500))
    tier.store(1, page_of("zero", 0, 0))
    tier.store(2, page_of("same", 2, 0))
    tier.store(3, page_of("random", 3, 0))
    stats = tier.stats()
    assert stats["pages_stored"] == 2
    assert stats["zero_pages"] == 1 and stats["same_pages"] == 1
    assert stats["huge_pages"] == 1 and stats["huge_pages_since"] == 1
    assert stats["orig_data_size"] == 2 * PAGE_SIZE
    assert 500 < stats["compr_data_size"] - PAGE_SIZE < 600
    assert stats["metadata_bytes"] >= tier.page_metadata_bytes > 0
    assert all(type(v) is int for v in stats.values())
    assert tier.state(0) == RAM


@allocators
def test_loaded_pages_do_not_change_with_the_store(allocator: str) -> None:
    tier = RamTier(8, 16 * PAGE_SIZE, allocator=allocator)
    kinds = {0: page_of("random", 0, 0), 1: data(1, 700), 2: page_of("same", 2, 0)}
    for pgno, page in kinds.items():
        tier.store(pgno, page)
    loaded = {pgno: tier.load(pgno) for pgno in kinds}
    for pgno in kinds:
        tier.store(pgno, page_of("random", pgno + 10, 0))
    for pgno, page in kinds.items():
        assert type(loaded[pgno]) is bytes and loaded[pgno] == page


@allocators
def test_patch_rewrites_part_of_a_page(allocator: str) -> None:
    tier = RamTier(8, 16 * PAGE_SIZE, allocator=allocator)
    tier.patch(0, 100, b"hello")  # into a hole
    assert bytes(tier.load(0)) == bytes(100) + b"hello" + bytes(PAGE_SIZE - 105)
    page = data(1, 2000)
    tier.store(1, page)
    tier.patch(1, PAGE_SIZE - 3, memoryview(b"xyz"))
    assert bytes(tier.load(1)) == page[:-3] + b"xyz"
    tier.patch(1, 0, bytes(PAGE_SIZE))  # a whole zero page: no arena space
    assert tier.state(1) == ZERO
    with pytest.raises(ValueError, match="does not fit"):
        tier.patch(1, PAGE_SIZE - 2, b"abc")
    assert tier.flush() is None and tier.sync_pages(0, 8) is None


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
@pytest.mark.parametrize("native_path", [True, False])
def test_a_page_stored_as_the_lru_is_cleaned_can_still_be_written_back(
    allocator: str, native_path: bool
) -> None:
    """The allocation that fills the LRU's queue cleans it; the page being
    stored is not RAM yet then, and its entry must not be the one dropped,
    or writeback would never find it."""
    tier = RamTier(64, 64 * PAGE_SIZE, allocator=allocator)
    if not native_path:
        tier._native = None
        tier._placer = None
    lru = tier.allocator.lru  # type: ignore[attr-defined]
    try:
        for pgno in range(8):
            tier.store(pgno, page_of("data", pgno, 1000))
        tier.discard(0, 4)
        for first in (40, 50):
            for pgno in range(10, 30):  # stale entries, enough for a clean to drop
                tier.store(pgno, page_of("data", pgno, 1000))
            tier.discard(10, 20)
            lru.limit = len(lru.queue)  # the next entry cleans first
            data = b"".join(page_of("data", first + i, 1000 + 300 * i) for i in range(3))
            tier.store_pages(first, memoryview(data))
            assert len(lru.queue) < 20, "the queue was not cleaned"
        for pgno in range(10, 30):
            tier.store(pgno, page_of("data", pgno, 1000))
        tier.discard(10, 20)
        lru.limit = len(lru.queue)  # a raw page's entry cleans first too
        tier.store(60, page_of("random", 60, 0))
        assert len(lru.queue) < 20, "the queue was not cleaned"
        coldest = tier.coldest_pages(64)
        for pgno in (4, 5, 6, 7, 40, 41, 42, 50, 51, 52, 60):
            assert pgno in coldest, f"page {pgno} cannot be written back"
        tier.check()
    finally:
        tier.close()
