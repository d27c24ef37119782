"""Writeback to a backing image, seen from real clients: a device 8x larger
than its RAM tier, a crash in durable mode, a full file system, TRIM giving
space back."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

Fixture = Callable[..., Any]
ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def stats(port: int) -> dict[str, float]:
    """The export's counters through `nbdcache stats`' own fetch."""
    sys.path.insert(0, str(ROOT))
    from nbdcache import metrics

    table = metrics.fetch(f"http://127.0.0.1:{port}/metrics")
    return next(v for k, v in table.items() if k != "server")


def compressible(n: int, seed: int) -> bytes:
    """Text-like data: compresses about 2:1 and is never same-filled."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"swap", b"page", b"zcache", b"kernel", b"0x7f3a"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(64)) + b"%d\n" % rng.getrandbits(32)
    return bytes(out[:n])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fio_verify_on_a_device_8x_the_tier(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    tool("fio")
    mport = free_port()
    image = tmp_path / "swap.img"
    server = start_server(
        size="256M",
        extra_args=["--ram", "32M", "--backing", str(image), "--metrics", f"127.0.0.1:{mport}"],
    )
    run(
        [
            "fio",
            "--name=wb",
            "--ioengine=nbd",
            f"--uri={server.uri()}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=256M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--buffer_compress_percentage=60",
            "--refill_buffers",
            "--verify_state_save=0",
        ],
        timeout=600,
        cwd=tmp_path,
    )
    s = stats(mport)
    assert s["pages_written_back_total"] > 0
    assert s["pages_read_from_image_total"] > 0
    assert s["mem_used_total"] <= 32 * MiB
    out = subprocess.run(
        [sys.executable, "-m", "nbdcache", "stats", "--url", f"http://127.0.0.1:{mport}/metrics"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "pages_written_back_total" in out


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS"))) << 10


def test_memory_stays_near_the_tier_while_a_fill_streams_through(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    """Writes queued for a reservation or for room hold their data only while
    they wait: 384 MiB written through a 16 MiB tier leave no trace in RSS."""
    tool("fio")
    server = start_server(
        size="384M", extra_args=["--ram", "16M", "--backing", str(tmp_path / "img")]
    )
    before = rss(server.proc.pid)
    run(
        [
            "fio",
            "--name=fill",
            "--ioengine=nbd",
            f"--uri={server.uri()}",
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--size=384M",
            "--buffer_compress_percentage=60",
            "--refill_buffers",
        ],
        timeout=600,
        cwd=tmp_path,
    )
    grown = rss(server.proc.pid) - before
    assert grown < 16 * MiB + 64 * MiB, f"server RSS grew by {grown >> 20} MiB"


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Callable[[list[str]], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdcache", "serve", *argv],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"server{len(procs)}.log", "wb"),  # noqa: SIM115
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if len(s.recv(18)) == 18:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server not ready")


def test_kill_9_after_flush_keeps_every_flushed_write(
    restartable: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    tool("nbdcopy")
    image = tmp_path / "disk.img"
    src = tmp_path / "src.raw"
    data = bytearray(compressible(48 * MiB, 1))
    data[8 * MiB : 9 * MiB] = os.urandom(MiB)  # some incompressible pages too
    data[20 * MiB : 22 * MiB] = bytes(2 * MiB)  # and a hole
    src.write_bytes(bytes(data))
    port = free_port()
    argv = [
        "--listen",
        f"127.0.0.1:{port}",
        "--size",
        "48M",
        "--ram",
        "8M",
        "--backing",
        str(image),
        "--durability",
        "durable",
        "--allocator",
        "z3fold",
    ]
    proc = restartable(argv)
    wait_port(port, proc)
    uri = f"nbd://127.0.0.1:{port}/"
    # nbdcopy sends FLUSH at the end (--flush) and exits only after its reply.
    run(["nbdcopy", "--flush", str(src), uri], timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The image alone is a plain raw disk image with the flushed content.
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(image)], timeout=120)
    proc = restartable(argv)
    wait_port(port, proc)
    out = tmp_path / "out.raw"
    run(["nbdcopy", uri, str(out)], timeout=300)
    assert sha(out) == sha(src)


def test_full_file_system_gives_enospc_and_keeps_what_was_written(
    start_server: Fixture, nbdsh: Fixture, tmp_path: Path
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        server = start_server(size="64M", extra_args=["--ram", "2M", "--backing", str(mnt / "img")])
        script = """
import nbd, random
def page(i):
    r = random.Random(i)
    return bytes(r.getrandbits(8) for _ in range(4096))
written = 0
failed = None
for i in range(4096):
    try:
        h.pwrite(page(i), i * 4096)
        written += 1
    except nbd.Error as e:
        failed = e
        break
assert failed is not None and "ENOSPC" in str(failed), failed
assert 100 < written < 4096, written
for i in range(written):
    h.pwrite(page(i + 7), i * 4096)  # overwrites of allocated pages succeed
for i in range(written):
    assert h.pread(4096, i * 4096) == page(i + 7), i
print("written", written)
"""
        out = nbdsh(server.uri(), script)
        assert "written" in out.stdout
        # The server goes on serving other requests.
        nbdsh(server.uri(), "assert h.pread(4096, 0) != bytes(4096)")
        assert server.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_trim_frees_ram_and_punches_the_image(
    start_server: Fixture, run: Fixture, nbdsh: Fixture, tmp_path: Path
) -> None:
    mport = free_port()
    image = tmp_path / "img"
    server = start_server(
        size="64M",
        extra_args=["--ram", "4M", "--backing", str(image), "--metrics", f"127.0.0.1:{mport}"],
    )
    src = tmp_path / "src"
    src.write_bytes(compressible(32 * MiB, 2))
    run(["nbdcopy", str(src), server.uri()], timeout=300)
    deadline = time.monotonic() + 30
    while os.stat(image).st_blocks * 512 < 8 * MiB and time.monotonic() < deadline:
        time.sleep(0.1)  # writeback is behind the client: let it catch up
    before = os.stat(image).st_blocks * 512
    assert before >= 8 * MiB
    assert stats(mport)["pages_stored"] > 0
    nbdsh(server.uri(), f"h.trim({64 * MiB}, 0)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = stats(mport)
        if s["dirty_pages"] == 0 and s["writeback_inflight"] == 0:
            break
        time.sleep(0.1)
    s = stats(mport)
    assert s["pages_stored"] == 0 and s["disk_pages"] == 0
    assert os.stat(image).st_blocks * 512 < 4 * MiB  # region reservations may remain
    mapped = run(["nbdinfo", "--map", server.uri()]).stdout.split()
    assert mapped[:4] == ["0", str(64 * MiB), "3", "hole,zero"]


def test_a_second_server_on_the_same_image_refuses_to_start(
    restartable: Fixture, tmp_path: Path
) -> None:
    image = tmp_path / "shared.img"
    port = free_port()
    first = restartable(["--listen", f"127.0.0.1:{port}", "--size", "16M", "--backing", str(image)])
    wait_port(port, first)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbdcache",
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--size",
            "16M",
            "--backing",
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "in use by another nbdcache server" in second.stderr
    assert first.poll() is None  # the first one is untouched


def test_durable_sigterm_writes_back_and_fua_survives_kill_9(
    restartable: Fixture, nbdsh: Fixture, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    port = free_port()
    argv = [
        "--listen",
        f"127.0.0.1:{port}",
        "--size",
        "16M",
        "--ram",
        "2M",
        "--backing",
        str(image),
        "--durability",
        "durable",
    ]
    proc = restartable(argv)
    wait_port(port, proc)
    uri = f"nbd://127.0.0.1:{port}/"
    data = compressible(3 * MiB, 5)
    (tmp_path / "data").write_bytes(data)
    # Written without FLUSH: SIGTERM must still write it all back.
    nbdsh(
        uri,
        f"h.pwrite(open({str(tmp_path / 'data')!r}, 'rb').read(), 0)",
        f"h.trim({3 * MiB}, {MiB})",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    with open(image, "rb") as f:
        content = f.read()
    assert content[:MiB] == data[:MiB]
    assert content[MiB : 4 * MiB] == bytes(3 * MiB)  # the trim reached the image too
    # A FUA write is durable when acknowledged, even if the server dies next.
    proc = restartable(argv)
    wait_port(port, proc)
    fua = compressible(64 * 1024, 6)
    nbdsh(uri, f"h.pwrite({fua!r}, {8 * MiB}, nbd.CMD_FLAG_FUA)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(image, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(len(fua)) == fua
        f.seek(0)
        assert f.read(MiB) == data[:MiB]
