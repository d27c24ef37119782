"""The benchmark data sets: deterministic, the right size, the promised mix."""

from __future__ import annotations

import sys
from pathlib import Path

import lz4.block

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from pagemix import SWAP_MIX, real_files, swap_mix

from nbdcache.tier import PAGE_SIZE
from nbdcache.tier.codec import filled_word


def pages(data: bytes) -> list[bytes]:
    return [data[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]


def test_swap_mix_is_deterministic_and_seeded() -> None:
    assert swap_mix(300) == swap_mix(300)
    assert swap_mix(300, seed=1) != swap_mix(300)


def test_swap_mix_has_the_promised_shares() -> None:
    n = 1000
    mix = pages(swap_mix(n))
    assert len(mix) == n
    words = [filled_word(p) for p in mix]
    assert words.count(0) == round(n * SWAP_MIX["zero"])
    assert sum(w > 0 for w in words) == round(n * SWAP_MIX["same"])
    raw = sum(
        len(lz4.block.compress(p, store_size=False)) > PAGE_SIZE for p in mix if filled_word(p) < 0
    )
    assert raw == round(n * SWAP_MIX["random"])  # only the random pages do not compress


def test_real_files_gives_whole_pages() -> None:
    data = real_files(9)
    assert len(data) == 9 * PAGE_SIZE
    assert data == real_files(9)
