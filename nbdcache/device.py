"""Block-device semantics over a page store.

The device owns the mapping from NBD byte ranges to 4 KiB pages: reads
gather pages, unaligned writes and zeroing do read-modify-write of the edge
pages, TRIM frees only the whole pages it covers (the spec lets a server
round a trim inwards), WRITE_ZEROES makes whole pages ZERO (a hole unless
NO_HOLE asks to keep them allocated), and BLOCK_STATUS turns the store's
page runs into `base:allocation` extents in bytes.  Bounds, flags and
permissions are checked before a request gets here (`protocol.check_request`).

A store answers from RAM at once; when it needs the disk (a page only in the
backing image, room that writeback must make first) it returns an asyncio
future instead, and so does the device method: the server then replies when
the future is done.  Pages are handed to the store in ascending order, one
request at a time, so a store that queues keeps the client's order.  Runs
of whole pages go to the store in one call (`store_run`, `load_run`), so the
tier's C loops see a whole request at once.

Large writes are compressed off the event loop.  A write of at least
`offload_pages` whole pages is encoded on the encoder's thread
(`nbdcache.tier.encoder`) while the loop goes on parsing and answering, and
is stored and answered once that is done.  Every change that arrives
meanwhile (writes, TRIM, WRITE_ZEROES) waits in one first-in first-out
queue behind it, so changes reach the store in the order they arrived and
the last write to a page wins.  Reads do not wait: like any read sent before
a write's reply, they may see the pages before or after it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from nbdcache.tier import PAGE_SHIFT, PAGE_SIZE, ZERO_PAGE, PageStore, StoreIOError
from nbdcache.tier.encoder import RunEncoder

if TYPE_CHECKING:
    from nbdcache.tier.codec import Encoded

_MASK = PAGE_SIZE - 1
#: At most this many extents in one block status reply (the spec's SHOULD).
MAX_EXTENTS = 1 << 20

Buffers = list[bytes | bytearray | memoryview]
Extents = list[tuple[int, int]]
Outcome = Buffers | Extents | None | asyncio.Future[Any]

#: Writes of at least this many whole pages (64 KiB) are encoded off the loop.
OFFLOAD_PAGES = 16


async def _gather(parts: Sequence[object]) -> list[Any]:
    """`parts` with every future in it replaced by its result."""
    return [await x if isinstance(x, asyncio.Future) else x for x in parts]


def _copy_outcome(dest: asyncio.Future[Any], src: asyncio.Future[Any]) -> None:
    if src.cancelled():
        dest.cancel()
    elif (exc := src.exception()) is not None:
        dest.set_exception(exc)
    else:
        dest.set_result(src.result())


class _Change:
    """A change waiting its turn: `apply` runs once `encoding` (if any) is done."""

    __slots__ = ("apply", "done", "encoding")

    def __init__(self, apply: Callable[[], Outcome], encoding: asyncio.Future[Any] | None) -> None:
        self.apply = apply
        self.encoding = encoding
        self.done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()


class Device:
    """One export's content: a size and the page store behind it."""

    def __init__(self, store: PageStore, size: int, offload_pages: int = OFFLOAD_PAGES) -> None:
        if size % PAGE_SIZE or size <= 0:
            raise ValueError("device size must be a positive multiple of 4096")
        if store.page_count != size >> PAGE_SHIFT:
            raise ValueError("page store does not match the device size")
        self.store = store
        self.size = size
        self.offload_pages = offload_pages
        self._encoder: RunEncoder | None = None
        self._changes: deque[_Change] = deque()
        self._closed = False

    def close(self) -> None:
        """Stop the encoder's thread; changes still queued fail (shutdown).

        Writes after this are encoded on the loop again."""
        changes, self._changes = self._changes, deque()
        for change in changes:
            if not change.done.done():
                change.done.set_exception(StoreIOError("server shutting down"))
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
        self._closed = True

    def read(self, offset: int, length: int) -> Buffers | asyncio.Future[Buffers]:
        """The bytes of [offset, offset+length) as a list of buffers."""
        if length == 0:
            return []
        store = self.store
        first = offset >> PAGE_SHIFT
        count = ((offset + length - 1) >> PAGE_SHIFT) - first + 1
        run, done = store.load_run(first, count)
        if done == count:
            assert run is not None
            head = offset & _MASK
            return [run if length == len(run) else memoryview(run)[head : head + length]]
        pages: list[object] = []
        if run is not None:
            view = memoryview(run)
            pages = [view[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT] for i in range(done)]
        load = store.load
        pages.extend(load(p) for p in range(first + done, first + count))
        for page in pages:
            if isinstance(page, asyncio.Future):
                return asyncio.ensure_future(self._read_slow(pages, offset, length))
        return self._edges(pages, offset, length)  # type: ignore[arg-type]

    async def _read_slow(self, pages: Sequence[object], offset: int, length: int) -> Buffers:
        return self._edges(await _gather(pages), offset, length)

    @staticmethod
    def _edges(pages: Buffers, offset: int, length: int) -> Buffers:
        head = offset & _MASK
        tail = (offset + length) & _MASK
        if len(pages) == 1:
            if head or tail:
                pages[0] = memoryview(pages[0])[head : head + length]
            return pages
        if head:
            pages[0] = memoryview(pages[0])[head:]
        if tail:
            pages[-1] = memoryview(pages[-1])[:tail]
        return pages

    def write(self, offset: int, data: memoryview, fua: bool = False) -> Outcome:
        """Write `data` at `offset`; the store patches partial pages.

        Partial pages are patched by the store, not read here and written
        back, so two writes to different bytes of one page never undo each
        other, even when the store has to queue them.
        """
        length = len(data)
        if (
            length >= self.offload_pages << PAGE_SHIFT
            and not (offset | length) & _MASK
            and not self._closed
            and (
                threshold := self.store.encode_threshold(offset >> PAGE_SHIFT, length >> PAGE_SHIFT)
            )
            is not None
        ):
            copy = bytes(data)  # the caller reuses its buffer once this returns
            encoding = self._run_encoder().encode(copy, threshold)
            return self._queue(
                lambda: self._write_now(offset, memoryview(copy), fua, encoding.result()),
                encoding,
            )
        if self._changes:
            return self._queue_write(offset, data, fua)
        return self._write_now(offset, data, fua)

    def write_page(self, pgno: int, data: memoryview) -> asyncio.Future[Any] | None:
        """`write` of one whole page without FUA: the store's own answer."""
        if self._changes:
            return self._queue_write(pgno << PAGE_SHIFT, data, False)
        return self.store.store(pgno, data)

    def _queue_write(self, offset: int, data: memoryview, fua: bool) -> asyncio.Future[Any]:
        copy = bytes(data)  # the caller reuses its buffer once this returns
        return self._queue(lambda: self._write_now(offset, memoryview(copy), fua))

    def _run_encoder(self) -> RunEncoder:
        loop = asyncio.get_running_loop()
        if self._encoder is None or self._encoder.loop is not loop:
            if self._encoder is not None:  # a device used on another loop since
                self._encoder.close()
            self._encoder = RunEncoder(loop)
        return self._encoder

    def _queue(
        self, apply: Callable[[], Outcome], encoding: asyncio.Future[Any] | None = None
    ) -> asyncio.Future[Any]:
        """Apply a change after every change queued before it (see the docstring)."""
        change = _Change(apply, encoding)
        self._changes.append(change)
        if encoding is not None:
            encoding.add_done_callback(lambda _: self._apply_ready())
        return change.done

    def _apply_ready(self) -> None:
        """Apply queued changes from the head while their encoding is done."""
        changes = self._changes
        while changes:
            change = changes[0]
            if change.encoding is not None and not change.encoding.done():
                return
            changes.popleft()
            try:
                result = change.apply()
            except BaseException as exc:  # the encoding was cancelled: closing
                change.done.set_exception(exc)
                continue
            if isinstance(result, asyncio.Future):
                result.add_done_callback(partial(_copy_outcome, change.done))
            else:
                change.done.set_result(result)

    def _write_now(
        self, offset: int, data: memoryview, fua: bool, encoded: Encoded | None = None
    ) -> Outcome:
        length = len(data)
        if length == PAGE_SIZE and not offset & _MASK:
            # One whole page (swap, 4 KiB random I/O): the common case.
            return self._after([self.store.store(offset >> PAGE_SHIFT, data)], offset, length, fua)
        store = self.store.store
        patch = self.store.patch
        waits: list[asyncio.Future[None]] = []
        pos = 0
        while pos < length:
            at = offset + pos
            pgno = at >> PAGE_SHIFT
            start = at & _MASK
            if not start and length - pos >= 2 * PAGE_SIZE:
                # A run of whole pages: the store takes it in one call.
                end = pos + ((length - pos) & ~_MASK)
                waits.extend(self.store.store_run(pgno, data[pos:end], encoded))
                pos = end
                continue
            n = min(PAGE_SIZE - start, length - pos)
            if n == PAGE_SIZE:
                r = store(pgno, data[pos : pos + PAGE_SIZE])
            else:
                r = patch(pgno, start, data[pos : pos + n])
            if r is not None:
                waits.append(r)
            pos += n
        return self._after(waits, offset, length, fua)

    def _after(self, parts: Sequence[object], offset: int, length: int, fua: bool) -> Outcome:
        """None if no part is a future and there is no FUA; else a future that
        waits for the parts, then makes the range durable (`_settle`)."""
        waits = [x for x in parts if isinstance(x, asyncio.Future)]
        if waits or fua:
            return asyncio.ensure_future(self._settle(waits, offset, length, fua))
        return None

    async def _settle(
        self, waits: Sequence[asyncio.Future[None]], offset: int, length: int, fua: bool
    ) -> None:
        """Wait for queued pages, then make a FUA write durable."""
        # Wait for every page (each one's error retrieved), then fail with the first.
        for result in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
        if fua:
            first = offset >> PAGE_SHIFT
            sync = self.store.sync_pages(first, ((offset + length + _MASK) >> PAGE_SHIFT) - first)
            if sync is not None:
                await sync

    def trim(self, offset: int, length: int, fua: bool = False) -> Outcome:
        """Discard the whole pages inside the range; partial pages stay."""
        if self._changes:
            return self._queue(lambda: self._trim_now(offset, length, fua))
        return self._trim_now(offset, length, fua)

    def _trim_now(self, offset: int, length: int, fua: bool) -> Outcome:
        first = (offset + _MASK) >> PAGE_SHIFT
        end = (offset + length) >> PAGE_SHIFT
        if end <= first:
            return None
        return self._after([self.store.discard(first, end - first)], offset, length, fua)

    def write_zeroes(self, offset: int, length: int, no_hole: bool, fua: bool = False) -> Outcome:
        """Make the range read as zeroes; whole pages become ZERO pages."""
        if self._changes:
            return self._queue(lambda: self._write_zeroes_now(offset, length, no_hole, fua))
        return self._write_zeroes_now(offset, length, no_hole, fua)

    def _write_zeroes_now(self, offset: int, length: int, no_hole: bool, fua: bool) -> Outcome:
        if length == 0:
            return None
        end = offset + length
        first_full = (offset + _MASK) >> PAGE_SHIFT
        end_full = end >> PAGE_SHIFT
        if first_full >= end_full:  # within one or two partial pages
            return self._write_now(offset, memoryview(bytes(length)), fua)
        parts: list[Outcome] = []
        if offset & _MASK:
            parts.append(
                self._write_now(
                    offset, memoryview(ZERO_PAGE)[: (first_full << PAGE_SHIFT) - offset], False
                )
            )
        if no_hole:
            zero = self.store.zero
            for pgno in range(first_full, end_full):
                r = zero(pgno, True)
                if r is not None:
                    parts.append(r)
        else:  # a hole reads as zeroes: the same as a trim
            parts.append(self.store.discard(first_full, end_full - first_full))
        if end & _MASK:
            parts.append(
                self._write_now(end_full << PAGE_SHIFT, memoryview(ZERO_PAGE)[: end & _MASK], False)
            )
        return self._after(parts, offset, length, fua)

    def flush(self) -> Outcome:
        """Make every completed write durable (only offered by durable stores)."""
        return self.store.flush()

    def cache(self, offset: int, length: int) -> Outcome:
        return None

    def block_status(self, offset: int, length: int, req_one: bool) -> Extents:
        """`base:allocation` extents in bytes, starting at `offset`.

        Extents never run past the request, so each fits the 32-bit length
        field; the store may answer for less than the whole range.  With
        REQ_ONE there is exactly one.
        """
        end = offset + length
        first = offset >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        out: Extents = []
        pos = offset
        for pages, flags in self.store.extents(first, last - first + 1):
            first += pages
            run_end = min(first << PAGE_SHIFT, end)
            out.append((run_end - pos, flags))
            pos = run_end
            if req_one or len(out) == MAX_EXTENTS:
                break
        return out
