"""The page table: per device page, one state byte and one 8-byte handle.

A device of 64 GiB has 16 Mi pages; a dict or an object per page would cost
gigabytes, so the table is two flat arrays indexed by page number:

- ``state``: a `bytearray`, one of HOLE, ZERO, SAME, RAM, DISK per page;
- ``handle``: 64-bit words over an anonymous mmap.  For a RAM page it is the
  allocator handle (see `nbdcache.tier.arena`); for a SAME page it is the
  repeated 8-byte word; otherwise 0.

That is 9 bytes per page (the allocator may add a per-page LRU stamp; the
budget is 16).  Both arrays live in anonymous memory that the kernel only
commits when a page of the table is first written, so a huge device that is
mostly holes costs little more than its state bytes.

`extents` answers NBD ``base:allocation`` queries by scanning the state bytes
with a compiled regular expression: the scan runs in C, one match per run,
so a trimmed 64 GiB device is one call, not 16 Mi Python iterations.
"""

from __future__ import annotations

import mmap
import re
from typing import Final, Literal

from nbdcache.tier import DISK, HOLE, RAM, SAME, STATE_HOLE, STATE_ZERO, ZERO

#: Largest page count: page numbers are stored as 32-bit words in the arena.
MAX_PAGE_COUNT: Final = 1 << 32

#: `extents` stops after this many runs (the protocol allows a short answer).
MAX_EXTENTS: Final = 1024

# One run of pages with the same `base:allocation` flags.  HOLE reads as a
# hole of zeroes, ZERO as allocated zeroes; SAME, RAM and DISK are data.
_RUN = re.compile(rb"\x00+|\x01+|[^\x00\x01]+")
_FLAGS: Final = {HOLE: STATE_HOLE | STATE_ZERO, ZERO: STATE_ZERO, SAME: 0, RAM: 0, DISK: 0}


def anonymous_array(fmt: Literal["B", "H", "I", "Q"], length: int) -> memoryview:
    """A zero-filled array of `length` items of struct format `fmt` in anonymous memory."""
    size = {"B": 1, "H": 2, "I": 4, "Q": 8}[fmt]
    buf = mmap.mmap(-1, max(1, length) * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memoryview(buf).cast(fmt)[:length]


class PageTable:
    """Flat per-page metadata for `page_count` pages (all HOLE at start)."""

    __slots__ = ("handle", "page_count", "state")

    def __init__(self, page_count: int) -> None:
        if not 0 < page_count <= MAX_PAGE_COUNT:
            raise ValueError(f"page count must be in 1..{MAX_PAGE_COUNT}, got {page_count}")
        self.page_count = page_count
        self.state = bytearray(page_count)
        self.handle = anonymous_array("Q", page_count)

    @property
    def nbytes(self) -> int:
        """Bytes the two arrays reserve (committed lazily by the kernel)."""
        return len(self.state) + self.handle.nbytes

    def count(self, state: int) -> int:
        """How many pages are in `state` (a C-speed scan of the state bytes)."""
        return self.state.count(state)

    def extents(self, first: int, count: int, max_runs: int = MAX_EXTENTS) -> list[tuple[int, int]]:
        """Runs of equal `base:allocation` flags over pages [first, first+count).

        Returns at most `max_runs` (pages, flags) pairs, adjacent runs with
        different flags, covering a prefix of the range (the whole range when
        it has at most `max_runs` runs).
        """
        if count <= 0 or first < 0 or first + count > self.page_count:
            raise ValueError(f"bad extent range {first}+{count} of {self.page_count} pages")
        state = self.state
        end = first + count
        runs: list[tuple[int, int]] = []
        pos = first
        match = _RUN.match
        flags_of = _FLAGS
        # Adjacent matches are different classes (hole, zero, data), and the
        # three classes have different flags, so runs never need merging.
        while pos < end and len(runs) < max_runs:
            m = match(state, pos, end)
            assert m is not None  # the pattern matches any non-empty input
            stop = m.end()
            runs.append((stop - pos, flags_of.get(state[pos], 0)))
            pos = stop
        return runs
