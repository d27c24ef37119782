"""zsmalloc: size classes over multi-frame zspages, the densest packing.

After mm/zsmalloc.c.  Every object size is rounded up to a *size class*
(multiples of 16 bytes from 32 to 4096).  A class carves *zspages* of one to
`ZS_MAX_PAGES_PER_ZSPAGE` frames into equal slots; the frame count is the one
that wastes the least at the zspage's end (the kernel's chain size rule), and
classes with the same frame and slot counts are merged.  The frames of a
zspage need not be adjacent in the arena (a new zspage takes frames in
address order, so they usually are): a slot may straddle two of them, and an
object that runs into a frame that is not the next one in the arena is
*split*: written and read in two pieces (`write_span`, `read_span`).

Each allocated slot starts with a 4-byte header holding the owner's page
number: that is the reverse map compaction uses, and it costs 4 bytes per
object of arena space.  A freed slot holds the address of the next free slot
of its zspage instead (the kernel's ``link_free``).  Slots never used yet
are handed out in order, from a per-zspage *fresh* pointer, once the free
list is empty: a new zspage costs no initialisation.

Non-full zspages of a class are on one of two fullness lists, *almost full*
(at least 3/4 of the slots used) and *almost empty*; allocation takes a slot
from an almost-full zspage first so that sparse zspages drain.  `compact`
moves objects from the sparsest zspages of each class into the fullest ones,
rewrites the moved pages' handles in the page table, and gives the emptied
zspages' frames back to the arena.  The tier calls it when a new zspage
cannot get frames, before it gives up.

Raw (incompressible) pages take a whole frame of their own ("huge" frames,
the kernel's huge class); their owner is kept in a side array.

Storing runs of pages: `place_run` hands the common cases (a slot from a
partly used zspage, an overwrite in place, a zero page over an object that
leaves its zspage in use) to a C loop, ``zs_place`` in _pages.c, which edits
these same tables in the same order.  Where frames must change hands the
loop stops: for a class with no room, `place_run` makes the new zspage as
`alloc` would and calls again; a raw page, a huge old object or a free that
empties a zspage goes back to the tier, which stores it through `alloc` and
`free`.  `place_one` does the same for a single-page write.  Pages written
back leave the same way: `release_run` (``zs_release``) frees their objects
while no zspage empties, and the tier releases the rest through `free`.

The LRU is per object, in store order: a `StampLRU` keyed by page number
(4 bytes per device page for the stamps).  Eviction therefore frees
objects, not frames; the space they leave is reclaimed by compaction.

Costs: per frame 42 bytes of side tables (chain links, per-zspage class,
use count, free and fresh pointers, fullness-list links, huge owners), plus
the LRU queue (at most 16 bytes per object).  Each class in use keeps about
one partly filled zspage, a fixed cost of roughly 1 MiB over all classes:
negligible for a tier of hundreds of megabytes, visible for a few dozen.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Final

from nbdcache.tier import HOLE, PAGE_SHIFT, PAGE_SIZE, RAM
from nbdcache.tier.arena import (
    HANDLE_LENGTH_MASK,
    HANDLE_SHIFT,
    HANDLE_SPLIT,
    NIL,
    STAMP_MASK,
    Arena,
    ArenaFull,
    FrameLists,
    ObjectInfo,
    Pieces,
    StampLRU,
)
from nbdcache.tier.codec import native
from nbdcache.tier.pagetable import PageTable

ZS_MIN_ALLOC_SIZE: Final = 32
ZS_SIZE_CLASS_DELTA: Final = 16
ZS_MAX_PAGES_PER_ZSPAGE: Final = 8
#: Bytes in front of every object: the owner's page number.
OBJ_HEADER_SIZE: Final = 4

_ALMOST_EMPTY: Final = 0
_ALMOST_FULL: Final = 1
HUGE_CLASS: Final = 0xFFFF
_OFFSET_MASK: Final = PAGE_SIZE - 1
#: Pages one call of `zs_place` stores in RAM, at most (LRU entries it buffers).
_RUN_ENTRIES: Final = 256


#: Why `zs_place` stopped short of a page it could store (its counters[5]).
_NO_ROOM: Final = 2
_NO_ZSPAGE: Final = 3


def _load_place() -> Callable[..., int] | None:
    """The C loop behind `place_run`, if the build has one for this layout."""
    layout = {
        "ZS_OBJ_HEADER_SIZE": OBJ_HEADER_SIZE,
        "ZS_HUGE_CLASS": HUGE_CLASS,
        "ZS_NO_ROOM": _NO_ROOM,
        "ZS_NO_ZSPAGE": _NO_ZSPAGE,
    }
    if (
        native is None
        or any(getattr(native, k, None) != v for k, v in layout.items())
        or not hasattr(native, "zs_release")
    ):
        return None
    place: Callable[..., int] = native.zs_place
    return place


#: `zs_place`, or None: then `place_run` must not be called.
NATIVE_PLACE: Final = _load_place()
#: The C loop behind `release_run`, from the same build as `NATIVE_PLACE`.
NATIVE_RELEASE: Final[Callable[..., int] | None] = (
    None if NATIVE_PLACE is None or native is None else native.zs_release
)


def chain_size(class_size: int, max_pages: int = ZS_MAX_PAGES_PER_ZSPAGE) -> int:
    """Frames per zspage for `class_size`: the fewest that waste the least."""
    best, best_waste = 1, PAGE_SIZE
    for pages in range(1, max_pages + 1):
        waste = (pages * PAGE_SIZE) % class_size
        if waste < best_waste:
            best, best_waste = pages, waste
    return best


def build_classes(max_pages: int = ZS_MAX_PAGES_PER_ZSPAGE) -> list[tuple[int, int, int]]:
    """The merged size classes as (slot size, frames per zspage, slots per zspage)."""
    classes: list[tuple[int, int, int]] = []
    for size in range(PAGE_SIZE, ZS_MIN_ALLOC_SIZE - 1, -ZS_SIZE_CLASS_DELTA):
        pages = chain_size(size, max_pages)
        objs = pages * PAGE_SIZE // size
        if classes and classes[-1][1:] == (pages, objs):
            continue  # a smaller size served by the larger class: same layout
        classes.append((size, pages, objs))
    classes.reverse()
    return classes


class Zsmalloc:
    """Size-class allocator with compaction; see the module docstring."""

    name = "zsmalloc"

    def __init__(
        self, arena: Arena, table: PageTable, max_pages: int = ZS_MAX_PAGES_PER_ZSPAGE
    ) -> None:
        frames = arena.frame_count
        self.arena = arena
        self._map = arena.map
        # Slots start 16-byte aligned, so a slot's owner (4 bytes) is
        # `_owner[start >> 2]` and a free slot's link to the next one
        # (8 bytes) is `_link[start >> 3]`: word views of the arena.
        self._owner = arena.words32
        self._link = arena.words64
        self.table = table
        self.handles = table.handle
        self.state = table.state
        classes = build_classes(max_pages)
        self.class_size = array("H", [c[0] for c in classes])
        self.class_pages = array("H", [c[1] for c in classes])
        self.class_objs = array("H", [c[2] for c in classes])
        # Slots used from which a zspage counts as almost full.
        self.class_full_at = array("H", [max(1, (3 * c[2] + 3) // 4) for c in classes])
        # class_of[n]: the class of an n-byte payload (header included).
        class_of = array("H", bytes(2 * (PAGE_SIZE + 1)))
        cls = 0
        for n in range(PAGE_SIZE + 1):
            while cls < len(classes) - 1 and classes[cls][0] < n + OBJ_HEADER_SIZE:
                cls += 1
            class_of[n] = cls
        self.class_of = class_of
        # Per frame: the zspage it belongs to (its first frame) and the next
        # frame of that zspage.  Per zspage, indexed by its first frame: class,
        # slots in use, first free slot, next never-used slot; huge frames
        # record their owner instead.
        self.zs_head = array("i", [NIL]) * frames
        self.zs_next = array("i", [NIL]) * frames
        self.zs_class = array("H", [0]) * frames
        self.zs_inuse = array("H", [0]) * frames
        self.zs_freeobj = array("q", [NIL]) * frames
        self.zs_fresh = array("q", [NIL]) * frames
        self.huge_owner = array("I", [0]) * frames
        # Fullness lists: list 2*class + (_ALMOST_EMPTY | _ALMOST_FULL).
        self.lists = FrameLists(frames, 2 * len(classes), masked=False)
        self.zspages = 0
        self.huge_frames = 0
        self.objects_live = 0
        self.compact_runs = 0
        self.pages_compacted = 0
        self.objects_moved = 0
        self._compacting = False
        # Set when a full zspage loses an object: only then can a class hold
        # more partial zspages than it needs, and compaction free anything.
        self._fragmented = False
        self.lru = StampLRU(table.page_count, self._page_in_ram, lambda: self.objects_live)
        # What `place_run` hands the C loop, in the order `zs_place` takes it.
        self._tables = (
            table.state,
            table.handle,
            arena.map,
            class_of,
            self.class_size,
            self.class_objs,
            self.class_full_at,
            self.zs_head,
            self.zs_next,
            self.zs_class,
            self.zs_inuse,
            self.zs_freeobj,
            self.zs_fresh,
            self.lists.head,
            self.lists.prev,
            self.lists.next,
            self.lists.list_of,
            self.lru.stamp,
        )
        # The LRU entries of one call, and the payload bytes of the last run.
        self._entries = memoryview(array("Q", bytes(8 * _RUN_ENTRIES)))
        self._entry_bytes = self._entries.cast("B")
        self.run_bytes = 0
        # What `place_one` hands the C loop for its one page.
        self._one_counters = array("q", bytes(8 * 6))
        self._one_size = array("i", [0])
        self._one_word = array("Q", [0])
        self._one_entry = array("Q", [0])

    # -- zspages -----------------------------------------------------------

    def _new_zspage(self, cls: int, reserve: bool) -> int:
        frames = self.arena.alloc_frames(self.class_pages[cls], reserve)
        if not frames:
            raise ArenaFull
        head = frames[0]
        zs_head = self.zs_head
        zs_next = self.zs_next
        prev = NIL
        for frame in frames:
            zs_head[frame] = head
            if prev != NIL:
                zs_next[prev] = frame
            prev = frame
        zs_next[prev] = NIL
        self.zs_class[head] = cls
        self.zs_inuse[head] = 0
        self.zs_freeobj[head] = NIL
        self.zs_fresh[head] = head << PAGE_SHIFT
        self.lists.push(2 * cls + _ALMOST_EMPTY, head)
        self.zspages += 1
        return head

    def _free_zspage(self, head: int) -> None:
        self.lists.remove(head)
        frame = head
        while frame != NIL:
            nxt = self.zs_next[frame]
            self.zs_head[frame] = NIL
            self.zs_next[frame] = NIL
            self.arena.free_frame(frame)
            frame = nxt
        self.zspages -= 1

    def _refile(self, head: int) -> None:
        """Put a zspage on the fullness list its use calls for, or free it."""
        inuse = self.zs_inuse[head]
        if inuse == 0:
            self._free_zspage(head)
            return
        cls = self.zs_class[head]
        self.lists.remove(head)
        if inuse < self.class_objs[cls]:
            full = _ALMOST_FULL if inuse >= self.class_full_at[cls] else _ALMOST_EMPTY
            self.lists.push(2 * cls + full, head)

    def _free_slots(self, head: int) -> list[int]:
        """The free list of a zspage (for compaction and checks)."""
        slots = []
        slot = self.zs_freeobj[head]
        while slot != NIL:
            slots.append(slot)
            slot = self._link[slot >> 3]
        return slots

    def _object_starts(self, head: int) -> list[int]:
        """Arena addresses of the slots of a zspage handed out so far, in order."""
        size = self.class_size[self.zs_class[head]]
        used = self.zs_inuse[head] + len(self._free_slots(head))
        frames = []
        frame = head
        while frame != NIL:
            frames.append(frame)
            frame = self.zs_next[frame]
        return [
            (frames[v >> PAGE_SHIFT] << PAGE_SHIFT) | (v & _OFFSET_MASK)
            for v in range(0, used * size, size)
        ]

    def _take_slot(self, head: int, size: int) -> int:
        """A free slot of a zspage that is not full: freed ones first, then fresh."""
        start = self.zs_freeobj[head]
        if start != NIL:
            self.zs_freeobj[head] = self._link[start >> 3]
            return start
        return self._take_fresh(head, size)

    def _take_fresh(self, head: int, size: int) -> int:
        """The next never-used slot of a zspage that has one."""
        start = self.zs_fresh[head]
        end = (start & _OFFSET_MASK) + size
        if end < PAGE_SIZE:
            self.zs_fresh[head] = start + size
        else:
            # The next slot starts in the next frame of the zspage (or there
            # is none, and the pointer is never used again).
            nxt = self.zs_next[start >> PAGE_SHIFT]
            self.zs_fresh[head] = (nxt << PAGE_SHIFT) + end - PAGE_SIZE
        return start

    # -- allocation --------------------------------------------------------

    def alloc(self, size: int, pgno: int, reserve: bool) -> int:
        # The write path of every compressed page: kept flat on purpose.
        if size == PAGE_SIZE:
            return self._alloc_huge(pgno, reserve)
        cls = self.class_of[size]
        heads = self.lists.head
        lst = cls << 1
        head = heads[lst | _ALMOST_FULL]
        if head == NIL:
            head = heads[lst]
            if head == NIL:
                head = self._new_zspage_or_compact(cls, reserve)
        start = self.zs_freeobj[head]
        if start != NIL:
            self.zs_freeobj[head] = self._link[start >> 3]
        else:  # _take_fresh, inlined
            start = self.zs_fresh[head]
            step = self.class_size[cls]
            end = (start & _OFFSET_MASK) + step
            if end < PAGE_SIZE:
                self.zs_fresh[head] = start + step
            else:
                nxt = self.zs_next[start >> PAGE_SHIFT]
                self.zs_fresh[head] = (nxt << PAGE_SHIFT) + end - PAGE_SIZE
        inuse = self.zs_inuse[head] + 1
        self.zs_inuse[head] = inuse
        if inuse == self.class_objs[cls]:
            self.lists.remove(head)  # full: on no list
        elif inuse == self.class_full_at[cls]:
            self.lists.remove(head)
            self.lists.push(lst | _ALMOST_FULL, head)
        self._owner[start >> 2] = pgno
        # StampLRU.push, inlined; a clean counts the objects before this one.
        lru = self.lru
        if len(lru.queue) >= lru.limit:
            lru.clean()
        lru.seq = seq = (lru.seq + 1) & STAMP_MASK
        lru.stamp[pgno] = seq
        lru.queue.append(pgno << 32 | seq)
        self.objects_live += 1
        addr = start + OBJ_HEADER_SIZE
        if (addr & _OFFSET_MASK) + size > PAGE_SIZE:
            frame = addr >> PAGE_SHIFT
            if self.zs_next[frame] != frame + 1:
                return addr << HANDLE_SHIFT | HANDLE_SPLIT | size
        return addr << HANDLE_SHIFT | size

    def _handle(self, addr: int, size: int) -> int:
        """The handle of a payload, split if it runs into a non-adjacent frame."""
        frame = addr >> PAGE_SHIFT
        if (addr & _OFFSET_MASK) + size > PAGE_SIZE and self.zs_next[frame] != frame + 1:
            return addr << HANDLE_SHIFT | HANDLE_SPLIT | size
        return addr << HANDLE_SHIFT | size

    def _new_zspage_or_compact(self, cls: int, reserve: bool) -> int:
        try:
            return self._new_zspage(cls, reserve)
        except ArenaFull:
            if self._compacting or not self._fragmented or not self.compact():
                raise
        head = self.lists.head[2 * cls + _ALMOST_FULL]
        if head == NIL:
            head = self.lists.head[2 * cls + _ALMOST_EMPTY]
        return head if head != NIL else self._new_zspage(cls, reserve)

    def _alloc_huge(self, pgno: int, reserve: bool) -> int:
        frame = self.arena.alloc_frame(reserve)
        if frame == NIL and not self._compacting and self._fragmented and self.compact():
            frame = self.arena.alloc_frame(reserve)
        if frame == NIL:
            raise ArenaFull
        self.zs_head[frame] = frame
        self.zs_class[frame] = HUGE_CLASS
        self.huge_owner[frame] = pgno
        self.huge_frames += 1
        self.lru.push(pgno)
        self.objects_live += 1
        return frame << (PAGE_SHIFT + HANDLE_SHIFT) | PAGE_SIZE

    def place_run(
        self,
        first: int,
        start: int,
        count: int,
        out: bytearray,
        sizes: array[int],
        words: array[int],
    ) -> int:
        """Store pages `first`+`start`, ... of an encoded run (`native.encode`'s
        out, sizes, words) in C while no frame changes hands.

        The same as `RamTier.store_pages` page by page, for the common cases
        only (see ``zs_place`` in _pages.c).  Returns the index of the first
        page left for the caller (`count` if none).  The allocator's own
        counters and the LRU are kept here; the change in payload bytes,
        which the tier counts, is `run_bytes`, set even when this raises.
        """
        lru = self.lru
        self.run_bytes = 0
        done = start
        room = lru.limit - len(lru.queue)
        while True:
            counters = array("q", (lru.seq, 0, 0, 0, 0, 0))
            try:
                assert NATIVE_PLACE is not None
                done = NATIVE_PLACE(
                    self._tables,
                    counters,
                    first,
                    done,
                    count,
                    out,
                    sizes,
                    words,
                    self._entries[: max(0, min(room, _RUN_ENTRIES))],
                )
            finally:
                # What the loop did stays done, even if it then found a bad table.
                lru.seq = counters[0]
                self.run_bytes += self._counted(counters)
                lru.queue.frombytes(self._entry_bytes[: 8 * counters[4]])
            stop = counters[5]
            if stop == _NO_ZSPAGE:
                # The page's class has no zspage with room: make one as
                # `alloc` would, then go on (a full arena: the caller's).
                pgno = first + done
                try:
                    self._new_zspage_or_compact(
                        self.class_of[sizes[done]], self.state[pgno] != HOLE
                    )
                except ArenaFull:
                    return done
            elif stop == _NO_ROOM:
                # Room for LRU entries ran out: clean where `StampLRU.push` would.
                if len(lru.queue) >= lru.limit:
                    lru.clean()
                    room = max(1, lru.limit - len(lru.queue))
                    continue
            else:  # the end of the run, or a page for the caller
                return done
            room = lru.limit - len(lru.queue)

    def place_one(self, pgno: int, size: int, obj: bytearray) -> bool:
        """`place_run` of one compressed page (`size` bytes at the start of
        `obj`), for a single-page write.  False if the page is left to the
        caller, nothing changed: where a frame must change hands or the LRU
        queue is due for a clean.  The change in payload bytes is `run_bytes`.
        """
        assert 0 < size < PAGE_SIZE, "place_one takes compressed pages only"
        lru = self.lru
        if len(lru.queue) >= lru.limit:
            return False
        counters = self._one_counters
        counters[0] = lru.seq
        self._one_size[0] = size
        assert NATIVE_PLACE is not None
        if not NATIVE_PLACE(
            self._tables,
            counters,
            pgno,
            0,
            1,
            obj,
            self._one_size,
            self._one_word,
            self._one_entry,
        ):
            return False
        lru.seq = counters[0]
        self.run_bytes = self._counted(counters)
        lru.queue.append(self._one_entry[0])
        return True

    def release_run(self, pages: array[int], start: int) -> int:
        """Free the objects of RAM pages `pages`[`start`:] (uint32) whose
        content the backing image now holds, making them DISK, in C while no
        frame changes hands (see ``zs_release`` in _pages.c).

        Returns the index of the first page left for the caller (``len(pages)``
        if none).  The change in payload bytes, which the tier counts, is
        `run_bytes`, set even when this raises.
        """
        counters = self._one_counters
        counters[1] = counters[2] = counters[3] = 0
        try:
            assert NATIVE_RELEASE is not None
            return NATIVE_RELEASE(self._tables, counters, pages, start)
        finally:
            self.run_bytes = self._counted(counters)

    def _counted(self, counters: array[int]) -> int:
        """Take in what a C loop reports in `counters` (``zs_place``'s): the
        change in live objects, and whether a full zspage lost an object.
        Returns the change in payload bytes, which the tier counts."""
        self.objects_live += counters[1]
        if counters[3]:
            self._fragmented = True
        return counters[2]

    def realloc(self, handle: int, size: int, pgno: int) -> int:
        old = handle & HANDLE_LENGTH_MASK
        if size == PAGE_SIZE or old == PAGE_SIZE:
            if size != old:
                return NIL
        elif self.class_of[size] != self.class_of[old]:
            return NIL
        self.lru.push(pgno)
        return self._handle(handle >> HANDLE_SHIFT, size)

    def free(self, handle: int) -> None:
        addr = handle >> HANDLE_SHIFT
        self.objects_live -= 1
        if handle & HANDLE_LENGTH_MASK == PAGE_SIZE:
            frame = addr >> PAGE_SHIFT
            self.zs_head[frame] = NIL
            self.huge_frames -= 1
            self.arena.free_frame(frame)
            return
        start = addr - OBJ_HEADER_SIZE
        head = self.zs_head[start >> PAGE_SHIFT]
        self._link[start >> 3] = self.zs_freeobj[head]
        self.zs_freeobj[head] = start
        inuse = self.zs_inuse[head] - 1
        self.zs_inuse[head] = inuse
        cls = self.zs_class[head]
        if inuse == 0:
            self._free_zspage(head)
        elif inuse == self.class_objs[cls] - 1:
            self._fragmented = True
            self._refile(head)
        elif inuse == self.class_full_at[cls] - 1:
            self._refile(head)

    def write_span(self, addr: int, data: bytes | memoryview) -> None:
        cut = PAGE_SIZE - (addr & _OFFSET_MASK)
        buf = self.arena.map
        view = memoryview(data)
        buf[addr : addr + cut] = view[:cut]
        nxt = self.zs_next[addr >> PAGE_SHIFT] << PAGE_SHIFT
        buf[nxt : nxt + len(data) - cut] = view[cut:]

    def read_span(self, addr: int, size: int) -> bytes:
        cut = PAGE_SIZE - (addr & _OFFSET_MASK)
        view = self.arena.view
        nxt = self.zs_next[addr >> PAGE_SHIFT] << PAGE_SHIFT
        return b"".join((view[addr : addr + cut], view[nxt : nxt + size - cut]))

    def _read(self, addr: int, size: int) -> bytes:
        if (addr & _OFFSET_MASK) + size <= PAGE_SIZE:
            return self.arena.map[addr : addr + size]
        return self.read_span(addr, size)

    def _write(self, addr: int, data: bytes) -> None:
        if (addr & _OFFSET_MASK) + len(data) <= PAGE_SIZE:
            self.arena.map[addr : addr + len(data)] = data
        else:
            self.write_span(addr, data)

    # -- compaction --------------------------------------------------------

    def compact(self) -> int:
        """Pack every class into as few zspages as it can; returns frames freed."""
        self._compacting = True
        self._fragmented = False
        before = self.arena.frames_used
        try:
            for cls in range(len(self.class_size) - 1, -1, -1):
                self._compact_class(cls)
        finally:
            self._compacting = False
        freed = before - self.arena.frames_used
        self.compact_runs += 1
        self.pages_compacted += freed
        return freed

    def _compact_class(self, cls: int) -> None:
        lists = self.lists
        partial = lists.walk(2 * cls + _ALMOST_EMPTY) + lists.walk(2 * cls + _ALMOST_FULL)
        objs = self.class_objs[cls]
        inuse = self.zs_inuse
        used = sum(inuse[head] for head in partial)
        if len(partial) <= -(-used // objs):
            return  # already as dense as it can be
        partial.sort(key=inuse.__getitem__)
        for head in partial:
            lists.remove(head)
        src_i, dst_i = 0, len(partial) - 1
        while src_i < dst_i:
            src, dst = partial[src_i], partial[dst_i]
            if inuse[dst] == objs:
                dst_i -= 1
                continue
            self._migrate(src, dst)
            if inuse[src] == 0:
                src_i += 1
        for head in partial:
            self._refile(head)

    def _migrate(self, src: int, dst: int) -> None:
        """Move objects of zspage `src` into `dst` until one is empty or full."""
        cls = self.zs_class[dst]
        objs = self.class_objs[cls]
        size = self.class_size[cls]
        handles = self.handles
        inuse = self.zs_inuse
        for start in self._object_starts(src):
            if inuse[src] == 0 or inuse[dst] == objs:
                return
            pgno = self._owner[start >> 2]
            if not self._owns(pgno, start):
                continue  # a free slot
            length = handles[pgno] & HANDLE_LENGTH_MASK
            data = self._read(start, OBJ_HEADER_SIZE + length)
            new = self._take_slot(dst, size)
            inuse[dst] += 1
            self._write(new, data)
            handles[pgno] = self._handle(new + OBJ_HEADER_SIZE, length)
            self._link[start >> 3] = self.zs_freeobj[src]
            self.zs_freeobj[src] = start
            inuse[src] -= 1
            self.objects_moved += 1

    def _owns(self, pgno: int, start: int) -> bool:
        """Whether the slot at `start`, whose header reads `pgno`, is that page's."""
        return (
            pgno < self.table.page_count
            and self.state[pgno] == RAM
            and self.handles[pgno] >> HANDLE_SHIFT == start + OBJ_HEADER_SIZE
        )

    # -- LRU ---------------------------------------------------------------

    def _page_in_ram(self, pgno: int) -> bool:
        return self.state[pgno] == RAM

    def coldest(self, count: int) -> list[int]:
        return self.lru.coldest(count)

    def make_cold(self, handle: int, pgno: int) -> None:
        self.lru.make_cold(pgno)

    # -- inspection --------------------------------------------------------

    def objects(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for frame in range(self.arena.frame_count):
            if self.zs_head[frame] != frame:
                continue
            if self.zs_class[frame] == HUGE_CLASS:
                base = frame << PAGE_SHIFT
                out.append((self.huge_owner[frame], base, ((base, base + PAGE_SIZE),)))
                continue
            size = self.class_size[self.zs_class[frame]]
            for start in self._object_starts(frame):
                pgno = self._owner[start >> 2]
                if self._owns(pgno, start):
                    out.append((pgno, start + OBJ_HEADER_SIZE, self._pieces(start, size)))
        return out

    def _pieces(self, start: int, size: int) -> Pieces:
        cut = PAGE_SIZE - (start & _OFFSET_MASK)
        if size <= cut:
            return ((start, start + size),)
        nxt = self.zs_next[start >> PAGE_SHIFT] << PAGE_SHIFT
        return ((start, start + cut), (nxt, nxt + size - cut))

    def check(self) -> None:
        free = set(self.arena.free_frames())
        zspages = huge = live = 0
        for frame in range(self.arena.frame_count):
            head = self.zs_head[frame]
            if frame in free:
                assert head == NIL, f"free frame {frame} belongs to zspage {head}"
                continue
            assert head != NIL, f"frame {frame} is used by nothing"
            if head != frame:
                continue
            cls = self.zs_class[frame]
            if cls == HUGE_CLASS:
                huge += 1
                live += 1
                assert self.lists.list_of[frame] == NIL, "a huge frame is on a fullness list"
                continue
            zspages += 1
            chain = []
            f = frame
            while f != NIL:
                assert self.zs_head[f] == frame, f"frame {f} is chained to the wrong zspage"
                chain.append(f)
                f = self.zs_next[f]
            assert len(chain) == self.class_pages[cls], f"zspage {frame} has the wrong length"
            inuse = self.zs_inuse[frame]
            free_slots = self._free_slots(frame)
            starts = self._object_starts(frame)
            assert len(starts) <= self.class_objs[cls], f"zspage {frame} overflows"
            assert set(free_slots) <= set(starts), f"bad free list in zspage {frame}"
            assert len(set(free_slots)) == len(free_slots), f"free list loops in {frame}"
            if len(starts) < self.class_objs[cls] and not free_slots:
                assert self.zs_fresh[frame] == self._slot_after(frame, starts), (
                    f"fresh pointer of zspage {frame} is off"
                )
            live += inuse
            lst = self.lists.list_of[frame]
            if inuse == self.class_objs[cls]:
                assert lst == NIL, f"full zspage {frame} is on a fullness list"
            else:
                full = _ALMOST_FULL if inuse >= self.class_full_at[cls] else _ALMOST_EMPTY
                assert lst == 2 * cls + full, f"zspage {frame} on the wrong fullness list"
        assert zspages == self.zspages, "zspage count is off"
        assert huge == self.huge_frames, "huge frame count is off"
        assert live == self.objects_live, "live object count is off"

    def _slot_after(self, head: int, starts: list[int]) -> int:
        """Where the next never-used slot of a zspage begins."""
        size = self.class_size[self.zs_class[head]]
        v = len(starts) * size
        frame = head
        for _ in range(v >> PAGE_SHIFT):
            frame = self.zs_next[frame]
        return frame << PAGE_SHIFT | (v & _OFFSET_MASK)

    def stats(self) -> dict[str, int]:
        return {
            "zspages": self.zspages,
            "huge_frames": self.huge_frames,
            "objects": self.objects_live,
            "compact_runs": self.compact_runs,
            "pages_compacted": self.pages_compacted,
            "objects_moved": self.objects_moved,
        }

    @property
    def frame_metadata_bytes(self) -> int:
        arrays = (
            self.zs_head,
            self.zs_next,
            self.zs_class,
            self.zs_inuse,
            self.zs_freeobj,
            self.zs_fresh,
            self.huge_owner,
        )
        return sum(a.itemsize * len(a) for a in arrays) + self.lists.nbytes + self.lru.nbytes

    @property
    def page_metadata_bytes(self) -> int:
        return self.lru.stamp.nbytes
