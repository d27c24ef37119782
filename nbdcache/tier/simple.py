"""The plainest correct page store: uncompressed pages in a dict.

Kept as the reference the compressed tier is checked against, and for
exports that want no compression at all.  Page states live in one bytearray
so that `extents` can scan long runs at C speed.
"""

from __future__ import annotations

import re

from nbdcache.tier import (
    HOLE,
    PAGE_SIZE,
    RAM,
    STATE_HOLE,
    STATE_ZERO,
    ZERO,
    ZERO_PAGE,
)

_FLAGS = {HOLE: STATE_HOLE | STATE_ZERO, ZERO: STATE_ZERO, RAM: 0}


def run_length(states: bytearray, start: int, stop: int) -> int:
    """Length of the run of equal bytes in states[start:stop] from `start`."""
    other = re.compile(b"[^" + re.escape(bytes([states[start]])) + b"]")
    m = other.search(states, start, stop)
    return (m.start() if m else stop) - start


class DictStore:
    """Pages as bytes objects in a dict; holes and zero pages cost nothing."""

    def __init__(self, page_count: int) -> None:
        self._pages: dict[int, bytes] = {}
        self._state = bytearray(page_count)

    @property
    def page_count(self) -> int:
        return len(self._state)

    def load(self, pgno: int) -> bytes:
        return self._pages.get(pgno, ZERO_PAGE)

    def store(self, pgno: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) != PAGE_SIZE:
            raise ValueError("a page is 4096 bytes")
        if data == ZERO_PAGE:
            self.zero(pgno, allocate=True)
            return
        self._pages[pgno] = bytes(data)
        self._state[pgno] = RAM

    def patch(self, pgno: int, start: int, data: bytes | memoryview) -> None:
        page = bytearray(self.load(pgno))
        page[start : start + len(data)] = data
        self.store(pgno, page)

    def discard(self, pgno: int) -> None:
        self._pages.pop(pgno, None)
        self._state[pgno] = HOLE

    def zero(self, pgno: int, allocate: bool) -> None:
        self._pages.pop(pgno, None)
        self._state[pgno] = ZERO if allocate else HOLE

    def flush(self) -> None:
        return None

    def sync_pages(self, first: int, count: int) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return {"pages_stored": len(self._pages), "orig_data_size": len(self._pages) * PAGE_SIZE}

    def extents(self, first: int, count: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        stop = first + count
        while first < stop:
            n = run_length(self._state, first, stop)
            out.append((n, _FLAGS[self._state[first]]))
            first += n
        return out
