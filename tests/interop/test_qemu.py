"""qemu-io and qemu-img against ``nbdcache serve``."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Fixture = Callable[..., Any]

MiB = 1024 * 1024


def qemu_io(run: Fixture, tool: Fixture, uri: str, *commands: str) -> str:
    """Run qemu-io commands in one connection; any failed command fails the test."""
    tool("qemu-io")
    argv = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        argv += ["-c", command]
    proc = run(argv)
    out: str = proc.stdout + proc.stderr
    # qemu-io exits 1 when a command fails; also refuse any failure message
    assert "failed" not in out.lower(), out
    return out


# (offset, length, pattern byte): aligned, 512-byte aligned and odd placements,
# including writes that straddle page boundaries and a one-byte write.
PATTERN_WRITES = [
    (0, 4096, 0x11),
    (1 * MiB, 64 * 1024, 0x22),
    (4 * MiB + 512, 512, 0x33),
    (4 * MiB + 3 * 512, 5 * 512, 0x44),  # crosses a 4 KiB page boundary
    (8 * MiB + 12345, 777, 0x55),
    (8 * MiB + 4095, 2, 0x66),  # the last byte of one page, the first of the next
    (12 * MiB + 1, 1, 0x77),
    (16 * MiB - 3, 10003, 0x88),
    (64 * MiB - 511, 511, 0x99),  # ends exactly at the end of the export
]


def test_qemu_io_patterns_at_aligned_512_and_odd_offsets(
    start_server: Fixture, run: Fixture, tool: Fixture
) -> None:
    server = start_server(size="64M")
    uri = server.uri()
    qemu_io(run, tool, uri, *(f"write -P {p:#x} {o} {n}" for o, n, p in PATTERN_WRITES))
    # read back on a new connection, plus the untouched bytes around each write
    reads = [f"read -P {p:#x} {o} {n}" for o, n, p in PATTERN_WRITES]
    reads += [
        "read -P 0 4096 4096",
        f"read -P 0 {4 * MiB} 512",
        f"read -P 0 {4 * MiB + 1024} 512",
        f"read -P 0 {4 * MiB + 8 * 512} {8192 - 8 * 512}",
        f"read -P 0 {8 * MiB} 4095",
        f"read -P 0 {8 * MiB + 4097} {12345 - 4097}",
        f"read -P 0 {8 * MiB + 12345 + 777} 1000",
        f"read -P 0 {12 * MiB} 1",
        f"read -P 0 {12 * MiB + 2} 4094",
        f"read -P 0 {16 * MiB - 4096} {4096 - 3}",
        f"read -P 0 {16 * MiB + 10000} 100",
        f"read -P 0 {64 * MiB - 4096} {4096 - 511}",
    ]
    qemu_io(run, tool, uri, *reads)


def test_qemu_io_overlapping_unaligned_writes(
    start_server: Fixture, run: Fixture, tool: Fixture
) -> None:
    """Later unaligned writes replace only their own bytes (read-modify-write)."""
    server = start_server(size="64M")
    uri = server.uri()
    base = 2 * MiB
    qemu_io(
        run,
        tool,
        uri,
        f"write -P 0xaa {base} 16384",
        f"write -P 0x55 {base + 1000} 10",
        f"write -P 0x5a {base + 4090} 12",
        f"write -P 0xa5 {base + 8191} 8194",
    )
    qemu_io(
        run,
        tool,
        uri,
        f"read -P 0xaa {base} 1000",
        f"read -P 0x55 {base + 1000} 10",
        f"read -P 0xaa {base + 1010} {4090 - 1010}",
        f"read -P 0x5a {base + 4090} 12",
        f"read -P 0xaa {base + 4102} {8191 - 4102}",
        f"read -P 0xa5 {base + 8191} 8194",
        f"read -P 0 {base + 16385} {4096 - 1}",
    )


def test_qemu_io_discard_and_write_zeroes(
    start_server: Fixture, run: Fixture, tool: Fixture
) -> None:
    server = start_server(size="64M")
    uri = server.uri()
    qemu_io(
        run,
        tool,
        uri,
        f"write -P 0xcd 0 {4 * MiB}",
        f"discard {1 * MiB} {1 * MiB}",
        f"write -z {2 * MiB} {512 * 1024}",
        f"write -z -u {3 * MiB} {512 * 1024}",
        f"write -z {3 * MiB + 600 * 1024 + 7} 1000",
    )
    qemu_io(
        run,
        tool,
        uri,
        f"read -P 0xcd 0 {1 * MiB}",
        f"read -P 0 {1 * MiB} {1 * MiB}",
        f"read -P 0 {2 * MiB} {512 * 1024}",
        f"read -P 0xcd {2 * MiB + 512 * 1024} {512 * 1024}",
        f"read -P 0 {3 * MiB} {512 * 1024}",
        f"read -P 0xcd {3 * MiB + 512 * 1024} {600 * 1024 + 7 - 512 * 1024}",
        f"read -P 0 {3 * MiB + 600 * 1024 + 7} 1000",
        f"read -P 0xcd {3 * MiB + 600 * 1024 + 1007} {MiB - 600 * 1024 - 1007}",
    )


def test_qemu_io_over_ipv6_and_ipv4_share_the_export(
    start_server: Fixture, run: Fixture, tool: Fixture
) -> None:
    server = start_server(size="64M", ipv6=True)
    (_, port6), = server.extra_tcp  # fmt: skip
    qemu_io(run, tool, f"nbd://[::1]:{port6}/", "write -P 0x3c 40960 12288")
    qemu_io(run, tool, server.uri(), "read -P 0x3c 40960 12288", "write -P 0x4d 100 3")
    qemu_io(run, tool, f"nbd://[::1]:{port6}/", "read -P 0x4d 100 3", "read -P 0 0 100")


def make_image(path: Path, size: int) -> None:
    """Random data with all-zero stretches, zero pages inside data, and small islands."""
    rng_chunk = 1 * MiB
    with open(path, "wb") as f:
        for i in range(size // rng_chunk):
            if i % 7 == 3:
                chunk = bytes(rng_chunk)  # a zero MiB
            elif i % 11 == 5:
                # mostly zero, with a few bytes of data at odd places
                buf = bytearray(rng_chunk)
                for off in (1, 4095, 70001, rng_chunk - 1):
                    buf[off] = 0xFF
                chunk = bytes(buf)
            else:
                buf = bytearray(os.urandom(rng_chunk))
                buf[8192:12288] = bytes(4096)  # one zero page inside data
                chunk = bytes(buf)
            f.write(chunk)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def test_qemu_img_convert_roundtrip(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    tool("qemu-img")
    server = start_server(size="64M")
    uri = server.uri()
    src = tmp_path / "src.img"
    out = tmp_path / "out.img"
    make_image(src, 64 * MiB)

    info = run(["qemu-img", "info", "--output=json", "-f", "raw", uri]).stdout
    assert '"virtual-size": 67108864' in info, info

    # into the export (-n: the target exists), out-of-order writes in parallel
    run(["qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", str(src), uri])
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], check=False)
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"

    # and back out into a plain file
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)])
    assert out.stat().st_size == 64 * MiB
    assert sha256(out) == sha256(src)


def test_qemu_img_compare_detects_a_difference(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    """The comparison above can fail: one changed byte in the export is noticed."""
    tool("qemu-img")
    server = start_server(size="64M")
    uri = server.uri()
    src = tmp_path / "src.img"
    make_image(src, 64 * MiB)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    with open(src, "rb") as f:
        f.seek(5 * MiB + 123)
        old = f.read(1)[0]
    qemu_io(run, tool, uri, f"write -P {old ^ 0xFF:#x} {5 * MiB + 123} 1")
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], check=False)
    assert proc.returncode == 1, f"qemu-img compare: {proc.stdout}{proc.stderr}"
    # qemu-img reports the start of the first differing sector
    match = re.search(r"Content mismatch at offset (\d+)", proc.stdout)
    assert match, proc.stdout
    assert 5 * MiB + 123 - 4096 < int(match.group(1)) <= 5 * MiB + 123, proc.stdout
