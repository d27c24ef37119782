"""Block-device semantics over a page store.

The device owns the mapping from NBD byte ranges to 4 KiB pages: reads
gather pages, unaligned writes and zeroing do read-modify-write of the edge
pages, TRIM frees only the whole pages it covers (the spec lets a server
round a trim inwards), WRITE_ZEROES makes whole pages ZERO (a hole unless
NO_HOLE asks to keep them allocated), and BLOCK_STATUS turns the store's
page runs into `base:allocation` extents in bytes.  Bounds, flags and
permissions are checked before a request gets here (`protocol.check_request`).
"""

from __future__ import annotations

from nbdcache.tier import PAGE_SHIFT, PAGE_SIZE, ZERO_PAGE, PageStore

_MASK = PAGE_SIZE - 1


class Device:
    """One export's content: a size and the page store behind it."""

    def __init__(self, store: PageStore, size: int) -> None:
        if size % PAGE_SIZE or size <= 0:
            raise ValueError("device size must be a positive multiple of 4096")
        if store.page_count != size >> PAGE_SHIFT:
            raise ValueError("page store does not match the device size")
        self.store = store
        self.size = size

    def read(self, offset: int, length: int) -> list[bytes | memoryview]:
        """The bytes of [offset, offset+length) as a list of buffers."""
        if length == 0:
            return []
        load = self.store.load
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        if first == last:
            page = load(first)
            start = offset & _MASK
            if start == 0 and length == PAGE_SIZE:
                return [page]
            return [memoryview(page)[start : start + length]]
        out: list[bytes | memoryview] = [load(p) for p in range(first, last + 1)]
        head = offset & _MASK
        if head:
            out[0] = memoryview(out[0])[head:]
        tail = (offset + length) & _MASK
        if tail:
            out[-1] = memoryview(out[-1])[:tail]
        return out

    def write(self, offset: int, data: memoryview) -> None:
        """Write `data` at `offset`; partial pages by read-modify-write."""
        length = len(data)
        pos = 0
        store = self.store.store
        while pos < length:
            at = offset + pos
            pgno = at >> PAGE_SHIFT
            start = at & _MASK
            n = min(PAGE_SIZE - start, length - pos)
            if n == PAGE_SIZE:
                store(pgno, data[pos : pos + PAGE_SIZE])
            else:
                page = bytearray(self.store.load(pgno))
                page[start : start + n] = data[pos : pos + n]
                store(pgno, memoryview(page))
            pos += n

    def trim(self, offset: int, length: int) -> None:
        """Discard the whole pages inside the range; partial pages stay."""
        first = (offset + _MASK) >> PAGE_SHIFT
        end = (offset + length) >> PAGE_SHIFT
        discard = self.store.discard
        for pgno in range(first, end):
            discard(pgno)

    def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        """Make the range read as zeroes; whole pages become ZERO pages."""
        if length == 0:
            return
        end = offset + length
        first_full = (offset + _MASK) >> PAGE_SHIFT
        end_full = end >> PAGE_SHIFT
        if first_full >= end_full:  # within one or two partial pages
            self._zero_partial(offset, end)
            return
        if offset & _MASK:
            self._zero_partial(offset, first_full << PAGE_SHIFT)
        zero = self.store.zero
        for pgno in range(first_full, end_full):
            zero(pgno, no_hole)
        if end & _MASK:
            self._zero_partial(end_full << PAGE_SHIFT, end)

    def _zero_partial(self, start: int, end: int) -> None:
        while start < end:
            n = min(PAGE_SIZE - (start & _MASK), end - start)
            self.write(start, memoryview(ZERO_PAGE)[:n])
            start += n

    def block_status(self, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        """`base:allocation` extents in bytes, starting at `offset`.

        Extents never run past the request, so each fits the 32-bit length
        field; the store may answer for less than the whole range.  With
        REQ_ONE there is exactly one.
        """
        end = offset + length
        first = offset >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        out: list[tuple[int, int]] = []
        pos = offset
        for pages, flags in self.store.extents(first, last - first + 1):
            first += pages
            run_end = min(first << PAGE_SHIFT, end)
            out.append((run_end - pos, flags))
            pos = run_end
            if req_one:
                break
        return out
