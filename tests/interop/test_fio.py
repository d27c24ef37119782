"""fio's NBD engine writing and verifying through ``nbdcache serve``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Fixture = Callable[..., Any]

MiB = 1024 * 1024


def fio(run: Fixture, tool: Fixture, tmp_path: Path, *options: str) -> list[dict[str, Any]]:
    """Run fio with JSON output; fails on a non-zero exit. Returns the per-job results."""
    tool("fio")
    out = tmp_path / "fio.json"
    # fio saves verify state files in its working directory: keep them in tmp.
    run(["fio", "--output-format=json", f"--output={out}", *options], timeout=300, cwd=tmp_path)
    jobs: list[dict[str, Any]] = json.loads(out.read_text())["jobs"]
    return jobs


def test_random_4k_writes_iodepth_32_verify_crc32c(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    server = start_server(size="64M")
    size = 32 * MiB
    jobs = fio(
        run,
        tool,
        tmp_path,
        "--name=randwrite-verify",
        "--ioengine=nbd",
        f"--uri={server.uri()}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        f"--size={size}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_dump=0",
    )
    (job,) = jobs
    assert job["error"] == 0, job["error"]
    assert job["write"]["io_bytes"] == size
    # the verify pass read every written block back and checked it
    assert job["read"]["io_bytes"] == size


def test_parallel_jobs_each_on_own_connection_verify(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    """Four jobs (four connections) write disjoint 8 MiB regions, verifying as they go."""
    server = start_server(size="64M")
    jobs = fio(
        run,
        tool,
        tmp_path,
        "--name=multi",
        "--ioengine=nbd",
        f"--uri={server.uri()}",
        "--numjobs=4",
        "--offset_increment=8M",
        "--size=8M",
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--bs_unaligned=1",
        "--iodepth=32",
        "--verify=crc32c",
        "--verify_backlog=256",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_dump=0",
    )
    assert len(jobs) == 4
    for job in jobs:
        assert job["error"] == 0, job["error"]
        assert 4 * MiB <= job["write"]["io_bytes"] <= 8 * MiB
        assert job["read"]["io_bytes"] > 0
