"""The RAM tier: a `PageStore` of lz4-compressed pages packed in one arena.

`RamTier` ties the pieces together: the page table (`pagetable`), the codec
(`codec`: zero and same-filled pages, lz4, the incompressible rule), the
arena of frames (`arena`) and one allocator (`zbud`, `z3fold` or
`zsmalloc`).  It owns the store/load/discard/zero semantics of the
`PageStore` contract, the capacity rules, and the operator's counters.

Write path: zero and same-filled pages only change the page table.  Other
pages are compressed; an overwrite first tries to stay where the old copy
is (same slot, same size class), else a new object is allocated and
written, the page table switched to it, and only then the old object freed,
so a failure at any point leaves the previous content readable.

Capacity.  Without a backing image (``overcommit=True``, the default) the
device is overcommitted like zram: a write to a HOLE that needs a new frame
when only the reserve is left raises `NoSpace` (ENOSPC); any other write
(the page is allocated: ZERO, SAME, RAM or DISK) may use the reserve, and if
even that is gone raises `StoreIOError` (EIO).  Both are counted.  With a
backing image behind the tier (``overcommit=False``) the image is the
guarantee, not the tier: there is no reserve by default, and a write that
finds no frame raises `ArenaFull` for the caller to make room (write back,
release) and retry.  zsmalloc compacts before giving up.  In every case a
refused write leaves the page as it was.

LRU and writeback: the allocator keeps the LRU in *store order*; a read
does not make a page hot, since a swapped-out page that is read back lives
in the client's memory again and the copy here is the least likely to be
needed.  The API for writeback:

- `coldest_pages(n)`: pages in RAM from the cold end, coldest first.  zbud
  and z3fold evict whole frames, so the list holds every page of each frame
  it reaches (it may exceed `n` by up to two pages); zsmalloc lists objects.
- `load(pgno)` gives the content to write to the image.
- `release(pgno)` drops the RAM copy once the image holds it (state DISK).
- `make_cold(pgno)` moves a page (for zbud/z3fold, its frame) to the cold
  end: exclusive gets in ``lazy`` mode.
- `compact()` asks the allocator to give whole frames back.

`load` always returns immutable bytes (a raw page is copied out of the
arena), and `store` never keeps a reference to the caller's buffer.
`patch` is a read-modify-write of one page; `flush` and `sync_pages` have
nothing to wait for in RAM.

Counters are plain ints updated on the write path only where they cannot be
derived later; `stats()` computes the rest (page counts per state are a
C-speed count over the state bytes).  Names follow zram's ``mm_stat`` where
one exists.

Everything runs on the caller's thread; nothing here locks.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Final, NoReturn

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
from nbdcache.tier.arena import (
    HANDLE_LENGTH_MASK,
    HANDLE_SHIFT,
    HANDLE_SPLIT,
    NIL,
    Allocator,
    Arena,
    ArenaFull,
)
from nbdcache.tier.codec import (
    DEFAULT_INCOMPRESSIBLE_THRESHOLD,
    Codec,
    Encoded,
    decompress_page,
    expand_word,
    filled_word,
    native,
)
from nbdcache.tier.pagetable import PageTable, anonymous_array
from nbdcache.tier.z3fold import Z3fold
from nbdcache.tier.zbud import Zbud
from nbdcache.tier.zsmalloc import NATIVE_PLACE, ZS_MAX_PAGES_PER_ZSPAGE, Zsmalloc

if TYPE_CHECKING:
    import asyncio

ALLOCATORS: Final = {"zsmalloc": Zsmalloc, "zbud": Zbud, "z3fold": Z3fold}
DEFAULT_ALLOCATOR: Final = "zsmalloc"


def default_reserve(frame_count: int) -> int:
    """Frames held back for overwrites: 1/64 of the arena, at least one zspage."""
    return min(max(ZS_MAX_PAGES_PER_ZSPAGE, frame_count // 64), frame_count // 4)


#: Pages per step of a range discard, and that many zero handles to copy.
_CHUNK: Final = 1 << 16
_ZERO_HANDLES: Final = anonymous_array("Q", _CHUNK)

#: Runs of up to this many pages encode into buffers kept for reuse (1 MiB).
_SCRATCH_PAGES: Final = 256


class RamTier:
    """A `PageStore` of `page_count` pages backed by `ram_bytes` of arena.

    `allocator` is ``zsmalloc``, ``z3fold`` or ``zbud``; `compressor` is
    ``lz4`` or ``none``.  `incompressible_threshold` is the largest
    compressed size worth packing (default 3584, 7/8 of a page).
    `overcommit` selects the capacity rules (see the module docstring):
    True without a backing image, False when one stands behind the tier.
    `reserve_frames` is the reserve for overwrites (default
    `default_reserve` when overcommitted, else 0).
    """

    def __init__(
        self,
        page_count: int,
        ram_bytes: int,
        allocator: str = DEFAULT_ALLOCATOR,
        compressor: str = "lz4",
        incompressible_threshold: int = DEFAULT_INCOMPRESSIBLE_THRESHOLD,
        reserve_frames: int | None = None,
        overcommit: bool = True,
    ) -> None:
        if allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {allocator!r}; choose one of {list(ALLOCATORS)}")
        self.codec = Codec(compressor, incompressible_threshold)
        self.table = PageTable(page_count)
        frames = ram_bytes >> PAGE_SHIFT
        if frames < 1:
            raise ValueError(f"ram_bytes must hold at least one {PAGE_SIZE}-byte frame")
        if reserve_frames is None:
            reserve_frames = default_reserve(frames) if overcommit else 0
        self.overcommit = overcommit
        self.arena = Arena(ram_bytes, reserve_frames)
        self.allocator: Allocator = ALLOCATORS[allocator](self.arena, self.table)
        # Write-path counters (the rest is derived in `stats`).
        self.compr_data_size = 0  # payload bytes of RAM pages
        self.huge_pages = 0  # RAM pages kept raw
        self.incompressible = 0  # pages stored raw because lz4 gave up, ever
        self.alloc_failures = 0
        self.enospc_errors = 0
        self.eio_errors = 0
        # Hot-path shortcuts.
        self._state = self.table.state
        self._handle = self.table.handle
        self._map = self.arena.map
        self._view = self.arena.view
        self._encode = self.codec.encode
        self._alloc = self.allocator.alloc
        # The C loops encode the pages, when they are compressed with lz4.
        self._native = native if compressor == "lz4" else None
        self._threshold = self.codec.threshold
        # Where a split object continues (zsmalloc's frame chains), for `decode`.
        zsmalloc = self.allocator if isinstance(self.allocator, Zsmalloc) else None
        self._spans = None if zsmalloc is None else zsmalloc.zs_next
        # zsmalloc stores the common pages of a run in C (`store_pages`).
        self._placer = zsmalloc if self._native is not None and NATIVE_PLACE is not None else None
        self._page_out = bytearray(PAGE_SIZE)
        self._page_view = memoryview(self._page_out)
        self._scratch_out = bytearray(_SCRATCH_PAGES << PAGE_SHIFT)
        self._scratch_sizes = array("i", bytes(4 * _SCRATCH_PAGES))
        self._scratch_words = array("Q", bytes(8 * _SCRATCH_PAGES))

    @property
    def page_count(self) -> int:
        return self.table.page_count

    # -- PageStore ---------------------------------------------------------

    def load(self, pgno: int) -> bytes:
        state = self._state[pgno]
        if state == RAM:
            handle = self._handle[pgno]
            size = handle & HANDLE_LENGTH_MASK
            addr = handle >> HANDLE_SHIFT
            if size == PAGE_SIZE:
                return self._map[addr : addr + PAGE_SIZE]  # a copy: the arena changes
            if handle & HANDLE_SPLIT:
                return decompress_page(self.allocator.read_span(addr, size))
            return decompress_page(self._view[addr : addr + size])
        if state == SAME:
            return expand_word(self._handle[pgno])
        if state == DISK:
            self.eio_errors += 1
            raise StoreIOError(f"page {pgno} is only in the backing image")
        return ZERO_PAGE

    def store(self, pgno: int, data: bytes | memoryview) -> None:
        # The write path of every page the client sends: kept flat on purpose.
        if self._native is not None:
            size = self._native.encode_page(data, self._threshold, self._page_out)
            if size < 0:
                word = int.from_bytes(data[:8], "little")
                self._fill(pgno, SAME if word else ZERO, word)
            elif size == PAGE_SIZE:
                self._place(pgno, data, PAGE_SIZE)  # copied into the arena
                self.incompressible += 1
            else:
                placer = self._placer
                if placer is not None and placer.place_one(pgno, size, self._page_out):
                    self.compr_data_size += placer.run_bytes
                    return
                self._place(pgno, self._page_view[:size], size)
            return
        page = data if type(data) is bytes else bytes(data)
        if len(page) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(page)}")
        # Only a page whose first two words start alike can be same-filled
        # (zero pages included): most pages skip the call.
        if page[0] == page[8]:
            word = filled_word(page)
            if word >= 0:
                self._fill(pgno, SAME if word else ZERO, word)
                return
        obj = self._encode(page)
        self._place(pgno, obj, len(obj))
        if len(obj) == PAGE_SIZE and self.codec.compressor == "lz4":
            self.incompressible += 1

    def encode_threshold(self, first: int = 0, count: int = 0) -> int | None:
        """The threshold to encode runs for `store_pages` with, elsewhere
        (`nbdcache.tier.encoder`); None when there is nothing to do so."""
        return None if self._native is None else self._threshold

    def store_run(
        self, first: int, data: memoryview, encoded: Encoded | None = None
    ) -> list[asyncio.Future[None]]:
        done = self.store_pages(first, data, encoded)[0]
        if done < len(data) >> PAGE_SHIFT:
            at = done << PAGE_SHIFT
            self.store(first + done, data[at : at + PAGE_SIZE])  # raises ArenaFull
        return []

    def store_pages(
        self, first: int, data: memoryview, encoded: Encoded | None = None
    ) -> tuple[int, list[int]]:
        """Store the whole pages of `data` at `first`, `first`+1, ... in order.

        The same as `store` page by page, with the encoding of the whole run
        done in one C call when `codec.native` is there, or beforehand:
        `encoded` is `data` encoded with `encode_threshold`.  Errors are those of
        `store`, except that a full arena in front of a backing image
        (`ArenaFull`) ends the run instead: returns how many pages were
        stored, and which of them were kept raw (incompressible).
        """
        count = len(data) >> PAGE_SHIFT
        raws: list[int] = []
        if self._native is None or count < 2:
            for i in range(count):
                pgno = first + i
                try:
                    self.store(pgno, data[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT])
                except ArenaFull:
                    return i, raws
                if self.is_raw(pgno):
                    raws.append(pgno)
            return count, raws
        if encoded is None:
            out, sizes, words = self._scratch(count)
            self._native.encode(data, self._threshold, out, sizes, words)
        else:
            out, sizes, words = encoded
        view = memoryview(out)
        place = self._place
        placer = self._placer
        i = 0
        while i < count:
            if placer is not None:
                # The common pages in C; the loop below takes the one it left.
                try:
                    i = placer.place_run(first, i, count, out, sizes, words)
                finally:
                    self.compr_data_size += placer.run_bytes
                if i == count:
                    break
            size = sizes[i]
            pgno = first + i
            if size < 0:
                word = words[i]
                self._fill(pgno, SAME if word else ZERO, word)
            else:
                start = i << PAGE_SHIFT
                raw = size == PAGE_SIZE
                obj = data[start : start + PAGE_SIZE] if raw else view[start : start + size]
                try:
                    place(pgno, obj, size)
                except ArenaFull:
                    return i, raws
                if raw:
                    self.incompressible += 1
                    raws.append(pgno)
            i += 1
        return count, raws

    def _scratch(self, count: int) -> tuple[bytearray, array[int], array[int]]:
        """Output buffers for `native.encode` of `count` pages.

        Small runs (most requests) reuse one set: nothing holds on to them
        past `store_run`, which runs to the end on the caller's thread.
        """
        if count > _SCRATCH_PAGES:
            return (
                bytearray(count << PAGE_SHIFT),
                array("i", bytes(4 * count)),
                array("Q", bytes(8 * count)),
            )
        return self._scratch_out, self._scratch_sizes, self._scratch_words

    def load_run(self, first: int, count: int) -> tuple[bytearray | None, int]:
        """Pages `first`.. expanded into one buffer while they are in RAM or
        need no arena (HOLE, ZERO, SAME).

        Stops at a DISK page; serves nothing without `codec.native`.
        """
        if native is None or self._state[first] == DISK:
            return None, 0
        out = bytearray(count << PAGE_SHIFT)
        done: int = native.decode(
            self._state, self._handle, self._map, first, count, out, self._spans
        )
        return out, done

    def _place(self, pgno: int, obj: bytes | memoryview, size: int) -> None:
        """Put an encoded page (`size` bytes, `PAGE_SIZE` for raw) in the arena."""
        state = self._state
        old_state = state[pgno]
        if old_state == RAM:
            self._overwrite(pgno, obj, size)
            return
        try:
            handle = self._alloc(size, pgno, old_state != HOLE)
        except ArenaFull:
            self._refuse(pgno, old_state != HOLE)
        if handle & HANDLE_SPLIT:
            self.allocator.write_span(handle >> HANDLE_SHIFT, obj)
        else:
            addr = handle >> HANDLE_SHIFT
            self._map[addr : addr + size] = obj
        self._handle[pgno] = handle
        state[pgno] = RAM
        self.compr_data_size += size
        if size == PAGE_SIZE:
            self.huge_pages += 1

    def patch(self, pgno: int, start: int, data: bytes | memoryview) -> None:
        if start < 0 or start + len(data) > PAGE_SIZE:
            raise ValueError(f"patch of {len(data)} bytes at {start} does not fit a page")
        page = bytearray(self.load(pgno))
        page[start : start + len(data)] = data
        self.store(pgno, bytes(page))

    def discard(self, first: int, count: int = 1) -> None:
        if count == 1:
            self._fill(first, HOLE, 0)
            return
        # Only RAM pages need work (their arena copies); the rest of the
        # range becomes holes with slice assignments, a chunk at a time.
        end = first + count
        state = self._state
        pos = state.find(RAM, first, end)
        while pos >= 0:
            self._drop(pos)
            pos = state.find(RAM, pos + 1, end)
        for lo in range(first, end, _CHUNK):
            hi = min(end, lo + _CHUNK)
            state[lo:hi] = bytes(hi - lo)
            self._handle[lo:hi] = _ZERO_HANDLES[: hi - lo]

    def zero(self, pgno: int, allocate: bool) -> None:
        self._fill(pgno, ZERO if allocate else HOLE, 0)

    def extents(self, first: int, count: int) -> list[tuple[int, int]]:
        return self.table.extents(first, count)

    def flush(self) -> asyncio.Future[None] | None:
        """Nothing to make durable: RAM pages die with the process."""
        return None

    def sync_pages(self, first: int, count: int) -> asyncio.Future[None] | None:
        """Nothing to make durable: RAM pages die with the process."""
        return None

    # -- write path helpers ------------------------------------------------

    def _refuse(self, pgno: int, allocated: bool) -> NoReturn:
        """The arena is full: apply the capacity rules and raise.

        With a backing image behind the tier, `ArenaFull` goes to the caller.
        Otherwise an allocated page (not a hole) could use the reserve and
        still found no room: EIO; a hole gets ENOSPC.
        """
        self.alloc_failures += 1
        if not self.overcommit:
            raise ArenaFull(f"RAM tier full: no frame for page {pgno}")
        if allocated:
            self.eio_errors += 1
            raise StoreIOError(f"RAM tier full, reserve exhausted: cannot overwrite page {pgno}")
        self.enospc_errors += 1
        raise NoSpace(f"RAM tier full: no room for page {pgno}")

    def _overwrite(self, pgno: int, obj: bytes | memoryview, size: int) -> None:
        """Replace a RAM page: in place if its slot fits, else copy then free."""
        handles = self._handle
        allocator = self.allocator
        old = handles[pgno]
        handle = allocator.realloc(old, size, pgno)
        if handle == NIL:
            try:
                handle = self._alloc(size, pgno, True)
            except ArenaFull:
                self._refuse(pgno, True)
            # The allocation may have compacted (zsmalloc) and moved this
            # page's old copy: free it where it is now, not where it was.
            old = handles[pgno]
            self._write(handle, obj)
            # Point the page at its new copy before freeing the old one:
            # freeing may move other objects (z3fold) through the table.
            handles[pgno] = handle
            allocator.free(old)
        elif handle & HANDLE_SPLIT:
            allocator.write_span(handle >> HANDLE_SHIFT, obj)
            handles[pgno] = handle
        else:  # in place, the common case: `_write` inlined
            addr = handle >> HANDLE_SHIFT
            self._map[addr : addr + size] = obj
            handles[pgno] = handle
        old_size = old & HANDLE_LENGTH_MASK
        self.compr_data_size += size - old_size
        self.huge_pages += (size == PAGE_SIZE) - (old_size == PAGE_SIZE)

    def _write(self, handle: int, obj: bytes | memoryview) -> None:
        addr = handle >> HANDLE_SHIFT
        if handle & HANDLE_SPLIT:
            self.allocator.write_span(addr, obj)
        else:
            self._map[addr : addr + len(obj)] = obj

    def _drop(self, pgno: int) -> None:
        """Free the arena copy of a RAM page (the caller sets its new state)."""
        handle = self._handle[pgno]
        self.allocator.free(handle)
        size = handle & HANDLE_LENGTH_MASK
        self.compr_data_size -= size
        if size == PAGE_SIZE:
            self.huge_pages -= 1

    def _fill(self, pgno: int, state: int, word: int) -> None:
        """Make the page ZERO, SAME (with `word`) or HOLE: no arena space."""
        if self._state[pgno] == RAM:
            self._drop(pgno)
        self._handle[pgno] = word
        self._state[pgno] = state

    # -- writeback API -----------------------------------------------------

    def coldest_pages(self, count: int) -> list[int]:
        """Pages in RAM from the cold end of the LRU, coldest first."""
        return self.allocator.coldest(count)

    def release(self, pgno: int) -> None:
        """Drop the RAM copy of a page the backing image now holds (-> DISK)."""
        if self._state[pgno] != RAM:
            raise ValueError(f"page {pgno} has no RAM copy to release")
        self._drop(pgno)
        self._handle[pgno] = 0
        self._state[pgno] = DISK

    def release_pages(self, pages: list[int]) -> None:
        """`release` of each of `pages`, in C (zsmalloc) where no frame
        changes hands."""
        placer = self._placer
        if placer is None or len(pages) < 2:
            for pgno in pages:
                self.release(pgno)
            return
        run = array("I", pages)
        i = 0
        while True:
            try:
                i = placer.release_run(run, i)
            finally:
                self.compr_data_size += placer.run_bytes
            if i == len(pages):
                return
            self.release(pages[i])
            i += 1

    def is_raw(self, pgno: int) -> bool:
        """Whether a RAM page is kept raw (it did not compress)."""
        return self._state[pgno] == RAM and self._handle[pgno] & HANDLE_LENGTH_MASK == PAGE_SIZE

    def on_disk(self, pgno: int) -> None:
        """The image got the page's newest content directly: drop what the
        tier held for it, whatever its state (-> DISK)."""
        self._fill(pgno, DISK, 0)

    def make_cold(self, pgno: int) -> None:
        """Move a RAM page (zbud, z3fold: its frame) to the cold end of the LRU."""
        if self._state[pgno] == RAM:
            self.allocator.make_cold(self._handle[pgno], pgno)

    def compact(self) -> int:
        """Let the allocator give whole frames back; returns frames freed."""
        return self.allocator.compact()

    def state(self, pgno: int) -> int:
        """The page's content state (HOLE, ZERO, SAME, RAM or DISK)."""
        return self._state[pgno]

    # -- operator's view ---------------------------------------------------

    @property
    def metadata_bytes(self) -> int:
        """Bookkeeping outside the arena: page table, allocator tables, LRU."""
        return (
            self.table.nbytes
            + self.allocator.page_metadata_bytes
            + self.allocator.frame_metadata_bytes
        )

    @property
    def page_metadata_bytes(self) -> int:
        """Bookkeeping per device page (budget: 16 bytes a page)."""
        return self.table.nbytes + self.allocator.page_metadata_bytes

    def stats(self) -> dict[str, int]:
        """Counters, named after zram's mm_stat where one exists."""
        table = self.table
        arena = self.arena
        stored = table.count(RAM)
        out = {
            "page_count": table.page_count,
            "pages_stored": stored,
            "zero_pages": table.count(ZERO),
            "same_pages": table.count(SAME),
            "disk_pages": table.count(DISK),
            "huge_pages": self.huge_pages,
            "huge_pages_since": self.incompressible,
            "orig_data_size": stored * PAGE_SIZE,
            "compr_data_size": self.compr_data_size,
            "mem_used_total": arena.frames_used * PAGE_SIZE,
            "mem_used_max": arena.frames_max * PAGE_SIZE,
            "mem_limit": arena.frame_count * PAGE_SIZE,
            "frames_used": arena.frames_used,
            "frames_total": arena.frame_count,
            "frames_reserve": arena.reserve,
            "frames_released": arena.frames_released,
            "metadata_bytes": self.metadata_bytes,
            "alloc_failures": self.alloc_failures,
            "enospc_errors": self.enospc_errors,
            "eio_errors": self.eio_errors,
            "compact_runs": 0,
            "pages_compacted": 0,
        }
        out.update(self.allocator.stats())
        return out

    def check(self) -> None:
        """Raise AssertionError unless the table, allocator and counters agree."""
        allocator = self.allocator
        allocator.check()
        objects = allocator.objects()
        pages = sorted(pgno for pgno, _, _ in objects)
        state = self._state
        in_ram = [pgno for pgno in range(self.page_count) if state[pgno] == RAM]
        assert pages == in_ram, "the allocator's objects are not the RAM pages"
        compr = huge = 0
        for pgno, addr, _ in objects:
            handle = self._handle[pgno]
            assert handle >> HANDLE_SHIFT == addr, f"page {pgno} handle points elsewhere"
            size = handle & HANDLE_LENGTH_MASK
            compr += size
            huge += size == PAGE_SIZE
        assert compr == self.compr_data_size, "compr_data_size is off"
        assert huge == self.huge_pages, "huge_pages is off"

    def close(self) -> None:
        """Give the arena back; only valid once no loaded view is in use."""
        self.arena.close()
