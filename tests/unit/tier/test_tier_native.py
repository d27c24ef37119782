"""The C loops (`nbdcache.tier._pages`) against the Python path they replace.

Every run of pages must end up exactly as page-by-page `store` leaves it,
and every page `load_run` expands must equal what `load` returns, for each
allocator and every page state.  The scripts install lz4's headers, so a
missing extension there is a build failure, not a reason to skip.
"""

from __future__ import annotations

import os
import random
import select
import signal
from array import array

import lz4.block
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tier_helpers import TIER_SETTINGS, page_of

from nbdcache.tier import DISK, PAGE_SIZE, RAM, ZERO, ZERO_PAGE, NoSpace, StoreError
from nbdcache.tier import ram as ram_module
from nbdcache.tier.arena import (
    HANDLE_LENGTH_MASK,
    HANDLE_SHIFT,
    HANDLE_SPLIT,
    ArenaFull,
    StampLRU,
)
from nbdcache.tier.codec import Codec, filled_word, native
from nbdcache.tier.ram import ALLOCATORS, RamTier
from nbdcache.tier.zsmalloc import NATIVE_PLACE, NATIVE_RELEASE, Zsmalloc

needs_native = pytest.mark.skipif(
    native is None and not os.environ.get("NBDCACHE_REQUIRE_NATIVE"),
    reason="nbdcache.tier._pages was not built (no lz4 headers at install time)",
)

KINDS = st.sampled_from(["zero", "same", "data", "data", "random"])
PAGES = st.lists(
    st.tuples(KINDS, st.integers(0, 10**6), st.integers(16, 4000)), min_size=2, max_size=40
)


def encode_run(data: bytes, threshold: int) -> tuple[bytearray, array[int], array[int]]:
    assert native is not None
    count = len(data) // PAGE_SIZE
    out, sizes, words = bytearray(len(data)), array("i", [0] * count), array("Q", [0] * count)
    native.encode(data, threshold, out, sizes, words)
    return out, sizes, words


def test_the_extension_is_built_where_the_scripts_installed_lz4_headers() -> None:
    if os.environ.get("NBDCACHE_REQUIRE_NATIVE"):
        assert native is not None, "nbdcache.tier._pages did not build or import"


@needs_native
@TIER_SETTINGS
@given(pages=PAGES, threshold=st.integers(64, PAGE_SIZE - 64))
def test_encode_classifies_like_the_codec(
    pages: list[tuple[str, int, int]], threshold: int
) -> None:
    data = b"".join(page_of(kind, seed, length) for kind, seed, length in pages)
    out, sizes, words = encode_run(data, threshold)
    codec = Codec("lz4", threshold)
    for i in range(len(pages)):
        page = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        word = filled_word(page) if page[0] == page[8] else -1
        if word >= 0:
            assert (sizes[i], words[i]) == (-1, word)
            continue
        expected = codec.encode(page)
        if len(expected) == PAGE_SIZE:
            assert sizes[i] == PAGE_SIZE  # kept raw, as the codec does
        else:
            block = bytes(out[i * PAGE_SIZE : i * PAGE_SIZE + sizes[i]])
            assert sizes[i] <= threshold
            assert lz4.block.decompress(block, uncompressed_size=PAGE_SIZE) == page


@needs_native
@TIER_SETTINGS
@given(kind=KINDS, seed=st.integers(0, 10**6), length=st.integers(16, 4000))
def test_encode_page_answers_as_encode_does_for_one_page(kind: str, seed: int, length: int) -> None:
    page = page_of(kind, seed, length)
    out, sizes, _ = encode_run(page, 3584)
    assert native is not None
    one = bytearray(PAGE_SIZE)
    size = native.encode_page(memoryview(page), 3584, one)
    assert size == sizes[0]
    if 0 < size < PAGE_SIZE:
        assert one[:size] == out[:size]


@needs_native
def test_encode_page_refuses_what_is_not_one_page() -> None:
    assert native is not None
    for page, threshold, out in (
        (ZERO_PAGE[:-1], 3584, bytearray(PAGE_SIZE)),
        (ZERO_PAGE + b"x", 3584, bytearray(PAGE_SIZE)),
        (ZERO_PAGE, 0, bytearray(PAGE_SIZE)),
        (ZERO_PAGE, 3584, bytearray(100)),
    ):
        with pytest.raises(ValueError):
            native.encode_page(page, threshold, out)
    with pytest.raises(BufferError):
        native.encode_page(ZERO_PAGE, 3584, b"read-only")
    both = bytearray(2 * PAGE_SIZE)
    with pytest.raises(ValueError, match="overlaps"):
        native.encode_page(memoryview(both)[:PAGE_SIZE], 3584, memoryview(both)[100:])
    assert (
        native.encode_page(memoryview(both)[:PAGE_SIZE], 3584, memoryview(both)[PAGE_SIZE:]) == -1
    )


@needs_native
@pytest.mark.parametrize("allocator", list(ALLOCATORS))
@pytest.mark.parametrize("overcommit", [True, False])
def test_one_page_stores_alike_on_both_paths_through_failures(
    allocator: str, overcommit: bool
) -> None:
    """`store` with `encode_page` and without: the same pages, the same
    errors and the same counters, with the arena full most of the time."""
    rng = random.Random(allocator + str(overcommit))
    kinds = ["zero", "same", "random", "data", "data"]
    native_path = RamTier(128, 24 * PAGE_SIZE, allocator=allocator, overcommit=overcommit)
    pure_path = RamTier(128, 24 * PAGE_SIZE, allocator=allocator, overcommit=overcommit)
    pure_path._native = None
    tiers = (native_path, pure_path)
    try:
        for step in range(600):
            pgno = rng.randrange(128)
            page = page_of(rng.choice(kinds), rng.randrange(10**6), rng.randrange(16, 4000))
            action = rng.random()
            outcomes = []
            for tier in tiers:
                try:
                    if action < 0.1:
                        tier.discard(pgno)
                    elif action < 0.15:
                        tier.compact()
                    else:  # a view of a buffer the caller reuses, as the server passes
                        tier.store(pgno, memoryview(bytearray(page)))
                    outcomes.append("ok")
                except (StoreError, ArenaFull) as exc:
                    outcomes.append(type(exc).__name__)
            assert outcomes[0] == outcomes[1], f"step {step}"
            assert native_path.stats() == pure_path.stats(), f"step {step}"
            if step % 50 == 0:
                for p in range(128):
                    assert native_path.load(p) == pure_path.load(p), f"page {p} at step {step}"
        assert native_path.stats()["alloc_failures"] > 0, "the arena never filled up"
        native_path.check()
        pure_path.check()
    finally:
        for tier in tiers:
            tier.close()


@needs_native
def test_a_page_equal_but_for_its_last_byte_is_not_same_filled() -> None:
    page = b"\x07" * (PAGE_SIZE - 1) + b"\x08"
    _, sizes, _ = encode_run(page + ZERO_PAGE, 3584)
    assert sizes[0] > 0 and sizes[1] == -1


@needs_native
@pytest.mark.parametrize("allocator", list(ALLOCATORS))
@TIER_SETTINGS
@given(pages=PAGES, rewrite=st.integers(0, 10**6))
def test_store_pages_leaves_the_tier_as_store_does(
    allocator: str, pages: list[tuple[str, int, int]], rewrite: int
) -> None:
    count = len(pages)
    data = b"".join(page_of(kind, seed, length) for kind, seed, length in pages)
    batched = RamTier(count + 8, 1024 * PAGE_SIZE, allocator=allocator)
    single = RamTier(count + 8, 1024 * PAGE_SIZE, allocator=allocator)
    single._native = None  # page by page, as the pure-Python path does
    try:
        for tier in (batched, single):  # an earlier copy to overwrite
            tier.store(3, page_of("data", rewrite, 500))
        done, raws = batched.store_pages(2, memoryview(data))
        for i in range(count):
            single.store(2 + i, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        assert done == count
        assert raws == [2 + i for i in range(count) if single.is_raw(2 + i)]
        for pgno in range(count + 8):
            assert batched.state(pgno) == single.state(pgno)
            assert batched.load(pgno) == single.load(pgno)
        assert batched.stats() == single.stats()
        batched.check()
    finally:
        batched.close()
        single.close()


@needs_native
@pytest.mark.parametrize("allocator", list(ALLOCATORS))
def test_load_run_expands_every_state_as_load_does(allocator: str) -> None:
    rng = random.Random(7)
    count = 300
    tier = RamTier(count, 1024 * PAGE_SIZE, allocator=allocator)
    try:
        kinds = ["zero", "same", "data", "random", "hole"]
        for pgno in range(count):
            kind = rng.choice(kinds)
            if kind != "hole":
                tier.store(pgno, page_of(kind, pgno, rng.randrange(16, 3000)))
        # Raw pages freed between zspages leave single frames that new
        # zspages chain: their objects split across frames (zsmalloc).
        for pgno in range(0, count - 1, 3):
            tier.store(pgno, page_of("random", pgno, 0))
        for pgno in range(0, count - 1, 6):
            tier.discard(pgno)
        for pgno in range(0, count - 1, 6):
            tier.store(pgno, page_of("data", pgno + 1, 2900))
        splits = sum(tier.state(p) == RAM and tier._handle[p] & HANDLE_SPLIT for p in range(count))
        assert splits > 0 or allocator != "zsmalloc"
        tier.table.state[count - 1] = DISK  # a page only the image would have
        expected = b"".join(tier.load(pgno) for pgno in range(count - 1))
        # From every start, a run expands everything up to the DISK page.
        for pgno in range(count - 1):
            out, done = tier.load_run(pgno, count - pgno)
            assert out is not None and done == count - 1 - pgno
            assert out[: done * PAGE_SIZE] == expected[pgno * PAGE_SIZE :]
        assert tier.load_run(count - 1, 1) == (None, 0)
    finally:
        tier.table.state[count - 1] = 0
        tier.close()


@needs_native
def test_a_damaged_arena_copy_is_an_error_not_garbage() -> None:
    tier = RamTier(4, 16 * PAGE_SIZE, allocator="zbud")
    try:
        tier.store(1, page_of("data", 1, 1000))
        handle = tier._handle[1]
        addr, size = handle >> HANDLE_SHIFT, handle & HANDLE_LENGTH_MASK
        tier.arena.map[addr : addr + size] = b"\xff" * size
        with pytest.raises(ValueError, match="page 1"):
            tier.load_run(0, 4)
    finally:
        tier.close()


@needs_native
def test_a_full_arena_ends_the_run_and_the_rest_stays_untouched() -> None:
    tier = RamTier(64, 4 * PAGE_SIZE, allocator="zbud", overcommit=False)
    try:
        data = b"".join(page_of("random", i, 0) for i in range(8))
        done, raws = tier.store_pages(0, memoryview(data))
        assert done == 4 and raws == [0, 1, 2, 3]
        assert [tier.state(p) for p in range(8)] == [RAM] * 4 + [0] * 4
        with pytest.raises(ArenaFull):
            tier.store_run(0, memoryview(data))  # as `store` of page 4 would
        tier.check()
    finally:
        tier.close()


def test_the_pure_python_path_stores_and_loads_runs_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ram_module, "native", None)
    tier = RamTier(16, 16 * PAGE_SIZE)
    try:
        assert tier.load_run(0, 4) == (None, 0)
        data = b"".join(page_of(k, 3, 900) for k in ("data", "zero", "random", "same"))
        assert tier.store_pages(0, memoryview(data)) == (4, [2])
        assert b"".join(tier.load(p) for p in range(4)) == data
        with pytest.raises(NoSpace):
            RamTier(16, PAGE_SIZE).store_run(0, memoryview(data + data))
    finally:
        tier.close()


@needs_native
def test_a_split_object_whose_chain_is_damaged_is_an_error_not_garbage() -> None:
    tier = RamTier(64, 64 * PAGE_SIZE, allocator="zsmalloc")
    try:
        # Objects of 3000 bytes cross frame ends; chain the frames apart.
        zs = tier.allocator
        for pgno in range(0, 16, 2):
            tier.store(pgno, page_of("random", pgno, 0))
        for pgno in range(0, 16, 2):
            tier.discard(pgno)
        for pgno in range(16, 40):
            tier.store(pgno, page_of("data", pgno, 3000))
        split = [p for p in range(64) if tier.state(p) == RAM and tier._handle[p] & HANDLE_SPLIT]
        assert split, "no object was split across frames"
        pgno = split[0]
        frame = (tier._handle[pgno] >> HANDLE_SHIFT) // PAGE_SIZE
        assert tier.load_run(pgno, 1)[0] == tier.load(pgno)
        saved = zs.zs_next[frame]
        for bad in (-1, tier.arena.frame_count, 1 << 30):
            zs.zs_next[frame] = bad
            with pytest.raises(ValueError, match=f"page {pgno}"):
                tier.load_run(pgno, 1)
        zs.zs_next[frame] = saved
    finally:
        tier.close()


@needs_native
def test_decode_refuses_a_range_outside_its_buffers() -> None:
    assert native is not None
    state, handles, arena = bytearray(4), array("Q", [0] * 4), bytearray(PAGE_SIZE)
    out = bytearray(4 * PAGE_SIZE)
    for first, count in ((1 << 62, 1 << 62), (3, 2), (-1, 1), (0, 5)):
        with pytest.raises(ValueError, match="outside"):
            native.decode(state, handles, arena, first, count, out)
    assert native.decode(state, handles, arena, 0, 4, out) == 4
    with pytest.raises(ValueError, match="int32"):
        native.decode(state, handles, arena, 0, 4, out, array("q", [0]))
    assert native.decode(state, handles, arena, 0, 4, out, array("i", [-1])) == 4


@needs_native
def test_the_encoder_thread_encodes_as_encode_does_and_closes_with_work_pending() -> None:
    assert native is not None
    rng = random.Random(3)
    runs = []
    for n in range(1, 9):
        data = b"".join(
            page_of(rng.choice(["zero", "same", "data", "random"]), rng.randrange(10**6), 2000)
            for _ in range(n * 4)
        )
        runs.append((data, encode_run(data, 3584)))
    encoder = native.Encoder()
    try:
        outputs = []
        for run_id, (data, _) in enumerate(runs):
            count = len(data) // PAGE_SIZE
            bufs = bytearray(len(data)), array("i", [0] * count), array("Q", [0] * count)
            encoder.submit(run_id, data, 3584, *bufs)
            outputs.append(bufs)
        collected: list[int] = []
        while len(collected) < len(runs):
            select.select([encoder.fd], [], [], 10)
            collected += encoder.collect()
        assert collected == list(range(len(runs)))  # in submission order
        for (_, (out, sizes, words)), (got_out, got_sizes, got_words) in zip(
            runs, outputs, strict=True
        ):
            assert got_sizes == sizes and got_words == words
            for i, size in enumerate(sizes):
                if 0 < size < PAGE_SIZE:
                    block = slice(i * PAGE_SIZE, i * PAGE_SIZE + size)
                    assert got_out[block] == out[block]
        # Closing with runs submitted and not collected finishes them and
        # lets go of their buffers; the encoder then refuses work.
        pending = bytearray(len(runs[-1][0]))
        count = len(pending) // PAGE_SIZE
        encoder.submit(
            99, runs[-1][0], 3584, pending, array("i", [0] * count), array("Q", [0] * count)
        )
    finally:
        encoder.close()
    pending.extend(b"x")  # resizable again: the job let go of it
    with pytest.raises(ValueError, match="closed"):
        encoder.submit(
            100,
            runs[0][0],
            3584,
            bytearray(PAGE_SIZE * 4),
            array("i", [0] * 4),
            array("Q", [0] * 4),
        )


def _threads() -> dict[str, int]:
    """This process's threads and the signals each blocks (a bit mask)."""
    out = {}
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/status") as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    out[task] = int(line.split()[1], 16)
    return out


@needs_native
def test_signals_never_land_on_the_encoder_thread() -> None:
    """SIGTERM and SIGHUP must reach the interpreter (shutdown, reload)."""
    assert native is not None
    before = _threads()
    encoder = native.Encoder()
    try:
        # A new thread may start with everything blocked until it runs: let
        # it encode a page first, so its own mask is the one read.
        sizes, words = array("i", [0]), array("Q", [0])
        encoder.submit(1, ZERO_PAGE, 3584, bytearray(PAGE_SIZE), sizes, words)
        done: list[int] = []
        while not done:
            select.select([encoder.fd], [], [], 10)
            done += encoder.collect()
        new = {task: mask for task, mask in _threads().items() if task not in before}
        assert len(new) == 1, "the encoder runs on one thread of its own"
        (mask,) = new.values()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            assert mask >> (sig - 1) & 1, f"{sig.name} is not blocked on the encoder thread"
        for sig in (signal.SIGSEGV, signal.SIGBUS):  # faults stay deliverable
            assert not mask >> (sig - 1) & 1, f"{sig.name} is blocked on the encoder thread"
    finally:
        encoder.close()


def _zsmalloc_layout(tier: RamTier) -> dict[str, object]:
    """Everything zsmalloc and the page table hold, to compare two tiers by."""
    zs = tier.allocator
    assert isinstance(zs, Zsmalloc)
    lru = zs.lru
    return {
        "state": bytes(tier.table.state),
        "handles": bytes(tier.table.handle),
        "arrays": [
            bytes(a)
            for a in (
                zs.zs_head,
                zs.zs_next,
                zs.zs_class,
                zs.zs_inuse,
                zs.zs_freeobj,
                zs.zs_fresh,
                zs.lists.head,
                zs.lists.prev,
                zs.lists.next,
                zs.lists.list_of,
            )
        ],
        "lru": (lru.seq, bytes(lru.stamp), lru.queue[lru.head :].tobytes()),
        "fragmented": zs._fragmented,
        "stats": tier.stats(),
    }


@needs_native
@pytest.mark.parametrize("overcommit", [True, False])
def test_zs_place_leaves_zsmalloc_exactly_as_the_python_loop_does(
    overcommit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs and single pages of every kind, over pages in every state (DISK
    too), in an arena that fills up, with the LRU cleaned often, and pages
    written back (released) a run at a time: the C loops and the Python
    loop leave the same slots, lists, LRU and counters, page for page, and
    the C loops store and release most of the pages."""
    assert NATIVE_PLACE is not None
    monkeypatch.setattr(StampLRU, "_SLACK", 40)  # clean the LRU every few runs
    rng = random.Random(overcommit)
    pages = 256
    c_path = RamTier(pages, 96 * PAGE_SIZE, overcommit=overcommit)
    py_path = RamTier(pages, 96 * PAGE_SIZE, overcommit=overcommit)
    py_path._placer = None
    zs = c_path._placer
    assert zs is not None
    real_place_run = zs.place_run
    in_c = placed = 0

    def counted(first: int, start: int, count: int, *buffers: object) -> int:
        nonlocal in_c
        done = real_place_run(first, start, count, *buffers)  # type: ignore[arg-type]
        in_c += done - start
        return done

    zs.place_run = counted  # type: ignore[method-assign]
    real_place_one = zs.place_one
    real_release_run = zs.release_run
    singles_in_c = singles = released_in_c = released = 0

    def counted_one(pgno: int, size: int, obj: bytearray) -> bool:
        nonlocal singles_in_c
        done = real_place_one(pgno, size, obj)
        singles_in_c += done
        return done

    def counted_release(run: array[int], start: int) -> int:
        nonlocal released_in_c
        done = real_release_run(run, start)
        released_in_c += done - start
        return done

    zs.place_one = counted_one  # type: ignore[method-assign]
    zs.release_run = counted_release  # type: ignore[method-assign]
    kinds = ["zero", "same", "random", "data", "data", "data", "data"]
    sizes = (300, 900, 1500, 2600)
    cleans = 0
    try:
        for step in range(600):
            action = rng.random()
            first = rng.randrange(pages - 2)
            if action < 0.08:
                count = rng.randrange(1, 40)
                for tier in (c_path, py_path):
                    tier.discard(first, min(count, pages - first))
            elif action < 0.1:
                for tier in (c_path, py_path):
                    tier.compact()
            elif action < 0.16:  # written back: the image holds these now
                ram = [p for p in range(first, min(pages, first + 24)) if c_path.state(p) == RAM]
                c_path.release_pages(ram)
                for pgno in ram:
                    py_path.release(pgno)
                released += len(ram)
            elif action < 0.3:  # a single-page write
                page = page_of(
                    rng.choice(kinds),
                    rng.randrange(10**6),
                    rng.choice(sizes) + rng.randrange(40),
                )
                outcomes = []
                for tier in (c_path, py_path):
                    try:
                        outcomes.append(tier.store(first, page))
                    except (StoreError, ArenaFull) as exc:
                        outcomes.append(type(exc).__name__)
                assert outcomes[0] == outcomes[1], f"step {step}"
                singles += c_path.state(first) == RAM
            else:
                count = rng.randrange(2, min(40, pages - first) + 1)
                # A few sizes, each straddling class boundaries, so that
                # overwrites stay in place or move, and classes fill up.
                data = b"".join(
                    page_of(
                        rng.choice(kinds),
                        rng.randrange(10**6),
                        rng.choice(sizes) + rng.randrange(40),
                    )
                    for _ in range(count)
                )
                outcomes = []
                queue = c_path.allocator.lru.queue  # type: ignore[attr-defined]
                for tier in (c_path, py_path):
                    try:
                        outcomes.append(tier.store_pages(first, memoryview(data)))
                    except StoreError as exc:
                        outcomes.append(type(exc).__name__)
                assert outcomes[0] == outcomes[1], f"step {step}"
                cleans += c_path.allocator.lru.queue is not queue  # type: ignore[attr-defined]
                if isinstance(outcomes[0], tuple):
                    placed += outcomes[0][0]
            assert _zsmalloc_layout(c_path) == _zsmalloc_layout(py_path), f"step {step}"
        for pgno in range(pages):
            if c_path.state(pgno) != DISK:
                assert c_path.load(pgno) == py_path.load(pgno), f"page {pgno}"
        c_path.check()
        assert c_path.stats()["alloc_failures"] > 0, "the arena never filled up"
        assert c_path.stats()["disk_pages"] > 0, "no page was ever written back"
        assert cleans > 5, "the LRU was hardly ever cleaned"
        assert in_c > placed // 2, f"the C loop stored only {in_c} of {placed} pages"
        assert singles_in_c > singles // 2, f"C stored {singles_in_c} of {singles} single pages"
        assert released_in_c > released // 2, f"C released {released_in_c} of {released} pages"
    finally:
        c_path.close()
        py_path.close()


@needs_native
def test_zs_place_takes_runs_longer_than_its_entries_and_new_zspages_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs of hundreds of pages (more than one call's LRU entries), into an
    empty tier and over it again: on the first write the C loop gets its
    zspages made and stores every page itself, and every run ends as the
    Python path leaves it."""
    assert NATIVE_PLACE is not None
    monkeypatch.setattr(StampLRU, "_SLACK", 100)  # cleans within the runs too
    pages = 1600
    c_path = RamTier(pages, 1024 * PAGE_SIZE)
    py_path = RamTier(pages, 1024 * PAGE_SIZE)
    py_path._placer = None
    rng = random.Random(5)

    def no_python_place(*args: object) -> None:
        raise AssertionError("a compressed page took the Python path")

    try:
        data = b""
        # After the discard, the LRU holds far more stale entries than live
        # ones: rewrites in place (the same data again) fill it up to where
        # a clean would drop them, calls of 256 entries at a time.
        for first, count in ((0, 700), (700, 300), (100, 900), (0, 1600), (0, 800), (0, 800)):
            if count == 800:
                data = data[: 800 * PAGE_SIZE]
                for tier in (c_path, py_path):
                    tier.discard(800, 800)
            else:
                data = b"".join(
                    page_of("data", rng.randrange(10**6), 1200 + rng.randrange(60))
                    for _ in range(count)
                )
            if first == 0 and count == 700:  # a first write: nothing to free
                c_path._place = no_python_place  # type: ignore[method-assign]
            for tier in (c_path, py_path):
                assert tier.store_pages(first, memoryview(data)) == (count, [])
            vars(c_path).pop("_place", None)
            assert _zsmalloc_layout(c_path) == _zsmalloc_layout(py_path), (first, count)
        assert c_path.stats()["zspages"] > 10
        c_path.check()
    finally:
        c_path.close()
        py_path.close()


@needs_native
def test_zs_place_refuses_tables_that_do_not_add_up() -> None:
    """A bad index in zsmalloc's tables is an error that changes nothing,
    never a write elsewhere; what a run did before it stays counted."""
    assert NATIVE_PLACE is not None
    tier = RamTier(64, 64 * PAGE_SIZE)
    zs = tier.allocator
    assert isinstance(zs, Zsmalloc)
    try:
        data = b"".join(page_of("data", i, 1000) for i in range(4))
        tier.store_pages(0, memoryview(data))  # a zspage of that class, partly used
        cls = zs.class_of[tier._handle[0] & HANDLE_LENGTH_MASK]
        head = zs.lists.head[2 * cls]
        run = encode_run(data, 3584)
        zeros = encode_run(bytes(len(data)), 3584)  # frees the old objects
        for table, index, bad, at, encoded in (
            (zs.lists.head, 2 * cls, tier.arena.frame_count, 8, run),
            (zs.zs_fresh, head, -16, 8, run),
            (zs.zs_fresh, head, len(tier.arena.map), 8, run),
            (zs.zs_class, head, cls + 1, 8, run),
            (zs.zs_head, head, tier.arena.frame_count, 0, zeros),
            (tier._handle, 0, tier._handle[0] | HANDLE_LENGTH_MASK, 0, run),  # 8191 bytes
            (tier._handle, 0, (len(tier.arena.map) + 4) << HANDLE_SHIFT | 1000, 0, run),
        ):
            saved = table[index]
            table[index] = bad
            before = bytes(tier.arena.map), _zsmalloc_layout(tier)
            with pytest.raises(ValueError, match=f"inconsistent at page {at}"):
                zs.place_run(at, 0, 4, *encoded)
            assert (bytes(tier.arena.map), _zsmalloc_layout(tier)) == before
            table[index] = saved
        out, sizes, words = run
        # Two pages stored, then a bad table: the two stay stored and counted.
        tier.store_pages(20, memoryview(data[: 3 * PAGE_SIZE]))
        saved = tier._handle[22]
        tier._handle[22] = saved | HANDLE_LENGTH_MASK
        with pytest.raises(ValueError, match="inconsistent at page 22"):
            tier.store_pages(20, memoryview(bytes(3 * PAGE_SIZE)))
        tier._handle[22] = saved
        assert [tier.state(p) for p in (20, 21, 22)] == [ZERO, ZERO, RAM]
        tier.check()  # the payload bytes and live objects of the two were counted
        # Written back: a bad table stops the release before the page changes.
        run_of = array("I", [0, 1, 2])
        frame = (tier._handle[1] >> HANDLE_SHIFT) // PAGE_SIZE
        saved = zs.zs_head[frame]
        zs.zs_head[frame] = tier.arena.frame_count
        before = bytes(tier.arena.map), _zsmalloc_layout(tier)
        with pytest.raises(ValueError, match="inconsistent at page 1"):
            zs.release_run(run_of, 1)
        assert (bytes(tier.arena.map), _zsmalloc_layout(tier)) == before
        zs.zs_head[frame] = saved
        with pytest.raises(ValueError, match="bad counters or pages"):
            zs.release_run(run_of, 4)
        assert NATIVE_RELEASE is not None
        with pytest.raises(ValueError, match="bad counters or pages"):
            NATIVE_RELEASE(zs._tables, array("q", bytes(40)), run_of, 0)
        # Pages released before a bad table stay released and counted.
        tier.store_pages(40, memoryview(data))
        frame = (tier._handle[43] >> HANDLE_SHIFT) // PAGE_SIZE
        saved = zs.zs_head[frame]
        zs.zs_head[frame] = tier.arena.frame_count
        with pytest.raises(ValueError, match="inconsistent at page 43"):
            tier.release_pages([40, 41, 43])
        zs.zs_head[frame] = saved
        assert [tier.state(p) for p in (40, 41, 42, 43)] == [DISK, DISK, RAM, RAM]
        tier.check()
        tables = zs._tables
        counters = array("q", bytes(48))
        entries = array("Q", bytes(8 * 4))
        with pytest.raises(ValueError, match="wrong size"):
            NATIVE_PLACE(
                (*tables[:1], array("H", bytes(128)), *tables[2:]),
                counters,
                8,
                0,
                4,
                out,
                sizes,
                words,
                entries,
            )
        with pytest.raises(ValueError, match="bad counters, run"):
            NATIVE_PLACE(tables, counters, 62, 0, 4, out, sizes, words, entries)
        with pytest.raises(TypeError):
            NATIVE_PLACE(tables[:-1], counters, 8, 0, 4, out, sizes, words, entries)
        assert tier.store_pages(8, memoryview(data)) == (4, [])
        assert [tier.load(p) for p in range(8, 12)] == [tier.load(p) for p in range(4)]
        tier.check()
    finally:
        tier.close()
