"""The arena: one anonymous mmap of 4 KiB frames, and what the allocators share.

This module owns

- the mapping itself (`Arena.map`, `Arena.view`): ``ram_bytes`` rounded down
  to whole frames, allocated once; page data never lives anywhere else;
- the pool of free frames, with a *reserve* that only overwrites of
  allocated pages may draw on (the capacity rule of the tier);
- giving memory back: frames that stay free are returned to the kernel with
  ``MADV_DONTNEED`` in batches, so a trimmed device shrinks the process;
  unless the process has locked its memory (`nbdcache.memlock`): the kernel
  refuses ``MADV_DONTNEED`` on locked pages, and the arena then stops
  trying and keeps every frame resident, which is what locking asked for;
- the handle format shared by every allocator;
- the `Allocator` protocol that zbud, z3fold and zsmalloc implement;
- `FrameLists`, intrusive doubly-linked lists of frames kept in flat arrays
  (the unbuddied lists of zbud and z3fold, the fullness lists of zsmalloc);
- `StampLRU`, the LRU every allocator keeps (of frames for zbud and z3fold,
  of pages for zsmalloc).

Handles
-------
A handle is one int: ``addr << HANDLE_SHIFT | split << 13 | length``, where
``addr`` is the byte offset of the object's payload in the arena, ``length``
the payload length (1..4096; 4096 means a raw page, stored uncompressed) and
``split`` (`HANDLE_SPLIT`) is set when the payload continues in a frame that
is not the next one in the arena (a zsmalloc object straddling two frames of
a zspage).  The tier reads and writes a payload with one slice of the
arena, without asking the allocator, unless it is split; then the allocator
does it in two pieces.

Allocators keep their own reverse map (which page lives where) so that they
can move objects (z3fold's in-frame compaction, zsmalloc's compaction) and
evict whole frames; when an object moves, the allocator rewrites the page's
handle in the page table it was given.
"""

from __future__ import annotations

import errno
import mmap
from array import array
from collections.abc import Callable, Iterator
from typing import Final, Protocol

from nbdcache.tier import PAGE_SHIFT, PAGE_SIZE
from nbdcache.tier.pagetable import anonymous_array

HANDLE_SHIFT: Final = 14
HANDLE_LENGTH_MASK: Final = (1 << 13) - 1
HANDLE_SPLIT: Final = 1 << 13

#: No frame (list terminator).
NIL: Final = -1

#: Stamps of `StampLRU` are 32-bit sequence numbers.
STAMP_MASK: Final = 0xFFFFFFFF

#: The arena ranges [start, end) an object occupies (two when it straddles frames).
Pieces = tuple[tuple[int, int], ...]
#: One live object as the allocator sees it: (pgno, payload address, pieces).
ObjectInfo = tuple[int, int, Pieces]


class ArenaFull(Exception):
    """No frame is left for this allocation (the reserve included, if allowed)."""


class Arena:
    """`frame_count` frames of `PAGE_SIZE` bytes in one anonymous mapping.

    Free frames form a stack, so a frame freed recently (still in the CPU
    cache and resident) is the next one handed out.  `reserve` frames are
    held back for `alloc_frame(reserve=True)`.  Frames that stay free are
    given back to the kernel: once more than `release_batch` (default 1/16
    of the arena, at least 256) have been freed since the last release, all
    but the last half batch are released, so a steady churn of stores and
    discards reuses resident frames instead of faulting fresh ones in.
    """

    __slots__ = (
        "_clean",
        "_free",
        "frame_count",
        "frames_max",
        "frames_released",
        "frames_used",
        "map",
        "release_batch",
        "reserve",
        "view",
        "words32",
        "words64",
    )

    def __init__(self, ram_bytes: int, reserve: int = 0, release_batch: int = 0) -> None:
        frame_count = ram_bytes >> PAGE_SHIFT
        if frame_count < 1:
            raise ValueError(f"the arena needs at least one {PAGE_SIZE}-byte frame")
        if not 0 <= reserve < frame_count:
            raise ValueError(f"reserve of {reserve} frames does not fit {frame_count} frames")
        self.frame_count = frame_count
        self.reserve = reserve
        self.release_batch = release_batch or max(256, frame_count // 16)
        self.map = mmap.mmap(
            -1, frame_count << PAGE_SHIFT, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        self.view = memoryview(self.map)
        # The same memory as native 32- and 64-bit words, for allocator
        # bookkeeping kept inside the arena (zsmalloc's slot headers).
        self.words32 = self.view.cast("I")
        self.words64 = self.view.cast("q")
        # Popping from the end hands out frame 0 first.
        self._free = array("i", range(frame_count - 1, -1, -1))
        # Entries below this index of the free stack are not resident
        # (never touched, or already released to the kernel).
        self._clean = frame_count
        self.frames_used = 0
        self.frames_max = 0
        self.frames_released = 0

    def alloc_frame(self, reserve: bool) -> int:
        """Take a free frame, or return NIL if none is left for this caller."""
        free = self._free
        left = len(free)
        if left <= (0 if reserve else self.reserve):
            return NIL
        frame = free.pop()
        if left <= self._clean:
            self._clean = left - 1
        used = self.frames_used + 1
        self.frames_used = used
        if used > self.frames_max:
            self.frames_max = used
        return frame

    def alloc_frames(self, count: int, reserve: bool) -> list[int]:
        """Take `count` free frames at once (in address order), or none (an empty list)."""
        free = self._free
        left = len(free)
        if left - count < (0 if reserve else self.reserve):
            return []
        frames = sorted(free[left - count :])
        del free[left - count :]
        if left - count < self._clean:
            self._clean = left - count
        used = self.frames_used + count
        self.frames_used = used
        if used > self.frames_max:
            self.frames_max = used
        return frames

    def free_frame(self, frame: int) -> None:
        """Return `frame` to the pool; its contents are garbage from now on."""
        free = self._free
        free.append(frame)
        self.frames_used -= 1
        if len(free) - self._clean > self.release_batch:
            self.release_free(keep=self.release_batch // 2)

    def release_free(self, keep: int = 0) -> int:
        """Give back to the kernel the memory of frames freed since the last
        release, except the `keep` freed last (the next ones handed out).

        Adjacent frames are released with one ``madvise`` call.
        """
        free = self._free
        stop = len(free) - keep
        if stop <= self._clean:
            return 0
        frames = sorted(free[self._clean : stop])
        madvise = self.map.madvise
        dontneed = mmap.MADV_DONTNEED
        start = prev = frames[0]
        try:
            for frame in frames[1:]:
                if frame != prev + 1:
                    madvise(dontneed, start << PAGE_SHIFT, (prev + 1 - start) << PAGE_SHIFT)
                    start = frame
                prev = frame
            madvise(dontneed, start << PAGE_SHIFT, (prev + 1 - start) << PAGE_SHIFT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Locked memory (mlockall): it cannot be dropped and stays
            # resident.  No frame is released; free_frame stops trying
            # (fewer than frame_count frames can be waiting).
            self.release_batch = self.frame_count
            return 0
        self._clean = stop
        self.frames_released += len(frames)
        return len(frames)

    def free_frames(self) -> list[int]:
        """The free frames (for consistency checks)."""
        return list(self._free)

    def close(self) -> None:
        """Unmap the arena; only valid once nothing holds a view of it."""
        self.words32.release()
        self.words64.release()
        self.view.release()
        self.map.close()


class FrameLists:
    """Several doubly-linked lists of frames sharing two link arrays.

    A frame is on at most one of the lists (`list_of[frame]` says which, or
    NIL).  With `masked`, `nonempty` is a bit mask of the lists that hold a
    frame, so a best fit search is one shift and one `bit_length`, not a
    loop over lists (zbud, z3fold); without it the lists are plain arrays
    that C code may edit too (zsmalloc's, `zs_place`).  Frames are pushed at
    the head.
    """

    __slots__ = ("head", "list_of", "masked", "next", "nonempty", "prev")

    def __init__(self, frame_count: int, list_count: int, masked: bool = True) -> None:
        self.prev = array("i", [NIL]) * frame_count
        self.next = array("i", [NIL]) * frame_count
        # C code edits the lists without a mask (zsmalloc's): 16-bit list numbers.
        self.list_of = array("b" if masked and list_count < 128 else "h", [NIL]) * frame_count
        self.head = array("i", [NIL]) * list_count
        self.masked = masked
        self.nonempty = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the per-frame link arrays."""
        return sum(a.itemsize * len(a) for a in (self.prev, self.next, self.list_of))

    def push(self, lst: int, frame: int) -> None:
        """Put `frame` (on no list) at the head of list `lst`."""
        head = self.head
        first = head[lst]
        self.prev[frame] = NIL
        self.next[frame] = first
        if first != NIL:
            self.prev[first] = frame
        elif self.masked:
            self.nonempty |= 1 << lst
        head[lst] = frame
        self.list_of[frame] = lst

    def remove(self, frame: int) -> None:
        """Take `frame` off whichever list holds it (no-op if none)."""
        list_of = self.list_of
        lst = list_of[frame]
        if lst == NIL:
            return
        prev_of = self.prev
        next_of = self.next
        prev = prev_of[frame]
        nxt = next_of[frame]
        if prev == NIL:
            self.head[lst] = nxt
            if nxt == NIL and self.masked:
                self.nonempty &= ~(1 << lst)
        else:
            next_of[prev] = nxt
        if nxt != NIL:
            prev_of[nxt] = prev
        list_of[frame] = NIL

    def count(self) -> int:
        """Frames on any of the lists."""
        return len(self.list_of) - self.list_of.count(NIL)

    def walk(self, lst: int) -> list[int]:
        """The frames of `lst`, head first."""
        out = []
        next_of = self.next
        frame = self.head[lst]
        while frame != NIL:
            out.append(frame)
            frame = next_of[frame]
        return out


class StampLRU:
    """Keys (frames or pages) in order of last use, oldest first.

    A doubly-linked list needs two links per key and three list operations
    per use; this LRU needs one 4-byte *stamp* per key and one append per
    use.  Every `push` takes the next sequence number, writes it as the key's
    stamp and appends the entry ``key << 32 | stamp`` to a queue.  An entry
    is current while the key is `live` and still carries that stamp; older
    entries of the same key are stale and skipped.  When the queue outgrows
    twice the live keys (`count`), stale entries are dropped, so the queue
    costs at most about 16 bytes per live key and cleaning is amortised O(1)
    per push.  Stamps wrap at 2**32; the queue is cleaned long before a stale
    stamp could come round again.

    `make_cold` moves a key to the cold end: it goes on a second queue that
    `coldest` serves first, latest first (exclusive gets, ``lazy``: a page
    the client has read back is the first to write back), until the key is
    pushed again.
    """

    __slots__ = ("cold", "count", "head", "limit", "live", "queue", "seq", "stamp")

    _SLACK: Final = 4096

    def __init__(
        self, key_count: int, live: Callable[[int], bool], count: Callable[[], int]
    ) -> None:
        self.live = live
        self.count = count
        self.stamp = anonymous_array("I", key_count)
        self.seq = 0
        self.queue = array("Q")
        self.head = 0  # entries before it are known to be stale
        self.cold = array("Q")
        self.limit = self._SLACK

    @property
    def nbytes(self) -> int:
        """Bytes of the queues (the per-key stamps are `stamp.nbytes`)."""
        return 8 * (len(self.queue) + len(self.cold))

    def push(self, key: int) -> None:
        """`key` was just used: make it the most recent.

        The queue is cleaned before the entry goes in, not after: a key may
        be pushed before it is `live` (a page is allocated, then made RAM),
        and a clean then would drop its only entry.
        """
        if len(self.queue) >= self.limit:
            self.clean()
        self.seq = seq = (self.seq + 1) & STAMP_MASK
        self.stamp[key] = seq
        self.queue.append(key << 32 | seq)

    def make_cold(self, key: int) -> None:
        """Serve `key` first from `coldest` until it is pushed again."""
        self.cold.append(key << 32 | self.stamp[key])
        if len(self.cold) > self.limit:
            self.clean()

    def _current(self, entries: array[int]) -> array[int]:
        stamp = self.stamp
        live = self.live
        return array(
            "Q",
            [e for e in entries if stamp[e >> 32] == e & STAMP_MASK and live(e >> 32)],
        )

    def clean(self) -> None:
        """Drop stale entries once they could be half of the queue.

        Entries before `head` are known to be stale: they go in any case, or
        under writeback (which skips them at the cold end) the queue would
        stay at its limit and every push would come here.
        """
        live = self.count()
        if len(self.queue) - self.head > 2 * live or len(self.cold) > live:
            self.queue = self._current(self.queue[self.head :])
            self.cold = self._current(self.cold)
        elif self.head:
            self.queue = self.queue[self.head :]  # (a new array, as `iter_coldest` expects)
        self.head = 0
        self.limit = 2 * live + self._SLACK

    def iter_coldest(self) -> Iterator[int]:
        """Live keys, coldest first, each once.

        The order is not changed; do not push while iterating.
        """
        stamp = self.stamp
        live = self.live
        seen: set[int] = set()
        for entry in reversed(self.cold):  # the latest made cold is the coldest
            key = entry >> 32
            if stamp[key] == entry & STAMP_MASK and key not in seen and live(key):
                seen.add(key)
                yield key
        queue = self.queue
        i = self.head
        while i < len(queue):
            entry = queue[i]
            key = entry >> 32
            if stamp[key] != entry & STAMP_MASK or not live(key):
                if i == self.head and queue is self.queue:
                    self.head = i + 1  # stale at the cold end: skip it for good
            elif key not in seen:
                seen.add(key)
                yield key
            i += 1

    def coldest(self, count: int) -> list[int]:
        """Up to `count` live keys, coldest first."""
        out: list[int] = []
        if count > 0:
            for key in self.iter_coldest():
                out.append(key)
                if len(out) == count:
                    break
        return out


class FrameEviction:
    """LRU of whole frames, for the allocators that evict frames (zbud, z3fold).

    A subclass sets `lru` (a `StampLRU` keyed by frame) and says which pages
    live in a frame; writeback then gets whole frames, coldest first.
    """

    lru: StampLRU

    def frame_pages(self, frame: int) -> list[int]:
        raise NotImplementedError

    def coldest(self, count: int) -> list[int]:
        """Pages of the coldest frames, whole frames, until `count` are listed."""
        pages: list[int] = []
        if count > 0:
            for frame in self.lru.iter_coldest():
                pages.extend(self.frame_pages(frame))
                if len(pages) >= count:
                    break
        return pages

    def make_cold(self, handle: int, pgno: int) -> None:
        self.lru.make_cold((handle >> HANDLE_SHIFT) >> PAGE_SHIFT)


class Allocator(Protocol):
    """What the tier needs from zbud, z3fold and zsmalloc.

    Every allocator is built over an `Arena` and the page table's handle
    array; it writes handles into that array itself when it moves an object.
    Sizes are payload lengths in bytes (1..4096; 4096 is a raw page).
    """

    name: str

    def alloc(self, size: int, pgno: int, reserve: bool) -> int:
        """Room for `size` bytes of page `pgno`; returns the handle.

        The object becomes the most recently used.  Raises `ArenaFull` when a
        new frame is needed and none is free (beyond the reserve unless
        `reserve`).  The caller writes the payload and stores the handle.
        """
        ...

    def realloc(self, handle: int, size: int, pgno: int) -> int:
        """Resize an object in place if it fits where it is; NIL otherwise.

        On success returns the (possibly moved within its slot) handle and
        makes the object the most recently used; on NIL nothing changed.
        """
        ...

    def free(self, handle: int) -> None:
        """Release an object; its frame returns to the arena when empty."""
        ...

    def write_span(self, addr: int, data: bytes | memoryview) -> None:
        """Write a split payload (`HANDLE_SPLIT`; zsmalloc only)."""
        ...

    def read_span(self, addr: int, size: int) -> bytes:
        """Read a split payload (`HANDLE_SPLIT`; zsmalloc only)."""
        ...

    def coldest(self, count: int) -> list[int]:
        """Pages from the cold end of the LRU, coldest first (not removed)."""
        ...

    def make_cold(self, handle: int, pgno: int) -> None:
        """Move the object (zbud, z3fold: its frame) to the cold end of the LRU."""
        ...

    def compact(self) -> int:
        """Move objects to free whole frames; returns the frames freed."""
        ...

    def objects(self) -> list[ObjectInfo]:
        """Every live object, for consistency checks."""
        ...

    def check(self) -> None:
        """Raise AssertionError if an internal invariant does not hold."""
        ...

    def stats(self) -> dict[str, int]:
        """Allocator-specific counters (names after what they count)."""
        ...

    @property
    def frame_metadata_bytes(self) -> int:
        """Bookkeeping outside the arena that scales with the arena (side tables, LRU)."""
        ...

    @property
    def page_metadata_bytes(self) -> int:
        """Bookkeeping kept per device page (counts against the page-table budget)."""
        ...
