"""The RAM tier in front of a real backing image, with writeback racing
the client: a tiny arena, a device 16x larger, random delays in the I/O
pool, and a plain bytearray as the model."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcache.backing import BackingImage
from nbdcache.device import OFFLOAD_PAGES, Device
from nbdcache.tier import DISK, RAM, NoSpace, StoreIOError
from nbdcache.tier import ram as ram_module
from nbdcache.tier import writeback as writeback_module
from nbdcache.tier.arena import HANDLE_SPLIT
from nbdcache.tier.encoder import RunEncoder
from nbdcache.tier.ram import RamTier
from nbdcache.tier.writeback import IMG_CLEAN, IMG_DIRTY, WritebackPolicy, WritebackStore

FRAMES = 32
PAGES = FRAMES * 16
SIZE = PAGES * 4096


class DelayedImage(BackingImage):
    """A real image whose pool threads sleep a random moment before each I/O,
    so completions land in every order; `gate` can hold writes back."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    def _delay(self) -> None:
        with self.lock:
            d = self.rng.random() * 0.002
        time.sleep(d)

    def read(self, offset: int, length: int) -> bytes:
        self._delay()
        return super().read(offset, length)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        # Half the reads the page cache could answer at once go to the pool
        # anyway, so read-fills in flight race everything else too.
        with self.lock:
            pool = self.rng.random() < 0.5
        return None if pool else super().read_nowait(offset, length)

    def write(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        self.gate.wait(10)
        self._delay()
        super().write(offset, buffers)

    def punch(self, offset: int, length: int) -> None:
        self._delay()
        super().punch(offset, length)


def page(seed: int, compressible: bool = True) -> bytes:
    """A page of text-like (compressible) or random content."""
    rng = random.Random(seed)
    if compressible:
        words = [b"swap", b"page", b"memory", b"kernel", b"zcache", b"%d" % seed]
        out = b" ".join(rng.choice(words) for _ in range(900))
        return (out * 2)[:4096]
    return rng.randbytes(4096)


def make(
    tmp: Path,
    allocator: str,
    mode: str,
    durable: bool,
    seed: int,
    frames: int = FRAMES,
    cutoff: int = 0,
) -> WritebackStore:
    image = DelayedImage(tmp / "img", SIZE, volatile=not durable, io_threads=3, seed=seed)
    ram = RamTier(PAGES, frames * 4096, allocator=allocator, overcommit=False)
    policy = WritebackPolicy(
        high=0.75,
        low=0.5,
        inflight=8,
        batch=4,
        exclusive_gets=mode,
        durable=durable,
        wait_timeout=20,
        sequential_cutoff=cutoff,
    )
    return WritebackStore(ram, image, policy)


async def settle(result: object) -> Any:
    return await result if isinstance(result, asyncio.Future) else result


async def read_all(dev: Device, offset: int, length: int) -> bytes:
    return b"".join(bytes(b) for b in await settle(dev.read(offset, length)))


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "write", "read", "trim", "zero", "flush", "pause"]),
        st.integers(0, PAGES - 4),
        st.integers(1, 3),
        st.integers(0, 1 << 16),
        st.booleans(),
    ),
    min_size=10,
    max_size=60,
)


@pytest.mark.parametrize("mode", ["off", "lazy", "eager"])
@pytest.mark.parametrize("allocator", ["zsmalloc", "zbud", "z3fold"])
@settings(
    max_examples=int(os.environ.get("NBDCACHE_HYPOTHESIS_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, seed=st.integers(0, 1000))
def test_every_read_returns_the_last_write(
    tmp_path_factory: pytest.TempPathFactory,
    allocator: str,
    mode: str,
    ops: list[tuple[str, int, int, int, bool]],
    seed: int,
) -> None:
    tmp = tmp_path_factory.mktemp("wb")
    durable = seed % 2 == 0
    # Runs of two pages or more are encoded on the encoder's thread in 2/3 of
    # the examples; one in four runs the pure-Python loops.
    offload = 2 if seed % 3 else OFFLOAD_PAGES
    pure = seed % 4 == 3
    # In 3/5 of the examples every multi-page write is a sequential stream
    # past the cutoff: under pressure it may bypass the tier.
    cutoff = 2 if seed % 5 < 3 else 0

    async def run() -> None:
        store = make(tmp, allocator, mode, durable, seed, cutoff=cutoff)
        store.adopt_image(preallocated=False)
        dev = Device(store, SIZE, offload_pages=offload)
        model = bytearray(SIZE)
        try:
            # Fill well past the arena so writeback runs from the start, in
            # bursts that fill the arena, so pages are also written through.
            # Every fourth 32-page region stays unwritten: its first writes
            # come later, and wait for their blocks.
            burst = []
            for p in (p for p in range(0, PAGES, 3) if (p >> 5) % 4 != 3):
                data = page(p, compressible=p % 7 != 0)
                burst.append(dev.write(p * 4096, memoryview(data)))
                model[p * 4096 : (p + 1) * 4096] = data
                if len(burst) == 12:
                    for w in burst:
                        await settle(w)
                    burst = []
            for w in burst:
                await settle(w)
            # Consecutive changes are in flight together (overlapping ones
            # too: the store applies changes to one page in order, so the last
            # one issued wins); reads, flushes and pauses wait for them first.
            in_flight: list[object] = []
            for op, first, count, value, flag in ops:
                off, length = first * 4096, count * 4096
                if op == "write":
                    data = b"".join(page(value + i, flag) for i in range(count))
                    # Unaligned now and then: read-modify-write of edge pages.
                    if value % 5 == 0:
                        off, data = off + 100, data[: length - 300]
                    in_flight.append(dev.write(off, memoryview(data)))
                    model[off : off + len(data)] = data
                    continue
                if op == "trim":
                    in_flight.append(dev.trim(off, length))
                    model[off : off + length] = bytes(length)
                    continue
                if op == "zero":
                    in_flight.append(dev.write_zeroes(off, length, no_hole=flag))
                    model[off : off + length] = bytes(length)
                    continue
                for w in in_flight:
                    await settle(w)
                in_flight = []
                if op == "read":
                    assert await read_all(dev, off, length) == model[off : off + length]
                elif op == "flush" and durable:
                    await settle(dev.flush())
                    with open(tmp / "img", "rb") as f:
                        assert f.read() == model, "a flushed image equals the device"
                else:
                    await asyncio.sleep(value / 2e7)
            for w in in_flight:
                await settle(w)
            assert await read_all(dev, 0, SIZE) == model
            # The run really went through the image both ways.
            assert store.pages_written_back > 0 and store.pages_read_from_image > 0
            store.ram.check()
            assert store.ram.arena.frames_used <= FRAMES
        finally:
            dev.close()
            await store.close()
            store.ram.close()

    saved = ram_module.native, writeback_module._REGION_SHIFT
    if pure:
        ram_module.native = None
    # Reservations by 32 pages instead of 2 MiB: first writes keep coming,
    # and runs of them wait for their blocks together.
    writeback_module._REGION_SHIFT = 5
    try:
        asyncio.run(run())
    finally:
        ram_module.native, writeback_module._REGION_SHIFT = saved


@pytest.mark.parametrize("pressure", [True, False], ids=["tier-full", "tier-with-room"])
def test_a_long_sequential_stream_bypasses_a_full_tier(tmp_path: Path, pressure: bool) -> None:
    """Multi-page writes of a sequential stream past the cutoff, with the
    arena past its low watermark, go straight to the image: readable while in
    flight, on the image once landed, no RAM copy kept.  With room in the
    tier the stream is stored in RAM as any write.  (Pages rewritten while
    in flight: the property test, whose multi-page writes may bypass in 3/5
    of the examples.)"""

    async def run() -> None:
        frames = FRAMES if pressure else 4 * FRAMES  # (room for the stream too)
        store = make(tmp_path, "zsmalloc", "off", False, seed=1, frames=frames, cutoff=8)
        store.adopt_image(preallocated=True)
        image = store.image
        assert isinstance(image, DelayedImage)
        dev = Device(store, SIZE)  # (4-page writes reach the store at once)
        if pressure:
            for p in range(0, 300, 2):  # far past the arena: writeback keeps it full
                await settle(dev.write(p * 4096, memoryview(page(p))))
            assert store.ram.arena.frames_used >= store._low
        stream = [b"".join(page(1000 + 4 * k + i) for i in range(4)) for k in range(10)]
        sent = b"".join(stream)
        await settle(dev.write(320 * 4096, memoryview(stream[0])))  # starts the stream
        image.gate.clear()  # hold the image writes: the next two stay in flight
        writes = [dev.write((320 + 4 * k) * 4096, memoryview(stream[k])) for k in (1, 2)]
        if pressure:  # past the cutoff: straight to the image, readable from memory
            assert sorted(store.through) == list(range(324, 332))
            assert store.pages_bypassed == 8
        assert await read_all(dev, 324 * 4096, 8 * 4096) == sent[4 * 4096 : 12 * 4096]
        image.gate.set()
        for w in writes:
            await settle(w)
        for k in range(3, 10):
            await settle(dev.write((320 + 4 * k) * 4096, memoryview(stream[k])))
        want = sent
        others = range(324, 360)
        if pressure:
            # The rest bypassed too while the arena stayed past its low
            # watermark (writeback may take it below for a moment).
            bypassed = [p for p in others if store.ram.state(p) == DISK]
            assert len(bypassed) >= 8 and store.pages_bypassed >= len(bypassed)
            on_image = BackingImage.read(image, 320 * 4096, 40 * 4096)  # (no delay)
            for p in bypassed:
                at = (p - 320) * 4096
                assert on_image[at : at + 4096] == want[at : at + 4096], p
        else:
            assert store.pages_bypassed == 0
            assert all(store.ram.state(p) == RAM for p in others)
        assert await read_all(dev, 320 * 4096, 40 * 4096) == want
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_pipelined_stream_writes_are_not_encoded_for_a_tier_they_bypass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes of a stream in flight together arrive before the ones ahead
    of them reach the store: each is still known for a stream write as it
    arrives, so none is handed to the encoder thread and then bypassed.  A
    request larger than the write-through bound bypasses on its own."""
    encoded: list[int] = []
    real_encode = RunEncoder.encode

    def counted(self: RunEncoder, data: bytes, threshold: int) -> Any:
        encoded.append(len(data))
        return real_encode(self, data, threshold)

    monkeypatch.setattr(RunEncoder, "encode", counted)

    async def run() -> None:
        store = make(tmp_path, "zsmalloc", "off", False, seed=2, cutoff=8)
        store.adopt_image(preallocated=True)
        dev = Device(store, SIZE, offload_pages=2)
        for p in range(0, 300, 2):  # far past the arena: writeback keeps it full
            await settle(dev.write(p * 4096, memoryview(page(p))))
        data = [b"".join(page(2000 + 2 * k + i) for i in range(2)) for k in range(40)]
        await settle(dev.write(300 * 4096, memoryview(b"".join(data[:4]))))  # the stream
        encoded.clear()
        writes = [dev.write((300 + 2 * k) * 4096, memoryview(data[k])) for k in range(4, 8)]
        for w in writes:
            await settle(w)
        assert store.pages_bypassed == 16 and not encoded  # (the first 8 bypassed too)
        big = b"".join(page(3000 + i) for i in range(12))  # more than `inflight` (8)
        await settle(dev.write(316 * 4096, memoryview(big)))
        assert store.pages_bypassed == 28 and not encoded
        assert await read_all(dev, 308 * 4096, 20 * 4096) == b"".join(data[4:8]) + big
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_a_page_rewritten_during_its_writeback_keeps_the_new_data(tmp_path: Path) -> None:
    async def run() -> None:
        store = make(tmp_path, "zbud", "off", False, 1)
        store.adopt_image(preallocated=True)
        image = store.image
        assert isinstance(image, DelayedImage)
        image.gate.clear()  # hold every image write
        for p in range(PAGES // 2):
            await settle(store.store(p, page(p)))
            if store.busy:
                break
        victim = next(iter(store.busy))
        assert store.ram.state(victim) == RAM  # stays readable while in flight
        # More rewrites than a 16-bit generation counter could tell apart.
        seven = [page(i) for i in range(7)]
        for i in range(70_000):
            assert store.store(victim, seven[i % 7]) is None
        new = page(10**6)
        assert store.store(victim, new) is None
        image.gate.set()
        while store.busy:
            await asyncio.sleep(0.01)
        assert bytes(await settle(store.load(victim))) == new
        assert store.img[victim] == IMG_DIRTY  # the old copy did not make it clean
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_a_late_read_fill_does_not_clobber_a_newer_write(tmp_path: Path) -> None:
    async def run() -> None:
        store = make(tmp_path, "zsmalloc", "off", True, 2)
        store.adopt_image(preallocated=True)
        old, new = page(1), page(2)
        await settle(store.store(5, old))
        await store.flush()
        store.ram.release(5)  # as eviction would: only on disk now
        assert store.ram.state(5) == DISK
        store.image.can_nowait = False  # as if the page cache had dropped it
        fill = store.load(5)
        assert isinstance(fill, asyncio.Future)
        assert store.store(5, new) is None  # arrives while the fill is in flight
        assert bytes(await fill) == old  # the read was issued before the write
        assert bytes(await settle(store.load(5))) == new
        assert store.pages_promoted == 0
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_a_full_tier_writes_whole_pages_through_and_partial_ones_wait(tmp_path: Path) -> None:
    async def run() -> None:
        store = make(tmp_path, "zbud", "off", False, 3)
        store.adopt_image(preallocated=True)
        dev = Device(store, SIZE)
        # A burst of compressible pages, far more than the arena holds.
        n = FRAMES * 12
        writes = [dev.write(p * 4096, memoryview(page(p))) for p in range(n)]
        assert any(isinstance(w, asyncio.Future) for w in writes)
        for w in writes:
            await settle(w)
        assert store.pages_written_through > 0 and store.pages_written_back > 0
        with open(tmp_path / "img", "rb") as f:
            image = f.read()
        through = [p for p in range(n) if store.ram.state(p) == DISK]
        assert through
        for p in through:
            assert image[p * 4096 : (p + 1) * 4096] == page(p)
        # Partial pages need their old content: with the arena full they wait.
        writes = [dev.write(p * 4096 + 10, memoryview(b"patch")) for p in range(n)]
        for w in writes:
            await settle(w)
        assert store.writes_waited > 0
        for p in range(n):
            want = bytearray(page(p))
            want[10:15] = b"patch"
            assert await read_all(dev, p * 4096, 4096) == want
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_incompressible_pages_go_straight_to_the_image(tmp_path: Path) -> None:
    async def run() -> None:
        store = make(tmp_path, "zsmalloc", "off", False, 5)
        store.adopt_image(preallocated=True)
        dev = Device(store, SIZE)
        for p in range(4):  # the tier is nearly empty: no room is needed
            await settle(dev.write(p * 4096, memoryview(page(p, False))))
            assert store.ram.state(p) == DISK
        assert store.pages_written_through == 4 and store.ram.huge_pages == 0
        assert store.ram.arena.frames_used == 0
        with open(tmp_path / "img", "rb") as f:
            assert f.read(4 * 4096) == b"".join(page(p, False) for p in range(4))
        for p in range(4):
            assert await read_all(dev, p * 4096, 4096) == page(p, False)
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_a_page_written_through_reads_new_and_keeps_a_newer_rewrite(tmp_path: Path) -> None:
    async def run() -> None:
        store = make(tmp_path, "zbud", "off", False, 4)
        store.adopt_image(preallocated=True)
        dev = Device(store, SIZE)
        for p in range(FRAMES * 3):
            await settle(dev.write(p * 4096, memoryview(page(p, False))))
        image = store.image
        assert isinstance(image, DelayedImage)
        image.gate.clear()  # hold every image write: write-throughs stay in flight
        store.full = True
        victim = next(p for p in range(FRAMES * 3) if store.ram.state(p) == DISK)
        new = page(10**6, False)
        first = store.store(victim, new)
        assert isinstance(first, asyncio.Future) and victim in store.through
        await asyncio.sleep(0.01)  # the write is issued and blocked
        assert bytes(await settle(store.load(victim))) == new  # not the image's old copy
        # A patch needs the page's newest content: the one still in flight.
        patched = store.patch(victim, 0, b"newer")
        want = b"newer" + new[5:]
        image.gate.set()
        await first
        await settle(patched)
        assert bytes(await settle(store.load(victim))) == want  # not undone by the landing
        image.gate.clear()
        newest = page(10**7, False)
        store.full = True
        second = store.store(victim, newest)
        assert isinstance(second, asyncio.Future) and victim in store.through
        rewrite = store.store(victim, page(10**8, False))  # while that is in flight
        image.gate.set()
        await second
        await settle(rewrite)
        assert bytes(await settle(store.load(victim))) == page(10**8, False)
        await store.close()
        store.ram.close()

    asyncio.run(run())


@pytest.mark.parametrize("per_write", [1, 16])
def test_first_write_to_a_full_image_gets_enospc_and_old_data_stays(
    tmp_path: Path, per_write: int
) -> None:
    """A small real file system: only first writes to holes may fail.

    Writes of `per_write` pages; a run of 16 is encoded on the encoder's thread
    and waits for its blocks as one write, which fails whole."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs -o size=256k tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:

        async def run() -> None:
            image = BackingImage(mnt / "img", SIZE, volatile=True)
            ram = RamTier(PAGES, FRAMES * 4096, allocator="zbud", overcommit=False)
            store = WritebackStore(ram, image, WritebackPolicy(high=0.75, low=0.5))
            dev = Device(store, SIZE)
            written: list[int] = []
            error = None
            for first in range(0, PAGES, per_write):
                data = b"".join(page(p, False) for p in range(first, first + per_write))
                try:
                    await settle(dev.write(first * 4096, memoryview(data)))
                    written.extend(range(first, first + per_write))
                except NoSpace as exc:
                    error = exc
                    break
            assert error is not None and 0 < len(written) < PAGES
            failed = range(len(written), len(written) + per_write)
            assert await read_all(dev, failed[0] * 4096, per_write * 4096) == bytes(
                per_write * 4096
            )
            # NO_HOLE on a page that has no blocks is refused, not promised.
            with pytest.raises(NoSpace):
                await settle(dev.write_zeroes((PAGES - 1) * 4096, 4096, no_hole=True))
            for p in written:  # overwrites of allocated pages still succeed
                await settle(dev.write(p * 4096, memoryview(page(p + 1, False))))
            for p in written:
                assert await read_all(dev, p * 4096, 4096) == page(p + 1, False)
            assert store.img[written[0]] in (IMG_CLEAN, IMG_DIRTY)
            dev.close()
            await store.close()
            ram.close()

        asyncio.run(run())
    finally:
        os.system(f"umount -l {mnt}")


@pytest.mark.parametrize("offload", [4, OFFLOAD_PAGES])
def test_a_run_that_finds_the_tier_full_is_stored_page_by_page(
    tmp_path: Path, offload: int
) -> None:
    """First writes wait for their blocks as one run; when the run's turn
    comes the arena has room for only part of it, and the rest is queued
    again page by page (written through or waiting for writeback)."""

    async def run() -> None:
        store = make(tmp_path, "zbud", "off", False, 3, frames=8)
        store.adopt_image(preallocated=False)
        dev = Device(store, SIZE, offload_pages=offload)
        model = bytearray(SIZE)
        try:
            writes = []
            for first in range(0, 96, 32):  # three runs of 32 pages, all in flight
                data = b"".join(page(p + 1000 * first) for p in range(first, first + 32))
                writes.append(dev.write(first * 4096, memoryview(data)))
                model[first * 4096 : (first + 32) * 4096] = data
            for w in writes:
                await settle(w)
            assert store.writes_waited >= 96  # each run waited for its blocks
            assert store.pages_written_back + store.pages_written_through > 0
            assert await read_all(dev, 0, 96 * 4096) == model[: 96 * 4096]
            store.ram.check()
        finally:
            dev.close()
            await store.close()
            store.ram.close()

    asyncio.run(run())


@pytest.mark.parametrize("allocator", ["zsmalloc", "z3fold", "zbud"])
def test_a_64_gib_device_with_writeback_costs_at_most_16_bytes_a_page(
    tmp_path: Path, allocator: str
) -> None:
    size = 64 << 30
    pages = size >> 12
    image = BackingImage(tmp_path / "img", size, volatile=True)  # sparse: costs nothing
    ram = RamTier(pages, 64 << 20, allocator=allocator, overcommit=False)
    store = WritebackStore(ram, image, WritebackPolicy())
    try:
        measured = store.page_metadata_bytes
        assert measured >= pages * 10  # the arrays really are per page
        assert measured <= pages * 16, measured / pages
    finally:
        image.close()
        ram.close()


class FailingImage(DelayedImage):
    """Image writes and syncs that fail on demand, like a dying disk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_writes = 0
        self.fail_syncs = 0
        self.fail_after_transfer = False  # the data reaches the file, then EIO

    def write(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        with self.lock:
            fail = self.fail_writes > 0
            self.fail_writes -= fail
        if fail and self.fail_after_transfer:
            super().write(offset, buffers)
        if fail:
            raise OSError(5, "Input/output error")
        super().write(offset, buffers)

    def sync(self) -> None:
        with self.lock:
            fail = self.fail_syncs > 0
            self.fail_syncs -= fail
        if fail:
            raise OSError(5, "Input/output error")
        super().sync()


def failing(tmp: Path, durable: bool, **policy: Any) -> WritebackStore:
    image = FailingImage(tmp / "img", SIZE, volatile=not durable, io_threads=2)
    ram = RamTier(PAGES, FRAMES * 4096, allocator="zbud", overcommit=False)
    options = {"high": 0.75, "low": 0.5, "inflight": 8, "batch": 4, "durable": durable}
    store = WritebackStore(ram, image, WritebackPolicy(**{**options, **policy}))
    store.adopt_image(preallocated=True)
    return store


def test_failed_writeback_keeps_pages_dirty_and_retries(tmp_path: Path) -> None:
    async def run() -> None:
        store = failing(tmp_path, durable=False)
        image = store.image
        assert isinstance(image, FailingImage)
        image.fail_writes = 3
        dev = Device(store, SIZE)
        for p in range(FRAMES * 12):  # several times the arena: writeback must succeed
            await settle(dev.write(p * 4096, memoryview(page(p))))
        assert store.writeback_errors >= 1 and store.pages_written_back > 0
        for p in range(FRAMES * 12):
            assert await read_all(dev, p * 4096, 4096) == page(p)
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_a_page_that_cannot_be_written_back_does_not_hold_up_the_others(
    tmp_path: Path,
) -> None:
    """Random writes' pages are written back in groups of short runs, one
    job each; one bad offset in the image fails its run only.  That page
    stays dirty in RAM and readable; its neighbours in the group land, so
    writeback keeps making room and no write waits until it fails."""
    bad = 5

    class BadSector(BackingImage):
        def write(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
            if offset <= bad * 4096 < offset + sum(len(b) for b in buffers):
                raise OSError(5, "Input/output error")
            super().write(offset, buffers)

    async def run() -> None:
        image = BadSector(tmp_path / "img", SIZE, volatile=True, io_threads=2)
        ram = RamTier(PAGES, FRAMES * 4096, allocator="zsmalloc", overcommit=False)
        policy = WritebackPolicy(high=0.75, low=0.5, inflight=64, batch=64, wait_timeout=2)
        store = WritebackStore(ram, image, policy)
        store.adopt_image(preallocated=True)
        dev = Device(store, SIZE)
        order = list(range(PAGES))
        random.Random(1).shuffle(order)
        order.remove(bad)
        order.insert(0, bad)  # the coldest page: in every round's first group
        for p in order[:200]:
            await settle(dev.write(p * 4096, memoryview(page(p))))  # none fails
        assert store.writeback_errors > 0 and store.pages_written_back > 100
        assert ram.state(bad) == RAM and store.img[bad] == IMG_DIRTY
        for p in order[:200]:
            assert await read_all(dev, p * 4096, 4096) == page(p)
        await store.close()
        ram.close()

    asyncio.run(run())


@pytest.mark.parametrize("after", [False, True], ids=["before-transfer", "after-transfer"])
def test_a_failed_write_through_is_retried_and_loses_nothing(tmp_path: Path, after: bool) -> None:
    async def run() -> None:
        store = failing(tmp_path, durable=True)
        image = store.image
        assert isinstance(image, FailingImage)
        image.fail_after_transfer = after
        dev = Device(store, SIZE)
        for p in range(FRAMES * 3):
            await settle(dev.write(p * 4096, memoryview(page(p, False))))
        # Allocated zeroes, same-filled and RAM pages among the victims too.
        await settle(dev.write_zeroes(0, 4096, no_hole=True))
        await settle(dev.write(4096, memoryview(b"\x5a" * 4096)))
        await settle(dev.flush())
        store.full = True
        image.fail_writes = 1
        writes = [dev.write(p * 4096, memoryview(page(p + 500, False))) for p in range(8)]
        for w in writes:
            await settle(w)  # none fails: the failed write-through was retried
        assert store.writeback_errors >= 1
        for p in range(FRAMES * 3):
            want = page(p + 500 if p < 8 else p, False)
            assert await read_all(dev, p * 4096, 4096) == want
        await settle(dev.flush())
        with open(tmp_path / "img", "rb") as f:
            assert f.read(8 * 4096) == b"".join(page(p + 500, False) for p in range(8))
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_a_page_in_the_page_cache_is_read_at_once(tmp_path: Path) -> None:
    async def run() -> None:
        store = failing(tmp_path, durable=True)
        image = store.image
        assert isinstance(image, FailingImage)
        image.rng.random = lambda: 1.0  # type: ignore[method-assign]  # never the pool
        dev = Device(store, SIZE)
        await settle(dev.write(7 * 4096, memoryview(page(7))))
        await settle(dev.flush())
        store.ram.release(7)  # only in the image, which was just written: cached
        got = store.load(7)
        assert not isinstance(got, asyncio.Future) and bytes(got) == page(7)
        assert store.pages_read_from_image == 1
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_a_write_waiting_too_long_for_room_gets_eio_and_nothing_is_lost(tmp_path: Path) -> None:
    async def run() -> None:
        store = failing(tmp_path, durable=False, wait_timeout=0.3)
        image = store.image
        assert isinstance(image, FailingImage)
        image.gate.clear()  # the disk stalls: nothing can be written back
        dev = Device(store, SIZE)
        stored: list[int] = []
        error = None
        for p in range(FRAMES * 2):
            try:
                await settle(dev.write(p * 4096, memoryview(page(p, False))))
                stored.append(p)
            except StoreIOError as exc:
                error = exc
                break
        # It waited for room, or its write-through was not taken in time.
        assert error is not None and ("no room" in str(error) or "did not take" in str(error))
        image.gate.set()
        for p in stored:
            assert await read_all(dev, p * 4096, 4096) == page(p, False)
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_after_a_failed_fdatasync_every_flush_fails(tmp_path: Path) -> None:
    async def run() -> None:
        store = failing(tmp_path, durable=True)
        image = store.image
        assert isinstance(image, FailingImage)
        await settle(store.store(1, page(1)))
        image.fail_syncs = 1
        with pytest.raises(StoreIOError):
            await store.flush()
        await settle(store.store(2, page(2)))
        with pytest.raises(StoreIOError, match="earlier fdatasync failed"):
            await store.flush()  # the lost writes must not be acknowledged later
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_exclusive_gets_modes(tmp_path: Path) -> None:
    async def run(mode: str) -> WritebackStore:
        store = make(tmp_path / mode, "zsmalloc", mode, False, 4, frames=PAGES)
        store.adopt_image(preallocated=True)
        for p in range(8):
            await settle(store.store(p, page(p)))
        assert bytes(await settle(store.load(6))) == page(6)
        while store.busy:
            await asyncio.sleep(0.01)
        return store

    for mode in ("off", "lazy", "eager"):
        (tmp_path / mode).mkdir()
        store = asyncio.run(run(mode))
        coldest = store.ram.coldest_pages(1)
        if mode == "lazy":
            assert coldest == [6]  # read from RAM: first to be written back
        else:
            assert coldest == [0]
        if mode == "eager":
            assert store.ram.state(6) == DISK and store.exclusive_releases == 1
            assert store.img[6] == IMG_CLEAN
        else:
            assert store.ram.state(6) == RAM and store.exclusive_releases == 0
        store.image.close()
        store.ram.close()


def test_pages_read_from_the_image_are_promoted_only_with_exclusive_gets_off(
    tmp_path: Path,
) -> None:
    async def run(mode: str) -> int:
        store = make(tmp_path / mode, "zbud", mode, True, 5, frames=PAGES)
        store.adopt_image(preallocated=True)
        await settle(store.store(3, page(3)))
        await store.flush()
        store.ram.release(3)
        assert bytes(await settle(store.load(3))) == page(3)
        promoted = store.pages_promoted
        assert store.ram.state(3) == (RAM if promoted else DISK)
        await store.close()
        store.ram.close()
        return promoted

    for mode in ("off", "lazy", "eager"):
        (tmp_path / mode).mkdir()
        assert asyncio.run(run(mode)) == (1 if mode == "off" else 0)


def test_queued_patches_to_pages_on_disk_read_their_bases_together(tmp_path: Path) -> None:
    """Partial writes to pages on disk queue for their old content; the reads
    start together (one per page), not one after another behind writeback."""

    async def run() -> None:
        store = make(tmp_path, "zbud", "off", False, 5)
        store.adopt_image(preallocated=True)
        dev = Device(store, SIZE)
        model = bytearray(SIZE)
        for p in range(PAGES):
            data = page(p, False)
            await settle(dev.write(p * 4096, memoryview(data)))
            model[p * 4096 : (p + 1) * 4096] = data
        on_disk = [p for p in range(PAGES) if store.ram.state(p) == DISK][:48]
        assert len(on_disk) == 48
        pending = []
        for i, p in enumerate(on_disk):
            for k in range(2):  # the second patch of a page waits behind the first
                off = p * 4096 + 100 + 1000 * k
                data = bytes([(2 * i + k) % 255 + 1]) * 500
                pending.append(dev.write(off, memoryview(data)))
                model[off : off + len(data)] = data
        assert len(store.reads) == len(on_disk)  # every page's base is on its way
        for w in pending:
            await settle(w)
        assert await read_all(dev, 0, SIZE) == model
        store.ram.check()
        await store.close()
        store.ram.close()

    asyncio.run(run())


def test_a_trim_waits_behind_a_queued_write_to_its_page(tmp_path: Path) -> None:
    """A write to a page without image blocks waits for them; a trim of that
    page sent after it must not be undone when the write is stored."""

    async def run() -> None:
        store = make(tmp_path, "zbud", "off", False, 1)
        store.adopt_image(preallocated=False)
        dev = Device(store, SIZE)
        try:
            one = dev.write(244 * 4096, memoryview(page(1)))  # waits for its blocks
            run_ = dev.write(300 * 4096, memoryview(page(2) + page(3)))  # a run waits too
            trims = [dev.trim(244 * 4096, 4096), dev.trim(301 * 4096, 2 * 4096)]
            later = dev.write(302 * 4096, memoryview(page(4)))  # after the trim of 302
            assert isinstance(one, asyncio.Future) and isinstance(run_, asyncio.Future)
            assert all(isinstance(t, asyncio.Future) for t in trims)
            for w in (one, run_, *trims, later):
                await settle(w)
            assert await read_all(dev, 244 * 4096, 4096) == bytes(4096)
            assert await read_all(dev, 300 * 4096, 3 * 4096) == page(2) + bytes(4096) + page(4)
            assert not store.queued
        finally:
            dev.close()
            await store.close()
            store.ram.close()

    asyncio.run(run())


def test_no_base_is_read_for_a_patch_while_its_page_is_written_through(
    tmp_path: Path,
) -> None:
    """A patch queued behind another waits for its turn; its page's newest
    content is a write-through still in flight, not what the image holds."""

    async def run() -> None:
        path = tmp_path / "img"
        path.write_bytes(b"X" * SIZE)
        image = DelayedImage(path, SIZE, volatile=False, io_threads=3, seed=1)
        ram = RamTier(PAGES, 8 * 4096, overcommit=False)
        store = WritebackStore(ram, image, WritebackPolicy(durable=True, wait_timeout=10))
        store.adopt_image(preallocated=True)
        try:
            assert store.ram.state(1) == DISK
            image.gate.clear()  # image writes wait
            store.full = True  # as after a store found the arena full
            new = bytes(range(256)) * 16
            through = store.store(1, new)  # straight to the image
            assert 1 in store.through
            head = store.patch(2, 0, b"q" * 10)  # a DISK page: its base is read
            behind = store.patch(1, 100, b"P" * 10)  # must not read page 1's base
            assert store.reads.get(1) is None
            image.gate.set()
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(f for f in (through, head, behind) if f is not None),
                    return_exceptions=True,
                ),
                15,
            )
            assert results == [None] * len(results)
            want = bytearray(new)
            want[100:110] = b"P" * 10
            got = await settle(store.load(1))
            assert bytes(got) == bytes(want)
        finally:
            await store.close()
            ram.close()

    asyncio.run(run())


def test_a_flush_writes_every_page_to_the_image_split_objects_included(tmp_path: Path) -> None:
    """The image after FLUSH is the device, byte for byte, also for pages
    whose compressed copy runs across two frames (zsmalloc)."""

    async def run() -> None:
        store = make(tmp_path, "zsmalloc", "off", True, 5, frames=64)
        store.adopt_image(preallocated=True)
        rng = random.Random(5)
        ram = store.ram
        written = {}

        def dirty_split() -> bool:
            return any(
                ram.state(p) == RAM and ram._handle[p] & HANDLE_SPLIT and store.img[p] == IMG_DIRTY
                for p in written
            )

        # Write until writeback has run and a split object waits, still dirty.
        for p in rng.sample(range(PAGES), PAGES):
            # Text-like heads of varying length, zero tails: objects of many sizes.
            data = page(p)[: rng.randrange(600, 4096)].ljust(4096, b"\0")
            await settle(store.store(p, data))
            written[p] = data
            if store.pages_written_back and dirty_split():
                break
        assert store.pages_written_back and dirty_split()
        await settle(store.flush())
        with open(tmp_path / "img", "rb") as f:
            image = f.read()
        for p, data in written.items():
            assert image[p * 4096 : (p + 1) * 4096] == data, f"page {p}"
        await store.close()
        store.ram.close()

    asyncio.run(run())
