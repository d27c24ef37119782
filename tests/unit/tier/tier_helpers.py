"""Shared settings and page makers for the tier tests.

Hypothesis runs a modest number of examples so the tier tests stay well
under two minutes on a shared two-core machine.  For a long run set
``NBDCACHE_TIER_EXAMPLES`` (examples per property, default 30) and
``NBDCACHE_TIER_STEPS`` (steps per state-machine run, default 40)::

    NBDCACHE_TIER_EXAMPLES=2000 NBDCACHE_TIER_STEPS=200 .venv/bin/pytest tests/unit/tier
"""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, settings

from nbdcache.tier import PAGE_SIZE

EXAMPLES = int(os.environ.get("NBDCACHE_TIER_EXAMPLES", "30"))
STEPS = int(os.environ.get("NBDCACHE_TIER_STEPS", "40"))

#: Settings for every property and state machine of the tier tests.
TIER_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def page_of(kind: str, seed: int, length: int) -> bytes:
    """A deterministic test page.

    ``zero``: all zeroes; ``same``: one 8-byte word repeated; ``data``:
    `length` random bytes then zeroes (lz4 output a little over `length`,
    so `length` steers which size class or chunk count it lands in);
    ``random``: incompressible.
    """
    rng = random.Random(seed)
    if kind == "zero":
        return bytes(PAGE_SIZE)
    if kind == "same":
        word = rng.randbytes(8)
        while word == bytes(8):
            word = rng.randbytes(8)
        return word * (PAGE_SIZE // 8)
    if kind == "random":
        return rng.randbytes(PAGE_SIZE)
    return rng.randbytes(length) + bytes(PAGE_SIZE - length)
