"""Every allocator behind real clients, with data that really goes through it.

Patterns such as `write -P` are same-filled pages and random data is
incompressible: both bypass the allocators.  These tests move compressible,
page-mix data (the benchmark's swap-like set) so every page is packed.  The
whole interop suite also runs on one allocator with NBDCACHE_ALLOCATOR=zbud.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from pagemix import swap_mix

Fixture = Callable[..., Any]
ALLOCATORS = ["zsmalloc", "z3fold", "zbud"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_page_mix_round_trips_through_each_allocator(
    allocator: str, start_server: Fixture, run: Fixture, tmp_path: Path
) -> None:
    src = tmp_path / "mix.raw"
    src.write_bytes(swap_mix(8192, seed=3))  # 32 MiB
    # A tier smaller than the data: writeback and read-fills run too.
    server = start_server(size="32M", extra_args=["--allocator", allocator, "--ram", "12M"])
    run(["nbdcopy", "--connections=4", str(src), server.uri()], timeout=300)
    out = tmp_path / "out.raw"
    run(["nbdcopy", server.uri(), str(out)], timeout=300)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri()], timeout=300)


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_fio_compressible_verify_on_each_allocator(
    allocator: str, start_server: Fixture, run: Fixture, tmp_path: Path
) -> None:
    server = start_server(size="64M", extra_args=["--allocator", allocator, "--backing", "none"])
    run(
        [
            "fio",
            "--name=mix",
            "--ioengine=nbd",
            f"--uri={server.uri()}",
            "--rw=randrw",
            "--rwmixread=30",
            "--bsrange=512-64k",
            "--bs_unaligned=1",
            "--iodepth=32",
            "--size=48M",
            "--io_size=96M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--buffer_compress_percentage=60",
            "--refill_buffers",
            "--verify_state_save=0",
        ],
        timeout=600,
        cwd=tmp_path,
    )
