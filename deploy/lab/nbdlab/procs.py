"""The lab's processes: memory servers in their namespaces, delay proxies, and their end.

This module owns every process the lab starts. Each is recorded the moment
it is spawned, so `Processes.stop_all()` (run on exit, failure or signal)
ends exactly those, by process id: SIGTERM, a grace period, then SIGKILL.

Servers:
- `nbdcache serve --listen ADDRESS:10809` (volatile, a RAM tier of the
  asked size and a backing image in the run's directory);
- `nbdkit memory SIZE`, the baseline: RAM only, no compression.
In a namespace a server is started with `ip netns exec NS ...` and listens
on the namespace's address; qemu, in the root namespace, reaches it over
the veth link. Each server may sit behind a delay proxy on 127.0.0.1.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vm.servers import nbdcache_binary

KINDS = ("nbdcache", "nbdkit")
NBD_PORT = 10809


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def server_argv(kind: str, address: str, port: int, size: str, tier: str, image: Path) -> list[str]:
    """The command line of one memory server listening on address:port."""
    if kind == "nbdcache":
        return [
            nbdcache_binary(), "serve",
            "--listen", f"{address}:{port}",
            "--size", size,
            "--export", "swap",
            "--ram", tier,
            "--backing", str(image),
        ]  # fmt: skip
    if kind == "nbdkit":
        nbdkit = shutil.which("nbdkit")
        if nbdkit is None:
            raise RuntimeError("nbdkit not found (apt-get install nbdkit)")
        return [
            nbdkit, "--foreground", "--exit-with-parent",
            "--ipaddr", address, "--port", str(port),
            "--exportname", "swap",
            "memory", size,
        ]  # fmt: skip
    raise ValueError(f"server kind {kind!r}: one of {KINDS}")


def proxy_argv(listen_port: int, host: str, port: int, delay_ms: float) -> list[str]:
    """The lab's delay proxy (nbdlab.delay) on 127.0.0.1:listen_port."""
    return [
        sys.executable, "-m", "nbdlab.delay", str(listen_port), host, str(port), str(delay_ms)
    ]  # fmt: skip


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when the lab dies, however it dies
    (PR_SET_PDEATHSIG), so no server, proxy or qemu outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Processes:
    """Processes started by the lab; a context manager that ends them all."""

    logdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        self.logdir.mkdir(parents=True, exist_ok=True)
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,  # nbdlab importable
                start_new_session=True,  # a Ctrl-C reaches the lab, which ends them
                preexec_fn=die_with_parent,  # and a lab killed outright ends them too
            )
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop_all(self, grace: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
