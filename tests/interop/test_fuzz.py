"""Fuzz the whole server over a real socket.

Hypothesis builds hostile byte streams: raw garbage, and well-framed
handshakes, options and transmission requests with random fields, split at
random points.  Each stream goes to the running server on a fresh
connection.  Meanwhile a well-behaved libnbd client writes and verifies data
on its own connection.  The server must survive every stream, the good
client must see no error and no wrong byte, and the server's memory must
stay bounded.

The CI run is short.  For a long run (millions of inputs) set
``NBDCACHE_FUZZ_EXAMPLES``, e.g.::

    NBDCACHE_FUZZ_EXAMPLES=1000000 .venv/bin/pytest tests/interop/test_fuzz.py \
        tests/unit/test_protocol.py -k fuzz -s --timeout 0
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
from pathlib import Path

from conftest import IHAVEOPT, REQUEST_MAGIC, StartServer, client_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("NBDCACHE_FUZZ_EXAMPLES", "300"))
SIZE = 16 << 20
#: Memory the server may gain over the whole run (beyond its 16 MiB export).
RSS_SLACK = 96 << 20

GOOD_CLIENT = r"""
import os, random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
rng = random.Random(1)
rounds = 0
while not os.path.exists(sys.argv[2]) or rounds < 20:
    off = rng.randrange(0, (8 << 20) - 65536, 512)
    data = rng.randbytes(rng.choice([512, 4096, 65536]))
    h.pwrite(data, off)
    assert h.pread(len(data), off) == data, f"mismatch at {off}"
    rounds += 1
h.shutdown()
print(rounds)
"""

u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
u32 = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 4096, 1 << 25, (1 << 25) + 1]))
u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, SIZE - 4096, SIZE, 2**63]))


@st.composite
def option(draw: st.DrawFn) -> bytes:
    number = draw(st.one_of(st.integers(0, 12), u32))
    data = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(data)), u32))
    return struct.pack(">QII", IHAVEOPT, number, length) + data


@st.composite
def request(draw: st.DrawFn) -> bytes:
    cmd = draw(st.one_of(st.integers(0, 8), u16))
    length = draw(st.one_of(st.integers(0, 8192), u32))
    header = struct.pack(
        ">IHHQQI", REQUEST_MAGIC, draw(st.one_of(st.integers(0, 31), u16)), cmd,
        draw(u64), draw(st.one_of(st.integers(0, SIZE), u64)), length,
    )  # fmt: skip
    payload = draw(st.binary(max_size=256)) if cmd == 1 else b""
    return header + payload


def go(name: bytes = b"") -> bytes:
    data = struct.pack(">I", len(name)) + name + b"\0\0"
    return struct.pack(">QII", IHAVEOPT, 7, len(data)) + data


STRUCTURED = struct.pack(">QII", IHAVEOPT, 8, 0)
prefixes = st.sampled_from(
    [
        b"",
        struct.pack(">I", 3),
        struct.pack(">I", 3) + go(),
        struct.pack(">I", 3) + STRUCTURED + go(),
        struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 1, 0),  # EXPORT_NAME, zeroes
    ]
)
streams = st.tuples(
    prefixes,
    st.lists(st.one_of(st.binary(max_size=48), option(), request()), max_size=12),
    st.integers(1, 64),
)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_stream(port: int, data: bytes, split: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(0.2)
        with contextlib.suppress(OSError):
            for i in range(0, len(data), split):
                sock.sendall(data[i : i + split])
            # End our side; take what the server answers until it closes.
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass


def test_fuzz_the_server_over_a_socket(
    start_server: StartServer, nbd_python: str, tmp_path: Path
) -> None:
    server = start_server(size="16M", extra_args=["--handshake-timeout", "5"])
    assert server.port is not None
    stop = tmp_path / "stop"
    good = subprocess.Popen(
        [nbd_python, "-c", GOOD_CLIENT, server.uri(), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env(),
    )
    baseline = rss(server.proc.pid)
    count = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(streams)
    def fuzz(stream: tuple[bytes, list[bytes], int]) -> None:
        nonlocal count
        prefix, parts, split = stream
        send_stream(server.port, prefix + b"".join(parts), split)
        count += 1
        assert server.alive(), "the server died"

    try:
        fuzz()
    finally:
        stop.touch()
        out, err = good.communicate(timeout=300)
    print(f"fuzz: {count} streams; good client: {out.strip()} verified rounds")
    assert good.returncode == 0, err
    assert server.alive()
    log = server.log()
    assert "internal error" not in log and "Traceback" not in log, log[-4000:]
    assert rss(server.proc.pid) < baseline + SIZE + RSS_SLACK
