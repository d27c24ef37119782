"""An overwrite whose allocation compacts the arena (zsmalloc) must free the
old copy where compaction moved it, not where it was."""

from __future__ import annotations

import random

import pytest

from nbdcache.tier.arena import ArenaFull
from nbdcache.tier.ram import RamTier


def small(rng: random.Random) -> bytes:
    return (rng.randbytes(150) + bytes(4096))[:4096]


def medium(rng: random.Random) -> bytes:
    return (rng.randbytes(1400) + bytes(4096))[:4096]


@pytest.mark.parametrize("allocator", ["zsmalloc", "zbud", "z3fold"])
def test_overwrite_into_a_full_fragmented_arena(allocator: str) -> None:
    checked = 0
    for victim in range(1, 1344, 22):
        rng = random.Random(1)
        tier = RamTier(4000, 64 * 4096, allocator=allocator, overcommit=False)
        model: dict[int, bytes] = {}
        n = 0
        try:
            while True:
                data = small(rng)
                tier.store(n, data)
                model[n] = data
                n += 1
        except ArenaFull:
            pass
        for pgno in range(0, n, 2):  # fragment every frame
            tier.discard(pgno)
            model[pgno] = bytes(4096)
        if victim < n:
            data = medium(rng)
            try:
                tier.store(victim, data)  # a new size class: allocate, maybe compact
                model[victim] = data
            except ArenaFull:
                pass  # refused: the old content must still be there
            for pgno in range(n, n + 60):
                data = medium(rng)
                try:
                    tier.store(pgno, data)
                except ArenaFull:
                    break
                model[pgno] = data
            assert [p for p, v in model.items() if tier.load(p) != v] == []
            tier.check()
            checked += 1
        tier.close()
    assert checked >= 3
