"""The lab's pieces that need neither root nor a VM: delay proxy, sweep grid, real servers.

The proxy must deliver every byte in order in both directions, whatever the
delay, also when the server talks first (NBD's greeting) and when the
client sends many requests without waiting for replies.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[2] / "deploy" / "lab"
sys.path.insert(0, str(LAB))

from nbdlab.delay import DelayProxy  # noqa: E402
from nbdlab.lab import Remote, RunSpec  # noqa: E402
from nbdlab.sweep import grid  # noqa: E402


def _through_proxy(delay_ms: float, chunks: list[bytes]) -> tuple[bytes, bytes]:
    """An upstream that greets, then echoes; the client pipelines `chunks`."""
    upstream = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = upstream.accept()
        with conn:
            conn.sendall(b"HELLO")
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    proxy = DelayProxy(0, "127.0.0.1", upstream.getsockname()[1], delay_ms)
    proxy.start()
    total = sum(map(len, chunks))
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        sender = threading.Thread(target=lambda: [client.sendall(c) for c in chunks])
        sender.start()
        received = b""
        while len(received) < 5 + total:
            data = client.recv(65536)
            assert data, "the proxy closed the connection early"
            received += data
        sender.join()
    proxy.close()
    upstream.close()
    return received[:5], received[5:]


@pytest.mark.parametrize("delay_ms", [0.0, 0.5, 2.0])
def test_delay_proxy_keeps_every_byte_in_order(delay_ms: float) -> None:
    chunks = [bytes([i % 251]) * (1 + (i * 977) % 9000) for i in range(300)]
    greeting, echoed = _through_proxy(delay_ms, chunks)
    assert greeting == b"HELLO"
    assert echoed == b"".join(chunks)


def test_axes_plan_varies_one_thing_at_a_time() -> None:
    base = RunSpec()
    specs = grid(base, [1, 2, 4], ["32M", "128M"], [0.0, 0.5, 2.0], ["nbdcache", "nbdkit"], "axes")
    cache = [(s.servers, s.tier, s.delay_ms) for s in specs if s.kind == "nbdcache"]
    kit = [(s.servers, s.tier, s.delay_ms) for s in specs if s.kind == "nbdkit"]
    assert cache == [
        (1, "32M", 0.0), (2, "32M", 0.0), (4, "32M", 0.0),
        (1, "32M", 0.5), (1, "32M", 2.0), (1, "128M", 0.0),
    ]  # fmt: skip
    # nbdkit memory has no tier.
    assert kit == [(1, "-", 0.0), (2, "-", 0.0), (4, "-", 0.0), (1, "-", 0.5), (1, "-", 2.0)]


def test_product_plan_runs_every_combination_once() -> None:
    specs = grid(RunSpec(), [1, 2], ["16M", "32M"], [0.0, 2.0], ["nbdcache", "nbdkit"])
    assert len(specs) == 2 * 2 * 2 + 2 * 2  # nbdkit: one tier
    assert len(set(specs)) == len(specs)


def test_remote_targets_parse() -> None:
    assert Remote.parse("192.0.2.10:10809/swap") == Remote("192.0.2.10", 10809, "swap")
    assert Remote.parse("[2001:db8::1]:10809") == Remote("2001:db8::1", 10809, "")
    for bad in ("host-without-port", "example.org:10809", "192.0.2.1:x"):
        with pytest.raises(ValueError):
            Remote.parse(bad)


@pytest.mark.skipif(
    shutil.which("nbdkit") is None or shutil.which("nbdinfo") is None,
    reason="needs nbdkit and nbdinfo",
)
def test_serve_with_remote_servers_puts_a_delay_proxy_in_front(tmp_path: Path) -> None:
    """`nbdlab serve --remote ...`: no namespaces, one proxy per given server."""
    port = socket.create_server(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    remote = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "--ipaddr", "127.0.0.1",
         "--port", str(number), "--exportname", "swap", "memory", "3M"],
    )  # fmt: skip
    lab = subprocess.Popen(
        [sys.executable, "-m", "nbdlab", "serve", "--remote", f"127.0.0.1:{number}/swap",
         "--delay-ms", "1", "--workdir", str(tmp_path)],
        cwd=LAB,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert lab.stdout is not None
        url = lab.stdout.readline().strip()
        assert lab.stdout.readline().strip() == "ready"
        assert url.startswith("nbd://127.0.0.1:") and url.endswith("/swap")
        assert url != f"nbd://127.0.0.1:{number}/swap"  # the proxy, not the server
        size = subprocess.run(["nbdinfo", "--size", url], capture_output=True, text=True)
        assert size.stdout.strip() == str(3 * 2**20), size.stderr
        lab.send_signal(signal.SIGTERM)
        assert lab.wait(timeout=30) == 130
    finally:
        for proc in (lab, remote):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
