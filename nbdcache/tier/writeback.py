"""Writeback: the RAM tier in front of a backing image.

`WritebackStore` is the `PageStore` of an export with a backing image.  It
owns what the RAM tier does not know: whether the image agrees with each
page, which pages have image I/O in flight, the watermarks that start and
stop eviction, exclusive gets, capacity reservations, backpressure and
durability.

Per page, beside the RAM tier's state and handle, it keeps one `img` byte
(10 to 14 bytes a page in all, under the 16-byte budget):

- ``IMG_NONE``: the image has no blocks for the page (a hole, never
  reserved).  A first write must reserve them (`fallocate`) before it is
  acknowledged, so that only that write can get ENOSPC (spec,
  `base:allocation`).
- ``IMG_CLEAN``: the image holds exactly what the page table says.
- ``IMG_DIRTY``: the image is behind: it must get the page's data, a punched
  hole (TRIM), zeroes (WRITE_ZEROES with NO_HOLE) or the same-filled pattern.

At most one image I/O per page is in flight (`busy`), so the thread pool can
never reorder two writes of one page, and any change to a page with I/O in
flight is remembered (`touched`).  When the I/O completes, the page becomes
clean (and, for an eviction, its RAM copy is released) only if it was not
touched meanwhile, so a page rewritten while its old copy was in flight keeps
its newest data however often it was rewritten.  Likewise a read-fill from
the image is promoted into RAM only if the page did not change meanwhile.
A write to a page whose hole is being punched waits for the punch and then
reserves its blocks again.

Policy (zcache's "adequate policy for writeback"): eviction starts when the
arena's frames in use reach the high watermark and stops at the low one; it
takes the coldest pages of the allocator's LRU (whole frames for zbud and
z3fold), writes runs of adjacent pages with one `pwritev`, and keeps at most
`inflight` pages in flight.  Short runs (the pages of random writes) go to
the I/O pool several to a job, about 64 pages each; a run that fails there
stays dirty on its own.  Clean pages are released without I/O.  Pages
that left RAM dirty (trimmed, zeroed, same-filled) are brought to the image
in the background, adjacent ones merged into one `fallocate`.

A full tier (zswap's "pool limit hit"): once a store finds the arena full,
whole-page writes to pages that have image blocks and no I/O in flight go
straight to the image (write-through) until eviction brings the arena back
under the high watermark, as zswap sends a page straight to the swap device
when its pool is full.  Compressing a page, packing it and later unpacking it
for writeback costs far more than writing it once, and a full tier under a
stream of writes would otherwise make every write wait for an eviction.  The
write is acknowledged when the image has it; until then reads of the page
return its new content from `through`.  Pages written in one event-loop turn
are merged into one `pwritev` per run of adjacent pages, and at most
`inflight` pages are written through at once.  If the image write fails, the
image may hold any part of the page, so the new content stays in `through`
(the page busy) and is written again after the back-off, as a failed
writeback is; meanwhile writes wait for room.  A write-through that has not
landed within `wait_timeout` fails the client's write with EIO.

Sequential streams (bcache's ``sequential_cutoff``): once multi-page writes
following each other have covered `sequential_cutoff` pages, and while the
arena is past its low watermark, they bypass the tier: written through as
above, not compressed (`encode_threshold` says so, as the write arrives,
before the encoder thread would start on it).  Up to 64 streams are
followed at once.  A first write to a region without image blocks takes the
tier (it must reserve them first).

Backpressure: a write that cannot go through (a partial page, a page with
I/O in flight or queued writes, a page without image blocks yet) waits, in
arrival order, behind any earlier waiting write, until writeback makes room;
past `wait_timeout` it fails with EIO, and so does a write-through the image
has not taken by then.  A failed image write leaves the page dirty in RAM;
writeback backs off and retries.

Exclusive gets: ``off`` promotes pages read from the image into RAM as clean
(when below the high watermark); ``lazy`` moves a page read from RAM to the
cold end of the LRU; ``eager`` releases the RAM copy right after the read
(after writing it back if it was dirty).

Incompressible pages go straight to the image: a whole-page write of one is
written through (its raw RAM copy is dropped once the image has it).  Those
that reach RAM another way (a patch, a queued write) are made cold at once,
so they are the first written back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from nbdcache.backing import BackingImage
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
    StoreError,
    StoreIOError,
)
from nbdcache.tier.arena import ArenaFull
from nbdcache.tier.codec import Encoded, expand_word
from nbdcache.tier.ram import RamTier

log = logging.getLogger("nbdcache.writeback")

IMG_NONE: Final = 0
IMG_CLEAN: Final = 1
IMG_DIRTY: Final = 2

EXCLUSIVE_GETS: Final = ("off", "lazy", "eager")
_DIRTY_RUN: Final = re.compile(b"\x02+")
_RETRY_DELAY: Final = 0.5  # seconds before writeback retries after an I/O error
_FLUSH_CHUNK: Final = 1 << 16  # pages examined per step of a flush
_MAX_RUN: Final = 256  # pages per pwritev (1 MiB; IOV_MAX is 1024)
_SHORT_RUN: Final = 16  # runs shorter than this share one job for the I/O pool,
_GROUP: Final = 64  # ... up to this many pages a job
_REGION_SHIFT: Final = 9  # reservations cover 512-page (2 MiB) regions
_UNRESERVED_RUN: Final = re.compile(b"\x00+")


@dataclass(frozen=True)
class WritebackPolicy:
    """The tunables, as plain values."""

    high: float = 0.90  # fraction of arena frames that starts eviction
    low: float = 0.80  # ... and stops it
    inflight: int = 256  # pages of image I/O in flight at most
    batch: int = 256  # pages taken from the LRU per round
    exclusive_gets: str = "off"
    durable: bool = False
    wait_timeout: float = 30.0  # seconds a write may wait for room
    # Pages a sequential stream of multi-page writes may reach before, with
    # the arena past its low watermark, its writes bypass the tier (0: never).
    sequential_cutoff: int = 1024


#: Queued writes scanned for base reads to start ahead of their turn.
_PREFETCH_SCAN = 256


@dataclass
class _Waiter:
    """A write queued for room, a reservation or (a patch) the page's old content."""

    pgno: int
    data: bytes
    start: int  # -1: a whole page, _DISCARD: a trim; else a patch at this byte
    future: asyncio.Future[None]
    base: bytes | None = None  # a patched DISK page's content, once read
    fetching: bool = False  # that read is under way
    since: float = field(default_factory=time.monotonic)
    queued: bool = True  # still counted in WritebackStore.queued
    timer: asyncio.TimerHandle | None = None  # its `wait_timeout`
    count: int = 1  # pages: a run of whole pages (start -1) has more than one
    encoded: Encoded | None = None  # a run's pages, encoded already


#: `_Waiter.start` of a queued trim: the page becomes a hole.
_DISCARD: Final = -2


def _error(fut: asyncio.Future[Any]) -> BaseException | None:
    """What a finished image I/O failed with (cancelled: CancelledError), or None."""
    return asyncio.CancelledError() if fut.cancelled() else fut.exception()


def _all_done(futures: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """One future for several: done when all are, failed with the first error."""
    if len(futures) == 1:
        return futures[0]
    run: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    gathered = asyncio.gather(*futures, return_exceptions=True)
    gathered.add_done_callback(functools.partial(_settle_run, run))
    return run


def _settle_run(run: asyncio.Future[None], parts: asyncio.Future[list[object]]) -> None:
    """A run's future, once its parts (pages queued again, write-throughs) are done."""
    if run.done():
        return
    if parts.cancelled():
        run.cancel()
        return
    errors = [r for r in parts.result() if isinstance(r, BaseException)]
    if errors:
        run.set_exception(errors[0])
    else:
        run.set_result(None)


class _Countdown:
    """Stands for the future of a write of several pages, each written
    through as its own entry of a turn: the future is set once every page
    has landed (or superseded), or at the first error."""

    __slots__ = ("future", "left")

    def __init__(self, future: asyncio.Future[None], pages: int) -> None:
        self.future = future
        self.left = pages

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, result: None) -> None:
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(result)

    def set_exception(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


#: Write-through pages of one event-loop turn, with the futures of their writes.
_Turn = list[tuple[int, "asyncio.Future[None] | _Countdown"]]

#: Sequential streams of multi-page writes followed at once (bcache keeps 128).
_STREAMS: Final = 64


_T = TypeVar("_T")


def _page_runs(turn: list[tuple[int, _T]]) -> Iterator[list[tuple[int, _T]]]:
    """Runs of adjacent page numbers in `turn` (sorted by page), at most
    `_MAX_RUN` long: one image I/O each."""
    i = 0
    while i < len(turn):
        j = i + 1
        while j < len(turn) and j - i < _MAX_RUN and turn[j][0] == turn[j - 1][0] + 1:
            j += 1
        yield turn[i:j]
        i = j


def _split_fill(run: list[tuple[int, asyncio.Future[bytes]]], io: asyncio.Future[bytes]) -> None:
    """Hand each page of a run read from the image its part (or the error)."""
    exc = StoreIOError("image read cancelled") if io.cancelled() else io.exception()
    data = None if exc is not None else io.result()
    for k, (_, fut) in enumerate(run):
        if fut.done():
            continue
        if data is None:
            fut.set_exception(exc if exc is not None else StoreIOError("image read failed"))
        else:
            fut.set_result(data[k << PAGE_SHIFT : (k + 1) << PAGE_SHIFT])


def runs(pages: list[int], longest: int = _MAX_RUN) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive page numbers (input sorted),
    cut at `longest` pages: one image I/O each."""
    i = 0
    n = len(pages)
    while i < n:
        j = i + 1
        while j < n and pages[j] == pages[j - 1] + 1 and j - i < longest:
            j += 1
        yield pages[i], j - i
        i = j


class WritebackStore:
    """A `PageStore`: a RAM tier in front of a backing image."""

    def __init__(self, ram: RamTier, image: BackingImage, policy: WritebackPolicy) -> None:
        if policy.exclusive_gets not in EXCLUSIVE_GETS:
            raise ValueError(f"exclusive_gets must be one of {EXCLUSIVE_GETS}")
        if not 0 < policy.low < policy.high <= 1:
            raise ValueError("writeback watermarks need 0 < low < high <= 1")
        self.ram = ram
        self.image = image
        self.policy = policy
        self._state = ram.table.state  # hot-path shortcuts
        self._arena = ram.arena
        n = ram.page_count
        self.img = bytearray(n)
        self.busy: dict[int, asyncio.Future[Any]] = {}
        self.touched: set[int] = set()  # changed while their I/O was in flight
        self.punching: set[int] = set()  # holes being punched: blocks going away
        self.reads: dict[int, asyncio.Future[bytes]] = {}
        self.through: dict[int, bytes | memoryview] = {}  # written through, in flight
        self._through_turn: _Turn = []
        self._through_io: asyncio.Future[None] | None = None  # this turn's, for `busy`
        self._fill_turn: list[tuple[int, asyncio.Future[bytes]]] = []  # reads to issue
        self.full = False  # a store found the arena full: write through for now
        # Sequential streams: the page after a multi-page write -> the pages
        # written in a row up to there (oldest stream first).
        self._streams: dict[int, int] = {}
        self.waiters: deque[_Waiter] = deque()
        self.queued: dict[int, int] = {}  # page -> its writes in `waiters`
        self.evicting = False
        self.offram_dirty = False  # some page left RAM dirty: the image needs updating
        self.inflight = 0
        self.frames = ram.arena.frame_count
        self._high = max(1, int(self.frames * policy.high))
        self._low = int(self.frames * policy.low)
        self._backoff_until = 0.0
        self._scheduled = False
        self._reserving = False
        self._closed = False
        self._closing = False  # close() waits for the last I/O: no more retries
        self._sync_failed = False  # an fdatasync failed: the image is not to be trusted
        # Counters.
        self.pages_written_back = 0
        self.pages_written_through = 0
        self.pages_bypassed = 0  # written through as a long sequential stream
        self.writeback_batches = 0
        self.writeback_errors = 0
        self.pages_read_from_image = 0
        self.pages_promoted = 0
        self.exclusive_releases = 0
        self.pages_punched = 0
        self.writes_waited = 0  # queued for room (backpressure) or a reservation
        self.write_wait_ns = 0
        self.reservation_failures = 0
        self.flushes = 0

    # --- start-up -------------------------------------------------------------

    def adopt_image(self, preallocated: bool) -> None:
        """Start from the image's content (durable mode) or its reservation.

        Data regions of the image become DISK pages (clean); holes stay
        holes.  With `preallocated`, every page's blocks exist already.
        """
        fd = self.image.fd
        size = self.image.size
        state = self.ram.table.state
        if preallocated:
            self.img[:] = bytes([IMG_CLEAN]) * len(self.img)
        if not self.policy.durable:
            return
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            first, last = start >> PAGE_SHIFT, (end + PAGE_SIZE - 1) >> PAGE_SHIFT
            state[first:last] = bytes([DISK]) * (last - first)
            self.img[first:last] = bytes([IMG_CLEAN]) * (last - first)
            pos = end

    # --- PageStore ------------------------------------------------------------

    def _touch(self, pgno: int) -> None:
        if pgno in self.busy:
            self.touched.add(pgno)

    def _untouched(self, pgno: int) -> bool:
        """At the end of a page's I/O: was it left alone meanwhile?"""
        if pgno in self.touched:
            self.touched.discard(pgno)
            return False
        return True

    @property
    def page_count(self) -> int:
        return self.ram.page_count

    def load(self, pgno: int) -> bytes | memoryview | asyncio.Future[bytes]:
        if pgno in self.through and pgno not in self.touched:
            return self.through[pgno]
        ram = self.ram
        state = ram.state(pgno)
        if state != DISK:
            data = ram.load(pgno)
            if state == RAM:
                mode = self.policy.exclusive_gets
                if mode == "lazy":
                    ram.make_cold(pgno)
                elif mode == "eager":
                    self._release_after_read(pgno)
            return data
        fut = self.reads.get(pgno)
        if fut is None:
            if pgno not in self.busy:
                # In the page cache: read it now, cheaper than any hand-off.
                cached = self.image.read_nowait(pgno << PAGE_SHIFT, PAGE_SIZE)
                if cached is not None:
                    self.pages_read_from_image += 1
                    self._promote(pgno, cached)
                    return cached
            fut = self._read_fill(pgno)
        return fut

    def _unreserved(self, pgno: int) -> bool:
        return self.img[pgno] == IMG_NONE or pgno in self.punching

    def store(self, pgno: int, data: bytes | memoryview) -> asyncio.Future[None] | None:
        if pgno in self.queued or self._unreserved(pgno):
            return self._enqueue(pgno, data, -1)
        # Full: a same-filled page still costs no frame (only those can
        # start with two equal bytes 8 apart); anything else goes through.
        if self.full and data[0] != data[8] and self._can_write_through(pgno):
            return self._write_through(pgno, data)
        try:
            raw = self._store_now(pgno, data)
        except ArenaFull:
            self.full = True
            if self._can_write_through(pgno):
                return self._write_through(pgno, data)
            return self._enqueue(pgno, data, -1)
        if raw and self._can_write_through(pgno):
            return self._write_through(pgno, data)  # incompressible: to the image
        return None

    def encode_threshold(self, first: int, count: int) -> int | None:
        # A run that is to bypass the tier needs no encoding.  (Should it
        # take the tier after all, it is encoded there, on the loop.)
        if self._would_bypass(first, count, arriving=True):
            return None
        return self.ram.encode_threshold()

    def store_run(
        self, first: int, data: memoryview, encoded: Encoded | None = None
    ) -> list[asyncio.Future[None]]:
        """`store` of each whole page of `data`, in order, at `first`, ...

        While the tier has room, the run goes to the RAM tier in one call
        (`RamTier.store_pages`); a run that only waits for its image blocks
        waits as one (`_pump_run`).  Where the arena fills up, and while
        writes to these pages are queued or the tier is full, pages take
        `store` one by one.  Returns the futures of what must wait.
        """
        count = len(data) >> PAGE_SHIFT
        end = first + count
        done = 0
        waits: list[asyncio.Future[None]] = []
        queued = self.queued
        blocked = (queued and any(p in queued for p in range(first, end))) or (
            self.punching and any(first <= p < end for p in self.punching)
        )
        if self._bypass(first, count) and not blocked:
            return [self._write_through_run(first, data)]
        if not (self.full or blocked):
            if self.img.find(IMG_NONE, first, end) >= 0:
                return [self._enqueue_run(first, data, encoded)]
            done, waits = self._store_pages_now(first, data, encoded)
        for i in range(done, count):
            at = i << PAGE_SHIFT
            wait = self.store(first + i, data[at : at + PAGE_SIZE])
            if wait is not None:
                waits.append(wait)
        return waits

    def _bypass(self, first: int, count: int) -> bool:
        """Whether a write of whole pages `first`.. goes straight to the image.

        As bcache's ``sequential_cutoff``: once a sequential stream of
        multi-page writes has reached `sequential_cutoff` pages, and while
        the arena is past its low watermark (where writeback keeps a full
        tier: each page stored pushes another out), its writes bypass the
        tier.  Compressing, packing, expanding and writing back a page costs
        the server several times what writing it once does, and a long
        stream (a file copy, a restore) would otherwise wash every other page
        out of RAM.  Pages without image blocks (a first write must reserve
        them), with I/O in flight, or beyond the write-through bound take the
        tier as before.  Records the write in its stream.
        """
        bypass = self._would_bypass(first, count)
        if self.policy.sequential_cutoff:
            streams = self._streams
            streams[first + count] = streams.pop(first, 0) + count
            if len(streams) > _STREAMS:
                del streams[next(iter(streams))]
        return bypass

    def _would_bypass(self, first: int, count: int, arriving: bool = False) -> bool:
        """`_bypass`'s answer, recording nothing.  `arriving`: asked as the
        write arrives, when writes ahead of it in its stream may not have
        reached the store yet; it then continues a stream that ended up to
        `inflight` pages before it."""
        cutoff = self.policy.sequential_cutoff
        if not cutoff or not (self.full or self._arena.frames_used >= self._low):
            return False
        streams = self._streams
        streamed = streams.get(first, 0)
        if not streamed and arriving:
            slack = self.policy.inflight
            streamed = max(
                (n + first - end for end, n in streams.items() if end < first <= end + slack),
                default=0,
            )
        through = self.through
        return (
            cutoff <= streamed + count
            and (len(through) + count <= self.policy.inflight or not through)
            and time.monotonic() >= self._backoff_until
            and self.img.find(IMG_NONE, first, first + count) < 0
            and not any(p in self.busy for p in range(first, first + count))
        )

    def _write_through_run(self, first: int, data: memoryview) -> asyncio.Future[None]:
        """`_write_through` of each page of `data`, with one future for them all."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        count = len(data) >> PAGE_SHIFT
        pages = _Countdown(fut, count)
        view = memoryview(bytes(data))  # the caller reuses its buffer once this returns
        through = self.through
        for i in range(count):
            through[first + i] = view[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT]
            self._add_to_turn(first + i, pages)
        self.pages_bypassed += count
        return fut

    def _store_pages_now(
        self, first: int, data: memoryview, encoded: Encoded | None
    ) -> tuple[int, list[asyncio.Future[None]]]:
        """`_store_now` of a run of reserved pages, in one call to the tier.

        Returns how many pages the arena took (the rest found it full:
        `full` is set) and the futures of the incompressible ones, which go
        on to the image as in `store`."""
        ram = self.ram
        try:
            done, raws = ram.store_pages(first, data, encoded)
        except BaseException:
            # Only ArenaFull is expected (it ends the run without raising);
            # whatever else stopped the run, the pages it stored are dirty.
            state = self._state
            for pgno in range(first, first + (len(data) >> PAGE_SHIFT)):
                if state[pgno] != DISK and self.img[pgno] == IMG_CLEAN:
                    self._touch(pgno)
                    self.img[pgno] = IMG_DIRTY
            self._offram_changed()
            raise
        waits: list[asyncio.Future[None]] = []
        if done:
            stop = first + done
            if self.busy:
                for pgno in range(first, stop):
                    self._touch(pgno)
            self.img[first:stop] = bytes([IMG_DIRTY]) * done
            if ram.table.state.count(RAM, first, stop) != done:
                self._offram_changed()  # zero or same-filled pages
            for pgno in raws:
                ram.make_cold(pgno)  # incompressible: first to go to the image
                if self._can_write_through(pgno):
                    at = (pgno - first) << PAGE_SHIFT
                    waits.append(self._write_through(pgno, data[at : at + PAGE_SIZE]))
            if ram.arena.frames_used >= self._high:
                self._schedule()
        if done < len(data) >> PAGE_SHIFT:
            self.full = True
        return done, waits

    def load_run(self, first: int, count: int) -> tuple[bytearray | None, int]:
        """`RamTier.load_run`, where the RAM tier serves a page as `load` would:
        only without exclusive gets (a RAM hit then changes nothing) and up to
        the first page being written through (its newest data is not in RAM).
        """
        if self.policy.exclusive_gets != "off":
            return None, 0
        if self.through:
            for pgno in self.through:
                if first <= pgno < first + count and pgno not in self.touched:
                    count = pgno - first
        return self.ram.load_run(first, count) if count > 0 else (None, 0)

    def patch(self, pgno: int, start: int, data: bytes | memoryview) -> asyncio.Future[None] | None:
        if (
            pgno in self.queued
            or pgno in self.through
            or self._unreserved(pgno)
            or self.ram.state(pgno) == DISK
        ):
            return self._enqueue(pgno, data, start)
        page = bytearray(self.ram.load(pgno))
        page[start : start + len(data)] = data
        try:
            self._store_now(pgno, page)
        except ArenaFull:
            return self._enqueue(pgno, data, start)
        return None

    def discard(self, first: int, count: int = 1) -> asyncio.Future[None] | None:
        end = first + count
        queued = self.queued
        if queued:
            if count <= len(queued):
                waiting = [p for p in range(first, end) if p in queued]
            else:
                waiting = sorted(p for p in queued if first <= p < end)
            if waiting:
                # Writes to these pages are queued: they would undo the trim
                # once stored, so it waits behind them there.  The rest of the
                # range had no earlier write pending and goes now.
                pos = first
                for pgno in [*waiting, end]:
                    if pgno > pos:
                        self._discard_now(pos, pgno - pos)
                    pos = pgno + 1
                return _all_done([self._enqueue(p, b"", _DISCARD) for p in waiting])
        self._discard_now(first, count)
        return None

    def _discard_now(self, first: int, count: int) -> None:
        end = first + count
        if count <= len(self.busy):
            for pgno in range(first, end):
                self._touch(pgno)
        else:
            self.touched.update(p for p in self.busy if first <= p < end)
        self.ram.discard(first, count)
        # Pages with image blocks now owe the image a punch.
        img = self.img
        changed = False
        for lo in range(first, end, _FLUSH_CHUNK):
            hi = min(end, lo + _FLUSH_CHUNK)
            part = img[lo:hi]
            if part.count(IMG_NONE) != hi - lo:
                img[lo:hi] = part.replace(b"\x01", b"\x02")  # CLEAN -> DIRTY
                changed = True
        if changed:
            self._offram_changed()

    def zero(self, pgno: int, allocate: bool) -> asyncio.Future[None] | None:
        if allocate and (pgno in self.queued or self._unreserved(pgno)):
            # NO_HOLE: the blocks must exist before the reply.  A stored zero
            # page is exactly a ZERO page that is allocated.
            return self._enqueue(pgno, ZERO_PAGE, -1)
        if pgno in self.queued:
            return self.discard(pgno, 1)  # a hole, behind the queued writes
        self._touch(pgno)
        self.ram.zero(pgno, allocate)
        if self.img[pgno] != IMG_NONE:
            self.img[pgno] = IMG_DIRTY
            self._offram_changed()
        return None

    def extents(self, first: int, count: int) -> list[tuple[int, int]]:
        return self.ram.extents(first, count)

    def flush(self) -> asyncio.Future[None]:
        return asyncio.ensure_future(self._flush(None))

    def sync_pages(self, first: int, count: int) -> asyncio.Future[None]:
        return asyncio.ensure_future(self._flush(range(first, first + count)))

    # --- writes ---------------------------------------------------------------

    def _store_now(self, pgno: int, data: bytes | bytearray | memoryview) -> bool:
        """Store in RAM (raises ArenaFull); the image is now behind.

        Returns whether the page was incompressible (kept raw, made cold)."""
        ram = self.ram
        ram.store(pgno, memoryview(data) if isinstance(data, bytearray) else data)
        self._touch(pgno)
        self.img[pgno] = IMG_DIRTY
        raw = False
        if self._state[pgno] != RAM:
            self._offram_changed()
        elif ram.is_raw(pgno):
            ram.make_cold(pgno)  # incompressible: first to go to the image
            raw = True
        if self._arena.frames_used >= self._high:
            self._schedule()
        return raw

    def _can_write_through(self, pgno: int) -> bool:
        """No I/O on the page, write-throughs within the in-flight bound, and
        no image error in the last moments (then writes wait for room)."""
        return (
            pgno not in self.busy
            and len(self.through) < self.policy.inflight
            and time.monotonic() >= self._backoff_until
        )

    def _write_through(self, pgno: int, data: bytes | memoryview) -> asyncio.Future[None]:
        """Send a whole page to the image; the tier keeps its old copy until then."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.through[pgno] = bytes(data)
        self._add_to_turn(pgno, fut)
        return fut

    def _add_to_turn(self, pgno: int, fut: asyncio.Future[None] | _Countdown) -> None:
        if self._through_io is None:
            loop = asyncio.get_running_loop()
            self._through_io = loop.create_future()
            loop.call_soon(self._issue_through)
        self.busy[pgno] = self._through_io
        self._through_turn.append((pgno, fut))

    def _issue_through(self) -> None:
        """Write this turn's write-through pages, one `pwritev` per run."""
        turn = sorted(self._through_turn, key=lambda t: t[0])
        turn_io = self._through_io
        assert turn_io is not None
        self._through_turn = []
        self._through_io = None
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(self.policy.wait_timeout, self._through_expired, turn)
        left = [len(turn), 0]  # pages not landed yet, pages to retry

        def done(run: _Turn, f: asyncio.Future[None]) -> None:
            try:
                left[1] += self._through_done(run, f)
            finally:
                left[0] -= len(run)
                if not left[0]:
                    if not left[1]:
                        expiry.cancel()  # (retried pages keep their deadline)
                    turn_io.set_result(None)

        for run in _page_runs(turn):
            data = [self.through[pgno] for pgno, _ in run]
            io = self.image.submit(self.image.write, run[0][0] << PAGE_SHIFT, data)
            io.add_done_callback(functools.partial(done, run))

    def _through_expired(self, turn: _Turn) -> None:
        for pgno, fut in turn:
            if not fut.done():
                fut.set_exception(
                    StoreIOError(
                        f"page {pgno}: the backing image did not take the write in "
                        f"{self.policy.wait_timeout:g} s"
                    )
                )

    def _through_done(self, run: _Turn, io: asyncio.Future[None]) -> int:
        """A run landed (or failed); returns how many of its pages are retried.

        A page changed meanwhile is left to that newer change.  A failed page
        keeps its new content in `through` (the image may hold any part of
        it, so neither copy there nor the tier's old one can stand for it)
        and stays busy until a retry lands, as a failed writeback does.
        """
        error = _error(io)
        failed = error is not None
        if failed and not self._closed:
            self._io_failed("write-through", [pgno for pgno, _ in run], error)
        ram = self.ram
        landed: list[asyncio.Future[None] | _Countdown] = []
        retry: _Turn = []
        for pgno, fut in run:
            same = self._untouched(pgno)
            if same and failed and not self._closing:
                retry.append((pgno, fut))
                if ram.state(pgno) != DISK:
                    self.img[pgno] = IMG_DIRTY
                continue
            self.busy.pop(pgno, None)
            self.through.pop(pgno)
            if not same:
                # Rewritten, trimmed or zeroed meanwhile: that is newer, and
                # whoever changed the page marked the image dirty.
                self.offram_dirty = True
                landed.append(fut)
            elif not failed:
                ram.on_disk(pgno)
                self.img[pgno] = IMG_CLEAN
                self.pages_written_through += 1
                landed.append(fut)
            elif not fut.done():
                fut.set_exception(StoreIOError(f"page {pgno}: image write failed at shutdown"))
        if retry:
            loop = asyncio.get_running_loop()
            retry_io: asyncio.Future[None] = loop.create_future()
            for pgno, _ in retry:
                self.busy[pgno] = retry_io
            loop.call_later(_RETRY_DELAY, self._retry_through, retry, retry_io)
        for fut in landed:
            if not fut.done():
                fut.set_result(None)
        if not self._closed:
            self._pump_waiters()
            self._schedule()
        return len(retry)

    def _retry_through(self, retry: _Turn, retry_io: asyncio.Future[None]) -> None:
        """Write failed write-throughs again, unless their pages changed."""
        for pgno, fut in retry:
            if self._untouched(pgno) and not self._closing:
                self._add_to_turn(pgno, fut)
                continue
            del self.busy[pgno]
            self.through.pop(pgno)
            if not fut.done():
                if self._closing:
                    fut.set_exception(StoreIOError(f"page {pgno}: image write failed"))
                else:
                    fut.set_result(None)  # superseded by a newer change
        retry_io.set_result(None)
        self._schedule()

    def _enqueue(self, pgno: int, data: bytes | memoryview, start: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(pgno, bytes(data), start, loop.create_future())
        self.waiters.append(waiter)
        self.queued[pgno] = self.queued.get(pgno, 0) + 1
        self.writes_waited += 1
        waiter.timer = loop.call_later(self.policy.wait_timeout, self._expire, waiter)
        self._pump_waiters()
        return waiter.future

    def _enqueue_run(
        self, first: int, data: memoryview, encoded: Encoded | None
    ) -> asyncio.Future[None]:
        """Queue a run of whole pages as one write (see `_pump_run`)."""
        loop = asyncio.get_running_loop()
        count = len(data) >> PAGE_SHIFT
        waiter = _Waiter(first, bytes(data), -1, loop.create_future(), count=count, encoded=encoded)
        self.waiters.append(waiter)
        queued = self.queued
        for pgno in range(first, first + count):
            queued[pgno] = queued.get(pgno, 0) + 1
        self.writes_waited += count
        waiter.timer = loop.call_later(self.policy.wait_timeout, self._expire, waiter)
        self._pump_waiters()
        return waiter.future

    def _unqueue(self, w: _Waiter) -> None:
        """`w` leaves the queue (stored, failed or expired).

        Its timer goes too: a live timer would hold the page's data for
        the whole `wait_timeout` (a fast fill would keep gigabytes)."""
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if w.queued:
            w.queued = False
            queued = self.queued
            for pgno in range(w.pgno, w.pgno + w.count):
                left = queued[pgno] - 1
                if left:
                    queued[pgno] = left
                else:
                    del queued[pgno]

    def _pump_waiters(self) -> None:
        """Store queued writes in order while there is room and a reservation.

        Order matters only between writes to one page: a write to a page
        with nothing queued does not wait behind the queue (`store`)."""
        waiters = self.waiters
        while waiters:
            w = waiters[0]
            if w.future.done():  # expired
                waiters.popleft()
                continue
            if w.start == _DISCARD:
                waiters.popleft()
                self._unqueue(w)
                self._discard_now(w.pgno, w.count)
                w.future.set_result(None)
                continue
            if w.count > 1:
                if not self._pump_run(w):
                    return
                continue
            if w.pgno in self.punching:
                return  # the punch's completion pumps again
            if self.img[w.pgno] == IMG_NONE:
                self._reserve()
                return
            data: bytes | bytearray = w.data
            if w.start >= 0:
                if w.pgno in self.through and w.pgno not in self.touched:
                    base: bytes | memoryview | None = self.through[w.pgno]  # in flight
                elif self.ram.state(w.pgno) == DISK and w.base is None:
                    self._fetch_base(w)
                    self._prefetch_bases()
                    return
                else:
                    base = w.base if self.ram.state(w.pgno) == DISK else self.ram.load(w.pgno)
                assert base is not None
                data = bytearray(base)
                data[w.start : w.start + len(w.data)] = w.data
            # Full: a whole page (a first write, typically, once its blocks
            # are reserved) goes to the image as a direct write would; so
            # does any page that finds no room, patched or not.
            through = (
                w.start < 0
                and self.full
                and w.data[0] != w.data[8]
                and self._can_write_through(w.pgno)
            )
            if not through:
                try:
                    self._store_now(w.pgno, data)
                except ArenaFull:
                    self.full = True
                    if not self._can_write_through(w.pgno):
                        self.evicting = True
                        self._schedule()
                        return
                    through = True
                except StoreError as exc:
                    waiters.popleft()
                    self._unqueue(w)
                    w.future.set_exception(exc)
                    continue
            waiters.popleft()
            self._unqueue(w)
            self.write_wait_ns += int((time.monotonic() - w.since) * 1e9)
            if through:
                self.through[w.pgno] = bytes(data)
                self._add_to_turn(w.pgno, w.future)
            else:
                w.future.set_result(None)

    def _pump_run(self, w: _Waiter) -> bool:
        """Store the run at the head of the queue; False if it must wait more.

        A run waits for its image blocks and any punch in it, then goes to
        the RAM tier whole.  Pages the arena has no room for (or all of them,
        when the tier is full) are queued again at the head, one waiter each,
        and the run's future waits for them.
        """
        first, count = w.pgno, w.count
        end = first + count
        if self.punching and any(first <= p < end for p in self.punching):
            return False  # the punch's completion pumps again
        if self.img.find(IMG_NONE, first, end) >= 0:
            self._reserve()
            return False
        self.waiters.popleft()
        self._unqueue(w)
        self.write_wait_ns += int((time.monotonic() - w.since) * 1e9)
        done, waits = 0, list[asyncio.Future[None]]()
        if not self.full:
            try:
                done, waits = self._store_pages_now(first, memoryview(w.data), w.encoded)
            except StoreError as exc:
                w.future.set_exception(exc)
                return True
            except Exception as exc:
                log.exception("storing a queued run of %d pages at %d failed", count, first)
                w.future.set_exception(StoreIOError(f"pages {first}+{count}: {exc}"))
                return True
        if done < count:
            loop = asyncio.get_running_loop()
            left = max(0.0, w.since + self.policy.wait_timeout - time.monotonic())
            for i in reversed(range(done, count)):
                at = i << PAGE_SHIFT
                page = _Waiter(first + i, w.data[at : at + PAGE_SIZE], -1, loop.create_future())
                self.queued[page.pgno] = self.queued.get(page.pgno, 0) + 1
                page.timer = loop.call_later(left, self._expire, page)
                self.waiters.appendleft(page)
                waits.append(page.future)
        if waits:
            gathered = asyncio.gather(*waits, return_exceptions=True)
            gathered.add_done_callback(functools.partial(_settle_run, w.future))
        elif not w.future.done():
            w.future.set_result(None)
        return True

    def _prefetch_bases(self) -> None:
        """Start the base reads of the patches queued behind the head as well.

        Otherwise a queue of partial writes to pages on disk reads one base
        at a time, each behind the writeback I/O on the pool, and stalls.
        Only a page's first queued write qualifies: writes to a queued page
        wait behind it, so nothing changes the page before it is stored (and
        one whose page left DISK meanwhile uses the RAM copy, as at the head).
        """
        seen: set[int] = set()
        for i, w in enumerate(self.waiters):
            if i >= _PREFETCH_SCAN:
                break
            if w.future.done():
                continue  # failed or expired: changes nothing
            ahead = w.pgno in seen
            seen.update(range(w.pgno, w.pgno + w.count))
            if ahead:
                continue
            if (
                i
                and w.start >= 0
                and w.base is None
                and not w.fetching
                and not w.future.done()
                and w.pgno not in self.punching
                # No other I/O on the page but a read: a write-through in
                # flight holds newer data than the image (the head takes it
                # from `through`), and a second I/O must not take its place.
                and (w.pgno not in self.busy or w.pgno in self.reads)
                and self.img[w.pgno] != IMG_NONE
                and self.ram.state(w.pgno) == DISK
            ):
                self._fetch_base(w)

    def _fetch_base(self, w: _Waiter) -> None:
        """Read a patched page's old content from the image; pump again when in."""
        if w.fetching:
            return
        w.fetching = True
        fut = self.reads.get(w.pgno)
        if fut is None:
            fut = self._read_fill(w.pgno)

        def got(f: asyncio.Future[bytes]) -> None:
            w.fetching = False
            if f.cancelled() or f.exception() is not None:
                if not w.future.done():
                    self._unqueue(w)
                    w.future.set_exception(StoreIOError(f"page {w.pgno}: image read failed"))
            else:
                w.base = f.result()
            self._pump_waiters()

        fut.add_done_callback(got)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._unqueue(waiter)
            waiter.future.set_exception(
                StoreIOError(
                    f"page {waiter.pgno}: no room in the RAM tier after "
                    f"{self.policy.wait_timeout:g} s (writeback cannot keep up or is failing)"
                )
            )
            self.write_wait_ns += int(self.policy.wait_timeout * 1e9)

    def _reserve(self) -> None:
        """Reserve image blocks for the queued pages that have none, in one job.

        Reservations are made a region (2 MiB) at a time: every unreserved
        page of a region a queued write touches is reserved with it, so a
        stream of first writes costs one `fallocate` per region, not per page.
        """
        if self._reserving:
            return
        img = self.img
        wanted = sorted(
            {
                p
                for w in self.waiters
                if w.start != _DISCARD
                for p in range(w.pgno, w.pgno + w.count)
                if img[p] == IMG_NONE
            }
        )
        ranges: list[tuple[int, int]] = []
        for region in sorted({p >> _REGION_SHIFT for p in wanted}):
            start = region << _REGION_SHIFT
            stop = min(start + (1 << _REGION_SHIFT), len(img))
            for m in _UNRESERVED_RUN.finditer(img, start, stop):
                ranges.append((m.start(), m.end() - m.start()))
        self._reserving = True
        fut = self.image.submit(self._reserve_blocking, ranges, wanted)
        fut.add_done_callback(lambda f: self._reserved(wanted, f))

    def _reserve_blocking(
        self, ranges: list[tuple[int, int]], wanted: list[int]
    ) -> list[tuple[int, int]]:
        """Reserve the ranges (pool thread); returns the (first, count) reserved."""
        done: list[tuple[int, int]] = []
        for first, count in ranges:
            try:
                self.image.reserve(first << PAGE_SHIFT, count << PAGE_SHIFT)
                done.append((first, count))
            except OSError:
                # Full: fall back to the pages writes wait for, one by one.
                for pgno in wanted:
                    if first <= pgno < first + count:
                        try:
                            self.image.reserve(pgno << PAGE_SHIFT, PAGE_SIZE)
                            done.append((pgno, 1))
                        except OSError:
                            pass
        return done

    def _reserved(self, wanted: list[int], fut: asyncio.Future[list[tuple[int, int]]]) -> None:
        self._reserving = False
        if self._closed:
            return
        img = self.img
        for first, count in [] if fut.exception() is not None else fut.result():
            for pgno in range(first, first + count):
                if img[pgno] == IMG_NONE:
                    img[pgno] = IMG_CLEAN  # blocks exist, content still a hole
        failed = {p for p in wanted if img[p] == IMG_NONE}
        if failed:
            self.reservation_failures += len(failed)
            keep: deque[_Waiter] = deque()
            for w in self.waiters:
                lost = [p for p in range(w.pgno, w.pgno + w.count) if p in failed]
                if lost and w.start != _DISCARD:
                    # A run fails whole: none of its pages is stored.
                    self._unqueue(w)
                    if not w.future.done():
                        w.future.set_exception(
                            NoSpace(f"backing image is full: no room for page {lost[0]}")
                        )
                else:
                    keep.append(w)
            self.waiters = keep
        self._pump_waiters()

    # --- reads ----------------------------------------------------------------

    def _read_fill(self, pgno: int) -> asyncio.Future[bytes]:
        """Read a page from the image; the pages asked for in one event-loop
        turn are read with one `pread` per run of adjacent pages."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        if not self._fill_turn:
            loop.call_soon(self._issue_fills)
        self._fill_turn.append((pgno, fut))
        self.reads[pgno] = fut
        self.busy[pgno] = fut
        self.pages_read_from_image += 1
        fut.add_done_callback(lambda f: self._filled(pgno, f))
        return fut

    def _issue_fills(self) -> None:
        turn = sorted(self._fill_turn, key=lambda t: t[0])
        self._fill_turn = []
        for run in _page_runs(turn):
            io = self.image.submit(self.image.read, run[0][0] << PAGE_SHIFT, len(run) << PAGE_SHIFT)
            io.add_done_callback(functools.partial(_split_fill, run))

    def _filled(self, pgno: int, fut: asyncio.Future[bytes]) -> None:
        self.reads.pop(pgno, None)
        self.busy.pop(pgno, None)
        untouched = self._untouched(pgno)
        if fut.cancelled() or fut.exception() is not None or self._closed:
            return
        if untouched:
            self._promote(pgno, fut.result())
        self._schedule()

    def _promote(self, pgno: int, data: bytes) -> None:
        """Exclusive gets off: a page read from the image comes back into RAM
        as clean while there is room to spare."""
        if (
            self.policy.exclusive_gets == "off"
            and self.ram.state(pgno) == DISK
            and self.ram.arena.frames_used < self._low
            and not self.waiters
        ):
            try:
                self.ram.store(pgno, data)
            except (ArenaFull, StoreError):
                return
            self.img[pgno] = IMG_CLEAN
            self.pages_promoted += 1

    def _release_after_read(self, pgno: int) -> None:
        """Exclusive get: the client holds the page now; free the RAM copy."""
        if pgno in self.busy:
            return
        if self.img[pgno] == IMG_CLEAN:
            self.ram.release(pgno)
            self.exclusive_releases += 1
        else:
            self._write_run([pgno], release=True)

    # --- writeback ------------------------------------------------------------

    def _offram_changed(self) -> None:
        self.offram_dirty = True
        self._schedule(later=True)

    def _schedule(self, later: bool = False) -> None:
        if self._scheduled or self._closed:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        if later:
            loop.call_later(0.05, self._run)
        else:
            loop.call_soon(self._run)

    def _run(self) -> None:
        """One round of policy: evict to the low watermark, clean off-RAM pages."""
        self._scheduled = False
        if self._closed:
            return
        now = time.monotonic()
        if now < self._backoff_until:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._backoff_until - now, self._run)
            return
        used = self.ram.arena.frames_used
        if used < self._high:
            self.full = False  # as zswap's accept threshold: room again
        if used >= self._high or (self.waiters and self.evicting):
            self.evicting = True
        if self.evicting and used <= self._low and not self.waiters:
            self.evicting = False
        if self.evicting:
            self._evict()
        if self.offram_dirty and self.inflight < self.policy.inflight:
            self._clean_offram()

    def _evict(self) -> None:
        budget = self.policy.inflight - self.inflight
        # Pages in flight free their frames when they land: with about two
        # pages a frame, this many are enough to reach the low watermark.
        enough = 2 * (self.ram.arena.frames_used - self._low) + self.policy.batch
        if budget <= 0 or (self.inflight >= enough and not self.waiters):
            return
        want = min(self.policy.batch, budget)
        candidates = self.ram.coldest_pages(want + len(self.busy))
        dirty: list[int] = []
        released = 0
        for pgno in candidates:
            if pgno in self.busy or self.ram.state(pgno) != RAM:
                continue
            if self.img[pgno] == IMG_CLEAN:
                self.ram.release(pgno)
                released += 1
            else:
                dirty.append(pgno)
            if len(dirty) + released >= want:
                break
        if not dirty and not released:
            if self.ram.compact():
                self._schedule()
            return
        dirty.sort()
        short: list[list[int]] = []
        grouped = 0
        for first, count in runs(dirty):
            if count >= _SHORT_RUN:
                self._write_run(list(range(first, first + count)), release=True)
                continue
            short.append(list(range(first, first + count)))
            grouped += count
            if grouped >= _GROUP:  # several jobs: the pool's threads share them
                self._write_runs(short, release=True)
                short, grouped = [], 0
        if short:
            self._write_runs(short, release=True)
        if released:
            self._pump_waiters()
        self.writeback_batches += 1
        if released or self.inflight < self.policy.inflight:
            self._schedule()  # keep the pipeline full: another batch next turn

    def _run_data(self, pages: list[int]) -> list[bytes | memoryview]:
        """The content of consecutive RAM pages, for one pwritev."""
        # Expanded in one C call as far as the tier can (`RamTier.load_run`).
        run, done = self.ram.load_run(pages[0], len(pages))
        data: list[bytes | memoryview] = []
        if run is not None and done:
            data.append(memoryview(run)[: done << PAGE_SHIFT])
        data += [self.ram.load(p) for p in pages[done:]]
        return data

    def _write_run(self, pages: list[int], release: bool) -> asyncio.Future[None]:
        """Write consecutive RAM pages to the image with one pwritev."""
        fut = self.image.submit(self.image.write, pages[0] << PAGE_SHIFT, self._run_data(pages))
        self._track(pages, fut)
        fut.add_done_callback(lambda f: self._written(pages, release, f))
        return fut

    def _write_runs(self, runs_: list[list[int]], release: bool) -> None:
        """Short runs (the pages of random writes) as one job for the pool:
        a pwritev each, but one hop to a thread and one future for them all."""
        jobs = [(run[0] << PAGE_SHIFT, self._run_data(run)) for run in runs_]
        pages = [pgno for run in runs_ for pgno in run]
        fut = self.image.submit(self.image.write_runs, jobs)
        self._track(pages, fut)
        fut.add_done_callback(lambda f: self._runs_written(runs_, release, f))

    def _runs_written(
        self, runs_: list[list[int]], release: bool, fut: asyncio.Future[list[tuple[int, OSError]]]
    ) -> None:
        """`_written` of a group of runs: those that failed stay dirty (and
        writeback backs off), the others landed."""
        failed = {} if _error(fut) is not None else dict(fut.result())
        if not failed:
            self._written([pgno for run in runs_ for pgno in run], release, fut)
            return
        bad = [pgno for i in failed for pgno in runs_[i]]
        self._untrack(bad)
        if not self._closed:
            # Back off (once for the job, naming its first failed run) before
            # the landed pages let waiting writes go on through.
            first_failed = min(failed)
            self._io_failed("write", runs_[first_failed], failed[first_failed])
        landed = [pgno for i, run in enumerate(runs_) if i not in failed for pgno in run]
        if landed:
            self._written(landed, release, fut)

    def _track(self, pages: list[int], fut: asyncio.Future[Any]) -> None:
        for p in pages:
            self.busy[p] = fut
        self.inflight += len(pages)

    def _untrack(self, pages: list[int]) -> list[bool]:
        """End the I/O of these pages; for each, whether it was left alone."""
        for p in pages:
            self.busy.pop(p, None)
        self.inflight -= len(pages)
        return [self._untouched(p) for p in pages]

    def _written(self, pages: list[int], release: bool, fut: asyncio.Future[Any]) -> None:
        untouched = self._untrack(pages)
        if self._closed:
            return
        if (error := _error(fut)) is not None:
            self._io_failed("write", pages, error)
            return
        state = self._state
        released: list[int] = []
        for pgno, same in zip(pages, untouched, strict=True):
            if not same:
                self.offram_dirty = True  # rewritten or trimmed meanwhile: look again
                continue
            self.img[pgno] = IMG_CLEAN
            self.pages_written_back += 1
            if release and state[pgno] == RAM:
                released.append(pgno)
        if released:
            self.ram.release_pages(released)
            if self.policy.exclusive_gets == "eager":
                self.exclusive_releases += len(released)
        self._pump_waiters()
        self._schedule()

    def _io_failed(self, what: str, pages: list[int], exc: BaseException | None) -> None:
        self.writeback_errors += 1
        log.error(
            "image %s of pages %d-%d failed: %s; pages stay dirty, retrying in %.1f s",
            what,
            pages[0],
            pages[-1],
            exc,
            _RETRY_DELAY,
        )
        self._backoff_until = time.monotonic() + _RETRY_DELAY
        self._schedule()

    def _dirty_offram(self, limit: int) -> list[int]:
        """Up to `limit` dirty pages that are not in RAM and have no I/O in flight."""
        state = self.ram.table.state
        out: list[int] = []
        skipped = False
        for m in _DIRTY_RUN.finditer(self.img):
            for pgno in range(m.start(), m.end()):
                if state[pgno] == RAM:
                    continue
                if pgno in self.busy:
                    skipped = True  # its I/O's completion brings it back here
                    continue
                out.append(pgno)
                if len(out) >= limit:
                    return out
        if not skipped:
            self.offram_dirty = False
        return out

    def _clean_offram(self) -> None:
        """Punch, zero or pattern-fill dirty pages that left RAM."""
        budget = max(1, self.policy.inflight - self.inflight)
        self._issue(self._dirty_offram(budget * 16))

    def _image_op(self, st: int, pages: list[int]) -> asyncio.Future[None]:
        image = self.image
        offset, length = pages[0] << PAGE_SHIFT, len(pages) << PAGE_SHIFT
        if st == HOLE:
            fut = image.submit(image.punch, offset, length)
        elif st == ZERO:
            fut = image.submit(image.zero_allocated, offset, length)
        else:
            assert st == SAME
            data = [expand_word(self.ram.table.handle[p]) for p in pages]
            fut = image.submit(image.write, offset, data)
        self._track(pages, fut)
        if st == HOLE:
            self.punching.update(pages)

        def done(f: asyncio.Future[None]) -> None:
            untouched = self._untrack(pages)
            if st == HOLE:
                self.punching.difference_update(pages)
            if self._closed:
                return
            if (error := _error(f)) is not None:
                self._io_failed("update", pages, error)
                self.offram_dirty = True
                return
            for pgno, same in zip(pages, untouched, strict=True):
                if st == HOLE:
                    # The blocks are gone whatever happened meanwhile (a write
                    # to a page being punched waits, see `_unreserved`).
                    self.img[pgno] = IMG_NONE if same else IMG_DIRTY
                    if not same and self.ram.state(pgno) == HOLE:
                        self.img[pgno] = IMG_NONE
                elif same:
                    self.img[pgno] = IMG_CLEAN
                else:
                    self.offram_dirty = True
            if st == HOLE:
                self.pages_punched += len(pages)
                self._pump_waiters()
            self._schedule(later=self.offram_dirty)

        fut.add_done_callback(done)
        return fut

    # --- durability -----------------------------------------------------------

    async def _flush(self, only: range | None) -> None:
        """Write every page dirty now (of `only`) to the image, then fdatasync.

        Works through the image map in chunks; within a chunk each dirty page
        is written once by the flush itself (so pages rewritten meanwhile
        cannot keep it going), after waiting for any older I/O on it.
        """
        self.flushes += 1
        start, stop = (only.start, only.stop) if only else (0, len(self.img))
        failed = False
        pos = start
        while pos < stop and not failed:
            chunk_end = min(stop, pos + _FLUSH_CHUNK)
            todo = [
                p
                for m in _DIRTY_RUN.finditer(self.img, pos, chunk_end)
                for p in range(m.start(), m.end())
            ]
            pos = chunk_end
            while todo and not failed:
                waits = {self.busy[p] for p in todo if p in self.busy}
                free = [p for p in todo if p not in self.busy and self.img[p] == IMG_DIRTY]
                todo = [p for p in todo if p in self.busy]
                results = await asyncio.gather(*self._issue(free), return_exceptions=True)
                failed = any(isinstance(r, BaseException) for r in results)
                await asyncio.gather(*waits, return_exceptions=True)
                todo = [p for p in todo if self.img[p] == IMG_DIRTY]
        if failed:
            raise StoreIOError("flush: the backing image refused a write")
        if self._sync_failed:
            raise StoreIOError("flush: an earlier fdatasync failed; the image cannot be trusted")
        try:
            await self.image.submit(self.image.sync)
        except OSError as exc:
            # Linux reports a writeback error once and then forgets it: the
            # pages written since the last good sync may never reach the disk.
            # Refuse every later flush rather than acknowledge them.
            self._sync_failed = True
            log.error(
                "fdatasync of %s failed (%s): refusing all further flushes",
                self.image.path,
                exc.strerror,
            )
            raise StoreIOError(f"flush: fdatasync failed: {exc.strerror}") from None

    def _issue(self, pages: list[int]) -> list[asyncio.Future[None]]:
        """Bring these dirty, idle pages to the image (RAM pages stay in RAM)."""
        state = self.ram.table.state
        groups: dict[int, list[int]] = {}
        for pgno in sorted(pages):
            groups.setdefault(state[pgno], []).append(pgno)
        futures = []
        for st, group in groups.items():
            for first, count in runs(group, _MAX_RUN if st in (RAM, SAME) else 1 << 20):
                run = list(range(first, first + count))
                if st == RAM:
                    futures.append(self._write_run(run, release=False))
                else:
                    futures.append(self._image_op(st, run))
        return futures

    async def close(self) -> None:
        """Durable: write back everything and sync; then stop and close the image."""
        if self.policy.durable:
            try:
                while _DIRTY_RUN.search(self.img):
                    await self._flush(None)
            except StoreError as exc:
                log.error("could not write back every page at shutdown: %s", exc)
        for w in self.waiters:
            self._unqueue(w)
            if not w.future.done():
                w.future.set_exception(StoreIOError("server shutting down"))
        self._closing = True
        pending = list(set(self.busy.values()))
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._closed = True
        self.image.close()

    # --- operator's view ------------------------------------------------------

    @property
    def page_metadata_bytes(self) -> int:
        """Bookkeeping per device page, the tier's and this layer's (budget: 16)."""
        return self.ram.page_metadata_bytes + len(self.img)

    def stats(self) -> dict[str, int]:
        out = self.ram.stats()
        out["metadata_bytes"] += len(self.img)
        out.update(
            {
                "pages_written_back_total": self.pages_written_back,
                "pages_written_through_total": self.pages_written_through,
                "pages_bypassed_total": self.pages_bypassed,
                "writeback_batches_total": self.writeback_batches,
                "writeback_errors_total": self.writeback_errors,
                "writeback_inflight": self.inflight,
                "dirty_pages": self.img.count(IMG_DIRTY),
                "pages_read_from_image_total": self.pages_read_from_image,
                "pages_promoted_total": self.pages_promoted,
                "exclusive_releases_total": self.exclusive_releases,
                "pages_punched_total": self.pages_punched,
                "writes_waited_total": self.writes_waited,
                "write_wait_ms_total": self.write_wait_ns // 1_000_000,
                "writes_waiting": len(self.waiters),
                "reservation_failures_total": self.reservation_failures,
                "flushes_total": self.flushes,
                "image_allocated_bytes": self.image.allocated_bytes(),
            }
        )
        return out
