"""Fixtures of the end-to-end tests: the guest image, servers, and the run report.

Every test here is marked `e2e` (deselect with `-m "not e2e"`). Sizes come
from NBDCACHE_E2E (ci or full, see vm/profiles.py). Each run's figures (boot
and run times, swap traffic, server counters) are printed at the end of the
session and, when NBDCACHE_E2E_REPORT names a file, written there as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from vm import profiles
from vm.initramfs import GuestImage, build_guest
from vm.runner import GuestResult
from vm.servers import Nbdcache, NbdkitMemory, NbdServer

_REPORT: list[dict[str, Any]] = []
#: nbdcache counters worth a line in the summary (all are in the JSON report).
REPORTED_COUNTERS = (
    "pages_written_back_total",
    "pages_read_from_image_total",
    "writes_waited_total",
    "write_wait_ms_total",
    "exclusive_releases_total",
    "pages_punched_total",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: boots a Linux guest under qemu that swaps on an NBD export"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def profile() -> profiles.Profile:
    return profiles.current()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Debian's current kernel and the test initramfs (cached between sessions)."""
    return build_guest()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., NbdServer]]:
    """Start a server by kind ("nbdcache" or "nbdkit"); all are stopped at teardown."""
    started: list[NbdServer] = []

    def start(kind: str, size: str, args: list[str] | None = None, **kw: Any) -> NbdServer:
        log = tmp_path / f"{kind}-{len(started)}.log"
        server: NbdServer
        if kind == "nbdcache":
            server = Nbdcache(size, log, args or [], **kw)
        elif kind == "nbdkit":
            server = NbdkitMemory(size, log, args or [])
        else:
            raise ValueError(kind)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Add one guest run to the session report."""

    def add(result: GuestResult, server: NbdServer, **extra: Any) -> None:
        _REPORT.append(
            {
                "test": request.node.nodeid.split("::")[-1],
                "server": server.name,
                **result.summary(),
                **extra,
            }
        )

    return add


def _ratio(runs: list[dict[str, Any]]) -> list[str]:
    """Run-time ratios nbdcache / nbdkit memory for runs of the same scenario."""
    out = []
    peers = [r for r in runs if r["server"] == "nbdkit-memory" and r.get("hog_s")]
    for run in runs:
        if run["server"] != "nbdcache" or not run.get("hog_s"):
            continue
        for peer in peers:
            same = all(
                run.get(k) == peer.get(k)
                for k in ("memory", "hog_mib", "passes", "disk", "discard")
            )
            if same:
                out.append(
                    f"{run['test']}: hog run {run['hog_s']:.1f}s vs nbdkit memory "
                    f"{peer['hog_s']:.1f}s = {run['hog_s'] / peer['hog_s']:.2f}x"
                )
                break
    return out


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORT:
        return
    tr = terminalreporter
    tr.section(f"e2e guest runs (NBDCACHE_E2E={profiles.current().name})")
    cols = (
        "status",
        "boot_s",
        "hog_s",
        "swapoff_s",
        "wall_s",
        "swap_out_mib",
        "swap_in_mib",
    )
    for run in _REPORT:
        fields = " ".join(f"{c}={run.get(c)}" for c in cols)
        tr.write_line(f"{run['test']} [{run['server']}] {fields}")
        for key in (
            "compression_ratio",
            "allocated_at_swapon_mib",
            "allocated_at_hog_exit_mib",
            "image_at_hog_exit_mib",
        ):
            if run.get(key) is not None:
                tr.write_line(f"    {key}={run[key]}")
        counters = run.get("counters") or {}
        shown = [f"{k}={int(counters[k])}" for k in REPORTED_COUNTERS if k in counters]
        if shown:
            tr.write_line("    " + " ".join(shown))
    for line in _ratio(_REPORT):
        tr.write_line(line)
    path = os.environ.get("NBDCACHE_E2E_REPORT")
    if path:
        Path(path).write_text(json.dumps(_REPORT, indent=1) + "\n")
        tr.write_line(f"report written to {path}")
