"""Soak: 32 connections with 64 requests in flight each (libnbd aio), random
reads and writes checked against a shadow copy; the server's RSS must stay
flat once warm.  The work is done by scripts/soak.py.

CI runs it for NBDCACHE_SOAK_SECONDS (default 20).  A long run::

    NBDCACHE_SOAK_SECONDS=600 .venv/bin/pytest tests/interop/test_soak.py -s

NBDCACHE_SOAK_RAM sets the RAM tier (default 64M, the export's size: every
compressible page fits, incompressible ones go to the image); a smaller tier
puts the soak under writeback pressure, where the server takes longer to warm
up (queued writes hold their data): NBDCACHE_SOAK_WARMUP sets the seconds
after which RSS must stay flat (default: a third of the run).  For example::

    NBDCACHE_SOAK_RAM=16M NBDCACHE_SOAK_SECONDS=300 NBDCACHE_SOAK_WARMUP=60 \
        .venv/bin/pytest tests/interop/test_soak.py -s
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from conftest import SCRIPTS, StartServer

SECONDS = float(os.environ.get("NBDCACHE_SOAK_SECONDS", "20"))
RAM = os.environ.get("NBDCACHE_SOAK_RAM", "64M")
WARMUP = float(os.environ.get("NBDCACHE_SOAK_WARMUP", str(SECONDS / 3)))
#: RSS may wander this much once warm (allocator and interpreter noise).
RSS_WANDER = 32 << 20

Run = Callable[..., Any]


def test_soak_32_connections_64_in_flight(
    start_server: StartServer, nbd_python: str, run: Run
) -> None:
    # 32 regions of 64 blocks of 32 KiB: 64 MiB.
    server = start_server(size="64M", extra_args=["--ram", RAM])
    proc = run(
        [nbd_python, str(SCRIPTS / "soak.py"), server.uri(), str(SECONDS), str(server.proc.pid)],
        timeout=SECONDS + 600,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = [(t, rss >> 20) for t, rss in result["rss"]]
    print(f"soak: {result['requests']} requests, RSS MiB over seconds: {samples}")
    assert result["errors"] == 0, result.get("first_error")
    assert result["mismatches"] == 0
    assert result["requests"] > 0
    warm = [rss for t, rss in result["rss"] if t >= WARMUP]
    assert max(warm) - min(warm) <= RSS_WANDER, samples
    assert server.alive()
