"""Faults: clients vanishing mid-payload, a reconnect storm, EIO from the
image, and kill -9 during heavy writeback in durable mode.

Each runs beside a well-behaved client (libnbd) that must see no error and
no wrong byte, unless the fault is meant for it.  A full file system is
covered by test_writeback.py (ENOSPC on first writes, the server goes on).

EIO comes from the fault-injection point in backing.py
(``NBDCACHE_TEST_IMAGE_EIO``): this kernel has no device-mapper, so a real
failing device (dm ``error`` target) cannot be built here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    RawNBD,
    Server,
    StartServer,
    client_env,
    free_port,
)
from pki import PKI
from test_fuzz import GOOD_CLIENT
from test_tls import OPT_GO, OPT_STARTTLS, REP_ACK, option_reply, raw_start, send_option
from test_writeback import compressible, restartable, wait_port

__all__ = ["restartable"]  # the fixture, shared with test_writeback

Run = Callable[..., Any]
MiB = 1 << 20
REP_INFO = 3


@contextlib.contextmanager
def good_client(nbd_python: str, uri: str, tmp_path: Path) -> Iterator[None]:
    """Writes and verifies [0, 8M) until the block ends; must end cleanly."""
    stop = tmp_path / "stop-good"
    proc = subprocess.Popen(
        [nbd_python, "-c", GOOD_CLIENT, uri, str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env(),
    )
    try:
        yield
    finally:
        stop.touch()
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"the well-behaved client failed:\n{err}"
    print(f"good client: {out.strip()} verified rounds")


def go_over_tls(server: Server, pki: PKI) -> ssl.SSLSocket:
    sock = raw_start(server)
    send_option(sock, OPT_STARTTLS)
    assert option_reply(sock) == (OPT_STARTTLS, REP_ACK)
    creds = pki.client("vanisher")
    ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
    ctx.load_cert_chain(str(creds / "client-cert.pem"), str(creds / "client-key.pem"))
    tls = ctx.wrap_socket(sock, server_hostname="localhost")
    send_option(tls, OPT_GO, struct.pack(">I", 0) + b"\0\0")
    while option_reply(tls)[1] == REP_INFO:
        pass
    return tls


def vanish(sock: socket.socket, *, reset: bool) -> None:
    if reset:  # RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_vanishing_mid_payload(
    start_server: StartServer, nbd_python: str, nbdsh: Run, tmp_path: Path
) -> None:
    pki = PKI.create(tmp_path / "pki")
    server = start_server(size="64M", extra_args=pki.server_args("on", ca=False))
    target = 32 * MiB  # no vanishing write may land here
    with good_client(nbd_python, server.uri(), tmp_path):
        for i in range(24):
            header = RawNBD.request_header(CMD_WRITE, target + i * MiB, MiB, cookie=i)
            if i % 3 == 2:
                tls = go_over_tls(server, pki)
                tls.sendall(header + b"\xaa" * (MiB // 2))
                vanish(tls, reset=i % 2 == 0)
            else:
                raw = RawNBD.connect(server)
                raw.handshake()
                raw.sock.sendall(header + b"\xaa" * (i * 40000 % MiB))
                vanish(raw.sock, reset=i % 2 == 0)
    nbdsh(server.uri(), f"assert h.pread({24 * MiB}, {target}) == bytes({24 * MiB})")
    assert server.alive()


def storm_once(server: Server, i: int) -> None:
    """One short-lived client; refused or reset connections are fine."""
    with contextlib.suppress(OSError, EOFError, AssertionError, struct.error):
        kind = i % 4
        if kind == 0:  # connect and leave at once
            server.connect().close()
        elif kind == 1:  # greeting, then RST
            raw = RawNBD.connect(server)
            raw.greeting()
            vanish(raw.sock, reset=True)
        elif kind == 2:  # a whole session: handshake, read, disconnect
            raw = RawNBD.connect(server)
            raw.handshake()
            raw.request(CMD_READ, (i * 4096) % (16 * MiB), 4096, cookie=i)
            raw.simple_reply(4096)
            raw.request(CMD_DISC, 0, 0)
            raw.close()
        else:  # a write cut short, then RST
            raw = RawNBD.connect(server)
            raw.handshake()
            raw.sock.sendall(RawNBD.request_header(CMD_WRITE, 40 * MiB, 65536) + b"x" * 999)
            vanish(raw.sock, reset=True)


def test_reconnect_storm_beside_a_writing_client(
    start_server: StartServer, nbd_python: str, run: Run, tmp_path: Path
) -> None:
    server = start_server(size="64M")
    cycles = 400
    with (
        good_client(nbd_python, server.uri(), tmp_path),
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        list(pool.map(lambda i: storm_once(server, i), range(cycles)))
    run(["nbdinfo", server.uri()])
    log = server.log()
    assert "internal error" not in log and "Traceback" not in log


EIO_CLIENT = r"""
import errno, random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
mode = sys.argv[2]
MiB = 1 << 20

def page(i):
    r = random.Random(i)
    return r.randbytes(2048) * 2  # compressible: stays in RAM while it can

def outcome(fn, *args):
    try:
        fn(*args)
        return "ok"
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))

if mode == "fill":
    for i in range(16 * MiB // 4096):
        h.pwrite(page(i), i * 4096)
elif mode == "failing":
    reads = {outcome(h.pread, 4096, i * 4096) for i in range(0, 4096, 64)}
    # Each write that needs room waits up to writeback_wait before its EIO.
    writes = {outcome(h.pwrite, page(i) * 16, 24 * MiB + i * 65536) for i in range(12)}
    random_writes = {outcome(h.pwrite, random.randbytes(4096), 20 * MiB)}
    print("reads:", sorted(reads), "writes:", sorted(writes), "random:", sorted(random_writes))
else:
    for i in range(16 * MiB // 4096):
        assert h.pread(4096, i * 4096) == page(i), i
    print("intact")
"""


def test_eio_from_the_image(
    start_server: StartServer,
    nbd_python: str,
    run: Run,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    control = tmp_path / "image-fails"
    monkeypatch.setenv("NBDCACHE_TEST_IMAGE_EIO", str(control))
    server = start_server(
        exports=[
            {
                "name": "disk",
                "size": "32M",
                "ram": "2M",
                "backing": str(tmp_path / "disk.img"),
                "writeback_wait": 2,
            }
        ]
    )
    uri = server.uri("disk")

    def client(mode: str) -> str:
        return str(run([nbd_python, "-c", EIO_CLIENT, uri, mode], timeout=600).stdout)

    client("fill")  # 16 MiB through a 2 MiB tier: most of it is in the image
    control.touch()
    seen = client("failing")
    print("while the image fails:", seen)
    assert "EIO" in seen  # image reads and writes that need the image fail
    assert server.alive()
    control.unlink()
    assert "intact" in client("check")  # nothing stored was lost
    assert "Traceback" not in server.log()


CRASH_WRITER = r"""
import os, sys, nbd
uri, src, journal = sys.argv[1:4]
CHUNK = 256 * 1024
PER_ROUND = 16
h = nbd.NBD()
h.connect_uri(uri)
data = open(src, "rb").read()
i = 0
with open(journal, "a") as j:
    while i * CHUNK < len(data):
        cmds = []
        for k in range(i, min(i + PER_ROUND, len(data) // CHUNK)):
            cmds.append(h.aio_pwrite(data[k * CHUNK:(k + 1) * CHUNK], k * CHUNK))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cmds:
            h.aio_command_completed(c)  # raises if the write failed
        i += len(cmds)
        h.flush()
        j.write(f"{i}\n")
        j.flush()
        os.fsync(j.fileno())
"""


def test_kill_9_during_heavy_writeback_keeps_flushed_writes(
    restartable: Callable[[list[str]], subprocess.Popen[bytes]],
    nbd_python: str,
    run: Run,
    tmp_path: Path,
) -> None:
    image, src, journal = tmp_path / "disk.img", tmp_path / "src.raw", tmp_path / "journal"
    content = bytearray(compressible(64 * MiB, 3))
    for k in range(0, 64, 5):  # incompressible stretches go to the image directly
        content[k * MiB : k * MiB + 256 * 1024] = random.Random(k).randbytes(256 * 1024)
    src.write_bytes(content)
    port = free_port()
    argv = ["--listen", f"127.0.0.1:{port}", "--size", "64M", "--ram", "4M"]
    argv += ["--backing", str(image), "--durability", "durable"]
    proc = restartable(argv)
    wait_port(port, proc)
    uri = f"nbd://127.0.0.1:{port}/"
    writer = subprocess.Popen(
        [nbd_python, "-c", CRASH_WRITER, uri, str(src), str(journal)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=client_env(),
    )
    deadline = time.monotonic() + 300
    rounds: list[str] = []
    # Let several rounds (4 MiB each through a 4 MiB tier) be flushed, then crash.
    while len(rounds) < 6:
        assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.02)
        rounds = journal.read_text().split() if journal.exists() else []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    writer.wait(timeout=60)
    flushed = int(journal.read_text().split()[-1]) * 256 * 1024
    assert 0 < flushed < len(content), flushed  # killed mid-run
    proc = restartable(argv)
    wait_port(port, proc)
    out = tmp_path / "out.raw"
    run(["nbdcopy", uri, str(out)], timeout=300)
    back = out.read_bytes()
    bad = [k for k in range(0, flushed, 4096) if back[k : k + 4096] != content[k : k + 4096]]
    assert not bad, f"{len(bad)} pages flushed before the crash differ, first at {bad[0]}"
    print(f"crash after {flushed // MiB} MiB flushed; all of it read back")
