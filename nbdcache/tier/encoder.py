"""Encoding runs of pages on a thread of their own, answered on the event loop.

Compressing a 128 KiB write takes the event loop longer than everything
else it does for that request.  `RunEncoder` hands such runs to the C
module's `Encoder`, whose thread runs the same loop as `RamTier.store_pages`
without ever taking the GIL, so the event loop goes on parsing and answering
meanwhile; the thread signals an eventfd, and the loop turns finished runs
into resolved futures.  (A Python thread pool was measured slower than
compressing inline on two cores: every hand-back waits for the GIL.)

What to do with a finished run, and in which order, is the caller's
business (`nbdcache.device`).
"""

from __future__ import annotations

import asyncio
from array import array

from nbdcache.tier import PAGE_SIZE
from nbdcache.tier.codec import Encoded, native


class RunEncoder:
    """One encoding thread serving one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        if native is None:
            raise RuntimeError("encoding runs off the loop needs nbdcache.tier._pages")
        self.loop = loop
        self._encoder = native.Encoder()
        self._pending: dict[int, tuple[asyncio.Future[Encoded], Encoded]] = {}
        self._next_id = 0
        loop.add_reader(self._encoder.fd, self._collect)

    def encode(self, data: bytes, threshold: int) -> asyncio.Future[Encoded]:
        """Encode the whole pages of `data` (which must not change meanwhile)."""
        count = len(data) // PAGE_SIZE
        encoded: Encoded = (
            bytearray(count * PAGE_SIZE),
            array("i", bytes(4 * count)),
            array("Q", bytes(8 * count)),
        )
        self._next_id += 1
        fut: asyncio.Future[Encoded] = self.loop.create_future()
        self._encoder.submit(self._next_id, data, threshold, *encoded)
        self._pending[self._next_id] = (fut, encoded)
        return fut

    def _collect(self) -> None:
        for run_id in self._encoder.collect():
            fut, encoded = self._pending.pop(run_id)
            if not fut.done():
                fut.set_result(encoded)

    def close(self) -> None:
        """Stop the thread; runs not yet collected fail with CancelledError."""
        self.loop.remove_reader(self._encoder.fd)
        self._encoder.close()
        for fut, _ in self._pending.values():
            fut.cancel()
        self._pending.clear()
