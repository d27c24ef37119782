"""The container image (deploy/Dockerfile) and deploy/compose.yaml, run with podman.

The image is built from the repository as users build it (`podman build -f
deploy/Dockerfile .`, docker format so the HEALTHCHECK is kept) on an
offline `python:3.11-slim` stand-in (container/base.py).  Each test starts
the server in a container with its NBD and metrics ports published on
loopback, attaches from the host with nbdinfo and qemu-io, runs the image's
health check, and stops the container: SIGTERM must reach the server
through the init process and the server must exit 0 on its own.

Cost: the first run on a machine spends a few minutes in debootstrap (the
tarball is cached in the e2e cache directory) and about a minute building;
later runs reuse podman's image and build cache.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from container.base import ensure_base_image
from container.podman import PodmanError, compose, podman

from nbdcache import metrics, probe

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/nbdcache-e2e:latest"
MiB = 1 << 20
READY_TIMEOUT = 120.0
#: `podman stop` timeout: SIGKILL after it (exit status 137), which must not happen.
STOP_TIMEOUT = 60

pytestmark = pytest.mark.timeout(1800)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*cmd: str) -> str:
    """Run a host tool; a failure fails the test with its output."""
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} is not installed")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "failed" in out.lower():
        pytest.fail(f"{' '.join(cmd)}: status {proc.returncode}\n{out[-4000:]}", pytrace=False)
    return proc.stdout


@pytest.fixture(scope="session")
def image() -> str:
    """The nbdcache image, built from this work tree."""
    try:
        ensure_base_image()
        podman(
            "build",
            "--pull=never",
            "--network=host",
            "--format=docker",
            "-f",
            "deploy/Dockerfile",
            "-t",
            IMAGE,
            ".",
            cwd=REPO,
            timeout=1200,
        )
    except (PodmanError, subprocess.CalledProcessError, RuntimeError) as exc:
        pytest.fail(f"cannot build the image: {exc}", pytrace=False)
    return IMAGE


def wait_ready(port: int, container: str) -> None:
    """Until the published port completes an NBD handshake (or the container dies)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            probe.probe(("127.0.0.1", port), timeout=5)
            return
        except (OSError, probe.ProbeError) as exc:
            state = podman("inspect", "--format", "{{.State.Status}}", container, check=False)
            if state.stdout.strip() not in ("running", "created", "configured"):
                logs = podman("logs", container, check=False)
                pytest.fail(f"container {state.stdout.strip()}:\n{logs.stderr[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready on port {port}: {exc}")
        time.sleep(0.5)


def text_like(size: int) -> bytes:
    """Compressible but not trivial data (lz4 packs it about 2:1), like files or swap."""
    rng = random.Random(size)
    letters = b"abcdefghijklmnopqrstuvwxyz"
    words = [bytes(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(512)]
    out = bytearray()
    line = 0
    while len(out) < size:
        out += b"%08d " % line + b" ".join(rng.choices(words, k=12)) + b"\n"
        line += 1
    return bytes(out[:size])


def attach_and_check(port: int, size: int, data: Path) -> None:
    """nbdinfo sees the export; qemu-io writes data and patterns, qemu-img and
    qemu-io (other connections) read them back."""
    uri = f"nbd://127.0.0.1:{port}/default"
    info = json.loads(run("nbdinfo", "--json", uri))
    (export,) = info["exports"]
    assert export["export-name"] == "default"
    assert export["export-size"] == size
    length = data.stat().st_size
    run("qemu-io", "-f", "raw", "-c", f"write -s {data} 0 {length}", uri)
    # The device holds the data, then zeroes to its end.
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(data), uri)
    run("qemu-io", "-f", "raw", "-c", f"write -P 0xa5 {length} 1M", uri)
    reads = ["-c", f"read -P 0xa5 {length} 1M", "-c", f"read -P 0 {length + MiB} 1M"]
    run("qemu-io", "-f", "raw", *reads, uri)


def exit_code(container: str) -> int:
    out = podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout
    return int(out.strip())


def logs(container: str) -> str:
    proc = podman("logs", container, check=False)
    return proc.stdout + proc.stderr


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"nbdcache-e2e-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    podman("rm", "-f", name, check=False)
    podman("volume", "rm", "-f", f"{name}-data", check=False)


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("container") / "data.raw"
    path.write_bytes(text_like(32 * MiB))
    return path


def test_the_image_runs_the_tiers_c_loops(image: str) -> None:
    """The build stage compiled nbdcache/tier/_pages.c and the image can load it."""
    check = "from nbdcache.tier.codec import native; print(native.__name__, native.LZ4_VERSION)"
    proc = podman("run", "--rm", "--entrypoint", "/opt/nbdcache/bin/python", image, "-c", check)
    name, version = proc.stdout.split()
    assert name == "nbdcache.tier._pages" and int(version) >= 10900


def test_container_serves_checks_health_and_stops_cleanly(
    image: str, container_name: str, data: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    podman(
        "run",
        "-d",
        "--name",
        container_name,
        "-p",
        f"127.0.0.1:{port}:10809",
        "-p",
        f"127.0.0.1:{metrics_port}:10810",
        "-v",
        f"{container_name}-data:/var/lib/nbdcache",
        image,
        # nbdcache serve flags, over the image's configuration: a RAM tier
        # smaller than what is written, so pages go to the image on the volume.
        "--size",
        "64M",
        "--ram",
        "4M",
    )
    wait_ready(port, container_name)
    attach_and_check(port, 64 * MiB, data)
    counters = metrics.fetch(f"http://127.0.0.1:{metrics_port}/metrics")["default"]
    assert counters["pages_written_back_total"] > 0
    # The server does not run as root.
    assert podman("exec", container_name, "id", "-un").stdout.strip() == "nbdcache"
    health = podman("healthcheck", "run", container_name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    status = podman("inspect", "--format", "{{.State.Health.Status}}", container_name)
    assert status.stdout.strip() == "healthy"

    podman("stop", "-t", str(STOP_TIMEOUT), container_name)
    assert exit_code(container_name) == 0, logs(container_name)[-4000:]
    assert "shutting down" in logs(container_name)


def test_compose_up_serves_and_stop_is_clean(image: str, data: Path) -> None:
    port, metrics_port = free_port(), free_port()
    project = f"nbdcache-e2e-{os.getpid()}"
    settings = {
        "NBDCACHE_IMAGE": image,
        "NBDCACHE_PORT": str(port),  # on 127.0.0.1, the default
        "NBDCACHE_METRICS_PORT": str(metrics_port),
    }
    args = ["-f", str(REPO / "deploy" / "compose.yaml"), "-p", project]
    try:
        compose(*args, "up", "-d", "--no-build", extra_env=settings)
        names = podman(
            "ps",
            "-a",
            "--filter",
            f"label=io.podman.compose.project={project}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        assert len(names) == 1, names
        (name,) = names
        wait_ready(port, name)
        attach_and_check(port, 4096 * MiB, data)
        assert metrics.fetch(f"http://127.0.0.1:{metrics_port}/metrics")["default"]
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        compose(*args, "stop", extra_env=settings)
        assert exit_code(name) == 0, logs(name)[-4000:]
        assert "shutting down" in logs(name)
    finally:
        compose(*args, "down", "-v", extra_env=settings, check=False)
