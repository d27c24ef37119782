"""NBD servers for the guest to swap on: nbdcache, and `nbdkit memory` as the peer.

Each listens on the host's loopback only, on a free port; a server is ready
when its TCP port accepts connections. `stop()` sends SIGTERM and reports
how the process ended, so a test can check for a clean shutdown.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .runner import NbdTarget

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nbdcache_binary() -> str:
    """The `nbdcache` console script next to this interpreter, else on PATH."""
    candidate = Path(sys.executable).with_name("nbdcache")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nbdcache")
    if found is None:
        raise RuntimeError("nbdcache is not installed (pip install -e .)")
    return found


@dataclass
class ServerExit:
    returncode: int | None
    seconds_to_exit: float | None  # after SIGTERM; None when it had to be killed


class NbdServer:
    """A server process on 127.0.0.1:port; use as a context manager."""

    name = "server"

    def __init__(self, argv: Sequence[str], port: int, export: str, log_path: Path) -> None:
        self.argv = list(argv)
        self.port = port
        self.export = export
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit: ServerExit | None = None

    @property
    def target(self) -> NbdTarget:
        return NbdTarget(LOOPBACK, self.port, self.export)

    @property
    def url(self) -> str:
        return self.target.qemu_url()

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before accepting "
                    f"connections:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} not listening after {timeout}s") from None
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> ServerExit:
        """SIGTERM, wait up to `timeout`, then SIGKILL."""
        if self.exit is not None:
            return self.exit
        if self.proc is None:
            self.exit = ServerExit(None, None)
            return self.exit
        if self.proc.poll() is not None:
            self.exit = ServerExit(self.proc.returncode, None)
            return self.exit
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
            self.exit = ServerExit(self.proc.returncode, time.monotonic() - start)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit = ServerExit(self.proc.returncode, None)
        return self.exit

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NbdkitMemory(NbdServer):
    """`nbdkit memory SIZE`: RAM only, no compression; the peer to compare with."""

    name = "nbdkit-memory"

    def __init__(self, size: str, log_path: Path, extra_args: Sequence[str] = ()) -> None:
        port = free_port()
        nbdkit = shutil.which("nbdkit")
        if nbdkit is None:
            raise RuntimeError("nbdkit not found (apt-get install nbdkit)")
        argv = [
            nbdkit,
            "--foreground",
            "--exit-with-parent",
            "--ipaddr",
            LOOPBACK,
            "--port",
            str(port),
            *extra_args,
            "memory",
            size,
        ]
        super().__init__(argv, port, "", log_path)


class Nbdcache(NbdServer):
    """`nbdcache serve` on a loopback port; extra_args go straight to `serve`.

    With metrics=True the server also gets `--metrics 127.0.0.1:PORT` and
    `stats()` / `metrics()` read its counters.
    """

    name = "nbdcache"

    def __init__(
        self,
        size: str,
        log_path: Path,
        extra_args: Sequence[str] = (),
        export: str = "swap",
        metrics: bool = False,
    ) -> None:
        port = free_port()
        argv = [
            nbdcache_binary(),
            "serve",
            "--listen",
            f"{LOOPBACK}:{port}",
            "--size",
            size,
            "--export",
            export,
        ]
        self.metrics_port: int | None = None
        if metrics:
            self.metrics_port = free_port()
            argv += ["--metrics", f"{LOOPBACK}:{self.metrics_port}"]
        argv += list(extra_args)
        super().__init__(argv, port, export, log_path)

    @property
    def metrics_url(self) -> str:
        if self.metrics_port is None:
            raise RuntimeError("server started without metrics=True")
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def stats(self) -> str:
        """What `nbdcache stats --url URL` prints for this server (the operator's view)."""
        result = subprocess.run(
            [nbdcache_binary(), "stats", "--url", self.metrics_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"nbdcache stats failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def metrics(self) -> dict[str, float]:
        """The Prometheus exposition as {'name{labels}': value}."""
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            return parse_prometheus(response.read().decode())

    def counters(self) -> dict[str, float]:
        """This export's counters by name, without the `nbdcache_` prefix."""
        out: dict[str, float] = {}
        label = f'{{export="{self.export}"}}'
        for key, value in self.metrics().items():
            if key.startswith("nbdcache_") and key.endswith(label):
                name = key[len("nbdcache_") : -len(label)]
                if not name.endswith("_created"):
                    out[name] = value
        return out

    def settle(self, timeout: float = 120.0) -> dict[str, float]:
        """Wait until background work is done: no writeback in flight, counters still.

        The server punches the holes of trimmed pages and writes pages back
        behind the client's requests; what it holds is only meaningful once
        that has caught up. Returns the counters then (or at the deadline:
        the caller's assertions say what was left).
        """
        deadline = time.monotonic() + timeout
        last: dict[str, float] | None = None
        while True:
            now = self.counters()
            if now.get("writeback_inflight", 0) == 0 and now == last:
                return now
            if time.monotonic() > deadline:
                return now
            last = now
            time.sleep(1.0)


def parse_prometheus(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)(?:\s+\d+)?$", line)
        if match:
            try:
                out[match.group(1)] = float(match.group(2))
            except ValueError:
                continue
    return out


def allocated_bytes(url: str) -> int:
    """Bytes the server reports as data (not hole) through `base:allocation`.

    Uses `nbdinfo --map` (libnbd-bin). Servers that do not implement block
    status report everything as data.
    """
    nbdinfo = shutil.which("nbdinfo")
    if nbdinfo is None:
        raise RuntimeError("nbdinfo not found (apt-get install libnbd-bin)")
    out = subprocess.run(
        [nbdinfo, "--map", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "LC_ALL": "C"},
    ).stdout
    total = 0
    for line in out.splitlines():
        # "   offset   length   type  description", type bit 0 = hole
        fields = line.split()
        if (
            len(fields) >= 3
            and fields[0].isdigit()
            and fields[1].isdigit()
            and not int(fields[2]) & 1
        ):
            total += int(fields[1])
    return total
