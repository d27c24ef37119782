"""Byte ranges to pages: the device against a plain bytearray model."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcache.device import Device
from nbdcache.tier import STATE_HOLE, STATE_ZERO, NoSpace, StoreIOError
from nbdcache.tier.codec import native
from nbdcache.tier.ram import RamTier

PAGES = 8
SIZE = PAGES * 4096


def device() -> Device:
    return Device(RamTier(PAGES, 1 << 20), SIZE)


def read(dev: Device, offset: int, length: int) -> bytes:
    return b"".join(bytes(c) for c in dev.read(offset, length))


def test_unaligned_write_reads_back_and_leaves_neighbours() -> None:
    dev = device()
    data = bytes(range(256)) * 40
    dev.write(4000, memoryview(data))
    assert read(dev, 4000, len(data)) == data
    assert read(dev, 0, 4000) == bytes(4000)
    assert read(dev, 4000 + len(data), 100) == bytes(100)


def test_trim_frees_only_whole_pages() -> None:
    dev = device()
    dev.write(0, memoryview(b"\x01" * SIZE))
    dev.trim(100, 3 * 4096)  # covers page 1 and 2 wholly, 0 and 3 partly
    assert dev.block_status(0, SIZE, req_one=False) == [
        (4096, 0),
        (8192, STATE_HOLE | STATE_ZERO),
        (SIZE - 3 * 4096, 0),
    ]
    assert read(dev, 0, 4096) == b"\x01" * 4096
    assert read(dev, 4096, 8192) == bytes(8192)


def test_write_zeroes_with_and_without_no_hole() -> None:
    dev = device()
    dev.write(0, memoryview(b"\x02" * SIZE))
    dev.write_zeroes(4096, 4096, no_hole=False)
    dev.write_zeroes(8192, 4096, no_hole=True)
    dev.write_zeroes(12288 + 10, 20, no_hole=False)
    assert dev.block_status(0, 4 * 4096, req_one=False) == [
        (4096, 0),
        (4096, STATE_HOLE | STATE_ZERO),
        (4096, STATE_ZERO),
        (4096, 0),
    ]
    page3 = read(dev, 12288, 4096)
    assert page3[:10] == b"\x02" * 10 and page3[10:30] == bytes(20) and page3[30:] == b"\x02" * 4066


def test_block_status_is_clipped_to_the_request_and_req_one() -> None:
    dev = device()
    assert dev.block_status(10, 100, req_one=False) == [(100, STATE_HOLE | STATE_ZERO)]
    dev.write(4096, memoryview(b"x" * 4096))
    assert dev.block_status(100, SIZE - 100, req_one=True) == [(3996, STATE_HOLE | STATE_ZERO)]
    assert dev.block_status(4096, 4096 * 3, req_one=False) == [
        (4096, 0),
        (8192, STATE_HOLE | STATE_ZERO),
    ]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["write", "trim", "zero", "zero_nohole"]),
            st.integers(0, SIZE - 1),
            st.integers(1, 3 * 4096),
            st.integers(0, 255),
        ),
        max_size=25,
    )
)
def test_device_matches_a_bytearray_model(ops: list[tuple[str, int, int, int]]) -> None:
    dev = device()
    model = bytearray(SIZE)
    for op, offset, length, byte in ops:
        length = min(length, SIZE - offset)
        if op == "write":
            dev.write(offset, memoryview(bytes([byte]) * length))
            model[offset : offset + length] = bytes([byte]) * length
        elif op == "trim":
            dev.trim(offset, length)
            first = -(-offset // 4096) * 4096
            end = (offset + length) // 4096 * 4096
            if end > first:
                model[first:end] = bytes(end - first)  # trimmed pages read zero here
        else:
            dev.write_zeroes(offset, length, no_hole=op == "zero_nohole")
            model[offset : offset + length] = bytes(length)
        assert read(dev, 0, SIZE) == model
    # Every extent flagged zero really reads as zeroes.
    pos = 0
    for length, flags in dev.block_status(0, SIZE, req_one=False):
        if flags & STATE_ZERO:
            assert model[pos : pos + length] == bytes(length)
        pos += length
    assert pos == SIZE


def test_changes_behind_an_offloaded_write_apply_in_arrival_order() -> None:
    """A large write is encoded off the loop; writes, trims and zeroing sent
    after it wait their turn, so the last change to a page wins."""
    if native is None:
        pytest.skip("nbdcache.tier._pages was not built")

    async def run() -> None:
        pages = 64
        dev = Device(RamTier(pages, 1 << 20), pages * 4096, offload_pages=4)
        model = bytearray(pages * 4096)
        rng = random.Random(5)
        try:
            results = []
            for _ in range(40):
                first = rng.randrange(pages - 8)
                count = rng.randrange(1, 9)
                off, length = first * 4096, count * 4096
                op = rng.choice(["write", "write", "unaligned", "trim", "zero"])
                if op == "write":
                    data = rng.randbytes(256) * (length // 256)
                    results.append(dev.write(off, memoryview(data)))
                elif op == "unaligned":
                    off, data = off + 100, rng.randbytes(length - 300)
                    results.append(dev.write(off, memoryview(data)))
                elif op == "trim":
                    results.append(dev.trim(off, length))
                    data = bytes(length)
                else:
                    results.append(dev.write_zeroes(off, length, no_hole=bool(count % 2)))
                    data = bytes(length)
                model[off : off + len(data)] = data
            assert any(isinstance(r, asyncio.Future) for r in results)
            for r in results:
                if isinstance(r, asyncio.Future):
                    await r
            assert read(dev, 0, pages * 4096) == model
        finally:
            dev.close()

    asyncio.run(run())


def test_a_failed_offloaded_write_fails_alone() -> None:
    """A run the tier has no room for gets its error; what follows still applies."""
    if native is None:
        pytest.skip("nbdcache.tier._pages was not built")

    async def run() -> None:
        pages = 64
        rng = random.Random(1)
        dev = Device(RamTier(pages, 16 * 4096), pages * 4096, offload_pages=4)
        try:
            first = rng.randbytes(4096)
            dev.write(40 * 4096, memoryview(first))
            big = dev.write(0, memoryview(rng.randbytes(32 * 4096)))  # cannot fit
            newer = rng.randbytes(4096)  # an overwrite: it may use the reserve
            after = dev.write(40 * 4096, memoryview(newer))
            assert isinstance(big, asyncio.Future) and isinstance(after, asyncio.Future)
            with pytest.raises(NoSpace):
                await big
            await after
            assert read(dev, 40 * 4096, 4096) == newer
        finally:
            dev.close()

    asyncio.run(run())


def test_closing_fails_the_changes_still_queued() -> None:
    if native is None:
        pytest.skip("nbdcache.tier._pages was not built")

    async def run() -> None:
        dev = Device(RamTier(64, 1 << 20), 64 * 4096, offload_pages=4)
        big = dev.write(0, memoryview(random.Random(2).randbytes(32 * 4096)))
        small = dev.write(40 * 4096, memoryview(b"\x22" * 4096))
        assert isinstance(big, asyncio.Future) and isinstance(small, asyncio.Future)
        dev.close()
        for change in (big, small):
            with pytest.raises(StoreIOError, match="shutting down"):
                await change
        assert read(dev, 40 * 4096, 4096) == bytes(4096)  # never applied
        assert dev.write(0, memoryview(b"\x33" * 64 * 1024)) is None  # encoded inline now

    asyncio.run(run())
