"""Density and cost of the RAM tier, per allocator and per data set.

For each data set of `bench/pagemix.py` (the swap-like mix and pages cut
from real files) and each allocator, the pages are stored into an empty
`RamTier` sized for the data set (page i at page number i), then loaded
back and compared.  The table reports:

- ``ideal``: logical bytes / sum of lz4 block sizes, zero and same-filled
  pages free (no allocator beats it without a better compressor);
- ``effect.``: logical bytes / (arena frames touched x 4096 + per-page
  metadata bytes for a device the size of the data set), and ``gap``, how
  far that is below ideal;
- ``all-in``: as effective, also counting the allocator's side tables (list
  links, reverse maps, LRU queue) for the frames touched;
- ``store``/``load``: mean CPU time per page of `RamTier.store` / `load`,
  next to bare ``lz4.block.compress`` / ``decompress`` on the same pages in
  the same round.  Times are the best of ``--repeat`` interleaved rounds;
  the ``x`` columns are the median over rounds of the per-round ratio,
  which is what survives a noisy, shared machine best.  CPU time of the
  thread (``time.thread_time``) is used, so time spent descheduled does not
  count.

Below the table, ``bound`` is the number of frames a best-fit-decreasing
packing of the same objects needs when any number of them may share a frame
(objects never straddle frames, 64-byte chunks): no zbud or z3fold can do
much better, whatever its placement rules.

The arena is *warm*: every frame has been touched once before the timed
stores, as in a server that has been running for a while.  The first touch
of a frame costs a page fault (zeroing and mapping 4 KiB, a few microseconds
in a VM); ``--cold`` measures stores into a never-touched arena instead.

Run::

    python bench/tier_bench.py                 # both sets, 65536 pages each
    python bench/tier_bench.py --pages 16384 --repeat 3
    python bench/tier_bench.py --profile zsmalloc --set real   # cProfile the hot path
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lz4.block

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagemix import real_files, swap_mix

from nbdcache.tier import PAGE_SIZE
from nbdcache.tier.codec import DEFAULT_INCOMPRESSIBLE_THRESHOLD, filled_word
from nbdcache.tier.ram import RamTier

ALLOCATORS = ("zbud", "z3fold", "zsmalloc")
CONFIGS = [(a, "lz4") for a in ALLOCATORS] + [("zsmalloc", "none")]
SETS: dict[str, Callable[[int], bytes]] = {"swap": swap_mix, "real": real_files}


@dataclass
class Row:
    set: str
    allocator: str
    ideal: float
    effective: float
    all_in: float
    frames: int
    store_us: float
    compress_us: float
    store_x: float
    load_us: float
    decompress_us: float
    load_x: float


def split(data: bytes) -> list[bytes]:
    return [data[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]


def compress(page: bytes) -> bytes:
    block: bytes = lz4.block.compress(page, "default", False)  # (source, mode, store_size)
    return block


def ideal_ratio(pages: list[bytes]) -> float:
    stored = sum(len(compress(p)) for p in pages if filled_word(p) < 0)
    return len(pages) * PAGE_SIZE / max(1, stored)


def frame_bound(pages: list[bytes]) -> int:
    """Frames for best-fit-decreasing packing, any number of objects a frame."""
    chunks = []
    for p in pages:
        if filled_word(p) >= 0:
            continue
        size = len(compress(p))
        chunks.append(64 if size > DEFAULT_INCOMPRESSIBLE_THRESHOLD else -(-size // 64))
    free: list[int] = []  # free chunks of open frames, sorted
    frames = 0
    for c in sorted(chunks, reverse=True):
        i = bisect.bisect_left(free, c)
        if i < len(free):
            left = free.pop(i) - c
        else:
            frames += 1
            left = 64 - c
        if left:
            bisect.insort(free, left)
    return frames


def timed(fn: Callable[[], object]) -> float:
    """CPU seconds one call of `fn` takes, with the collector out of the way."""
    gc.collect()
    gc.disable()
    try:
        start = time.thread_time_ns()
        fn()
        return (time.thread_time_ns() - start) / 1e9
    finally:
        gc.enable()


def new_tier(n: int, allocator: str, compressor: str = "lz4", warm: bool = True) -> RamTier:
    # Room for every page raw, plus the reserve: density is measured by the
    # frames actually touched, not by the arena size.
    tier = RamTier(n, (n + n // 32 + 64) * PAGE_SIZE, allocator=allocator, compressor=compressor)
    if warm:
        arena = tier.arena.map
        for offset in range(0, len(arena), PAGE_SIZE):
            arena[offset] = 0
    return tier


def run_set(name: str, pages: list[bytes], repeat: int, warm: bool, verbose: bool) -> list[Row]:
    n = len(pages)
    blocks = [compress(p) for p in pages]
    samples: dict[str, list[float]] = {}
    tiers: dict[str, RamTier] = {}

    def bare_compress() -> None:
        # The same call the codec makes (positional: keyword parsing is measurable).
        lz4_compress = lz4.block.compress
        for p in pages:
            lz4_compress(p, "default", False)

    def bare_decompress() -> None:
        lz4_decompress = lz4.block.decompress
        for b in blocks:
            lz4_decompress(b, PAGE_SIZE)

    for _ in range(repeat):
        samples.setdefault("compress", []).append(timed(bare_compress) / n)
        samples.setdefault("decompress", []).append(timed(bare_decompress) / n)
        for allocator, compressor in CONFIGS:
            key = f"{allocator}/{compressor}"
            old = tiers.pop(key, None)
            if old is not None:
                old.close()
            tier = new_tier(n, allocator, compressor, warm)

            def store_all(store: Callable[[int, bytes], None] = tier.store) -> None:
                for i, p in enumerate(pages):
                    store(i, p)

            def load_all(load: Callable[[int], object] = tier.load) -> None:
                for i in range(n):
                    load(i)

            samples.setdefault(f"{key} store", []).append(timed(store_all) / n)
            samples.setdefault(f"{key} load", []).append(timed(load_all) / n)
            tiers[key] = tier

    def best(key: str) -> float:
        return min(samples[key]) * 1e6

    def ratio(key: str, bare: str) -> float:
        pairs = zip(samples[key], samples[bare], strict=True)
        return statistics.median(t / b for t, b in pairs)

    ideal = ideal_ratio(pages)
    rows = []
    for (allocator, compressor), (key, tier) in zip(CONFIGS, tiers.items(), strict=True):
        for i, p in enumerate(pages):
            if bytes(tier.load(i)) != p:
                raise SystemExit(f"{key}: page {i} of {name} came back different")
        tier.check()
        frames = tier.arena.frames_max
        side_tables = tier.allocator.frame_metadata_bytes / tier.arena.frame_count
        logical = n * PAGE_SIZE
        rows.append(
            Row(
                set=name,
                allocator=allocator if compressor == "lz4" else f"{allocator}+none",
                ideal=ideal,
                effective=logical / (frames * PAGE_SIZE + tier.page_metadata_bytes),
                all_in=logical / (frames * (PAGE_SIZE + side_tables) + tier.page_metadata_bytes),
                frames=frames,
                store_us=best(f"{key} store"),
                compress_us=best("compress"),
                store_x=ratio(f"{key} store", "compress"),
                load_us=best(f"{key} load"),
                decompress_us=best("decompress"),
                load_x=ratio(f"{key} load", "decompress"),
            )
        )
        tier.close()
    if verbose:
        for key, values in samples.items():
            print(
                f"  {name} {key:24} best {min(values) * 1e6:7.2f} us"
                f"  median {statistics.median(values) * 1e6:7.2f} us"
            )
    return rows


def print_table(rows: list[Row], bounds: dict[str, int]) -> None:
    head = (
        f"{'set':5} {'allocator':14} {'ideal':>6} {'effect.':>7} {'gap':>6} {'all-in':>6} "
        f"{'frames':>7} {'store us':>9} {'lz4 us':>7} {'x':>5} {'load us':>8} {'unlz4':>6} {'x':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.set:5} {r.allocator:14} {r.ideal:6.3f} {r.effective:7.3f} "
            f"{1 - r.effective / r.ideal:6.1%} {r.all_in:6.3f} {r.frames:7d} "
            f"{r.store_us:9.2f} {r.compress_us:7.2f} {r.store_x:5.2f} "
            f"{r.load_us:8.2f} {r.decompress_us:6.2f} {r.load_x:5.2f}"
        )
    by = {(r.set, r.allocator): r for r in rows}
    for name, bound in bounds.items():
        zb, z3 = by.get((name, "zbud")), by.get((name, "z3fold"))
        if zb and z3:
            print(
                f"{name}: z3fold is {z3.effective / zb.effective - 1:+.1%} denser than zbud; "
                f"bound {bound} frames (zbud {zb.frames}, z3fold {z3.frames})"
            )


def profile(name: str, pages: list[bytes], allocator: str) -> None:
    tier = new_tier(len(pages), allocator)
    prof = cProfile.Profile()
    prof.enable()
    for i, p in enumerate(pages):
        tier.store(i, p)
    for i in range(len(pages)):
        tier.load(i)
    prof.disable()
    print(f"cProfile: store + load of {len(pages)} {name} pages with {allocator}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=65536)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--set", choices=("swap", "real", "both"), default="both")
    parser.add_argument("--profile", choices=ALLOCATORS, help="cProfile one allocator instead")
    parser.add_argument("--cold", action="store_true", help="store into a never-touched arena")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    names = ["swap", "real"] if args.set == "both" else [args.set]
    rows: list[Row] = []
    bounds: dict[str, int] = {}
    for name in names:
        pages = split(SETS[name](args.pages))
        if args.profile:
            profile(name, pages, args.profile)
            continue
        rows.extend(run_set(name, pages, args.repeat, not args.cold, args.verbose))
        bounds[name] = frame_bound(pages)
    if rows:
        print(f"{args.pages} pages a set, best of {args.repeat} rounds")
        print_table(rows, bounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
