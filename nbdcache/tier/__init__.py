"""The page store contract between the block device and the tiers.

`device.py` turns byte ranges into page operations and calls a `PageStore`;
it knows nothing of compression, allocators or disks.  This module owns the
contract: the page size, the per-page content states, the errors a store may
raise, and the protocol every store implements.  The tier package is a
library: nothing in it imports network code.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nbdcache.tier.codec import Encoded

PAGE_SIZE = 4096
PAGE_SHIFT = 12

#: The page every hole and zero page reads as.  Never written to.
ZERO_PAGE = bytes(PAGE_SIZE)

# Per-page content states (one byte each in a page table).
HOLE = 0  # never written, or trimmed: reads as zeroes, no space reserved
ZERO = 1  # zeroes, but allocated (WRITE_ZEROES with NO_HOLE, or a written zero page)
SAME = 2  # one repeated 8-byte word, no arena space
RAM = 3  # compressed (or raw) in the arena
DISK = 4  # only in the backing image

# NBD `base:allocation` status flags, as returned by `PageStore.extents`.
STATE_HOLE = 1
STATE_ZERO = 2


class StoreError(Exception):
    """A page operation failed; `errno` is the NBD error the client gets."""

    errno = 5  # NBD_EIO


class NoSpace(StoreError):
    """A first write to a hole found no room (NBD_ENOSPC)."""

    errno = 28


class StoreIOError(StoreError):
    """The store could not keep its promise (NBD_EIO): counted and logged."""

    errno = 5


class PageStore(Protocol):
    """What the block device needs from a store of 4 KiB pages.

    Every method is called from the event loop thread and answers at once
    when it can; a store with a backing image may instead return an asyncio
    future (a page only on disk, a write waiting for room).  Page numbers are
    always in range; the device checks bounds.
    """

    @property
    def page_count(self) -> int: ...

    def load(self, pgno: int) -> bytes | memoryview | asyncio.Future[bytes]:
        """Return the page's 4096 bytes (`ZERO_PAGE` for holes and zero pages).

        The result is immutable: later changes to the store do not alter it.
        """

    def store(self, pgno: int, data: bytes | memoryview) -> asyncio.Future[None] | None:
        """Replace the page with `data` (exactly 4096 bytes).

        `data` may be a view of a buffer the caller reuses: copy what you
        keep.  Raises (or the future fails with) `NoSpace` only when the page
        was a hole; an allocated page is always overwritten or the call fails
        with `StoreIOError`.  On any error the page keeps its previous content.
        """

    def encode_threshold(self, first: int, count: int) -> int | None:
        """If the store takes the run of `count` pages at `first` encoded
        elsewhere (`store_run`'s `encoded`): the incompressible threshold to
        encode it with; None if it takes no encoded runs, or expects not to
        keep this one in RAM (it then takes it unencoded all the same)."""

    def store_run(
        self, first: int, data: memoryview, encoded: Encoded | None = None
    ) -> list[asyncio.Future[None]]:
        """`store` of the whole pages of `data` at `first`, `first`+1, ...

        Pages are stored in order, as that many `store` calls would; returns
        the futures of those that wait.  A raised error means the pages
        before the failing one are stored and those after it untouched.
        `encoded`: `data` already encoded (see `encode_threshold`).
        """

    def load_run(self, first: int, count: int) -> tuple[bytearray | None, int]:
        """Pages `first`.. as one buffer, as far as they can be read at once.

        Returns the buffer of `count` pages and how many leading pages hold
        their content, (None, 0) when not even the first could be read this
        way: the caller `load`s the rest.  Same content as `load`.
        """

    def patch(self, pgno: int, start: int, data: bytes | memoryview) -> asyncio.Future[None] | None:
        """Write `data` into the page at byte `start` (a partial page).

        The rest of the page keeps its content *as of when the patch is
        applied*: a store that queues writes applies patches in order, so
        writes to different bytes of a page never undo each other.  Errors
        as for `store`.
        """

    def discard(self, first: int, count: int = 1) -> asyncio.Future[None] | None:
        """Make pages [first, first+count) holes (TRIM): frees their storage;
        they read zeroes.  A whole device is one call, in metadata alone.
        A store that queues writes returns a future when the trim of some
        pages must wait behind writes to them queued earlier."""

    def zero(self, pgno: int, allocate: bool) -> asyncio.Future[None] | None:
        """Make the page read as zeroes; `allocate` keeps it allocated (NO_HOLE),
        which may have to wait for space to be reserved."""

    def extents(self, first: int, count: int) -> list[tuple[int, int]]:
        """`base:allocation` runs over pages [first, first+count).

        Returns a non-empty list of (pages, flags) with flags a combination of
        STATE_HOLE and STATE_ZERO; consecutive runs have different flags.  The
        runs cover the range from `first` but may stop short of its end (never
        past it).
        """

    def flush(self) -> asyncio.Future[None] | None:
        """Make every completed write durable (FLUSH); None when nothing to wait for."""

    def sync_pages(self, first: int, count: int) -> asyncio.Future[None] | None:
        """Make these pages durable now (FUA)."""

    def stats(self) -> dict[str, int]:
        """The store's counters, by name (see `nbdcache.metrics`)."""
