"""A real Linux kernel swaps on the export, and every page comes back intact.

Each test boots Debian's kernel under qemu (software emulation) with less
RAM than a memory hog allocates; the hog fills every page with content
derived from its index (zero, same-filled, text-like and random pages),
reads it all back and verifies it, so the kernel must swap out to the NBD
export and in again. The guest prints its verdict and /proc/vmstat's swap
counters on the serial console; the tests read them from there.

Scenarios:
- swap on nbdcache with a RAM tier smaller than the swap traffic, in each
  exclusive-gets mode, and on `nbdkit memory` (the peer, for run times);
- `swapon --discard=pages`: freed swap is trimmed, so once the hog exits
  the server holds little more than what the kernel still uses;
- `swapon --discard=once`: the whole device is trimmed at swapon;
- the guest kernel's own nbd driver attached with `nbd-client -b 4096`;
- deploy/attach-swap.sh and detach-swap.sh run in the guest as users run them.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vm.initramfs import GuestImage, build_guest
from vm.profiles import Profile, current
from vm.runner import GuestConfig, GuestResult, run_guest
from vm.servers import Nbdcache, NbdServer, allocated_bytes

MiB = 1 << 20
PAGE = 4096

PROFILE = current()
# Each test boots once (twice at most); the guest itself times out first.
pytestmark = pytest.mark.timeout(PROFILE.timeout + 600)
# The peer runs in every scenario in the full form, in the main one in CI.
EVERYWHERE = [
    pytest.param("nbdcache", id="nbdcache"),
    *([pytest.param("nbdkit", id="nbdkit-memory")] if PROFILE.peer_everywhere else []),
]


def image_bytes(path: Path) -> int:
    """Bytes allocated in the (sparse) backing image."""
    return path.stat().st_blocks * 512 if path.exists() else 0


def server_counters(server: NbdServer) -> dict[str, Any]:
    """nbdcache's counters once its background work has caught up, for the
    assertions and the report: the stats table and the raw values."""
    if not isinstance(server, Nbdcache) or server.metrics_port is None:
        return {}
    counters = server.settle()
    out: dict[str, Any] = {"counters": counters, "stats": server.stats()}
    # zram's mm_stat names: bytes of the pages in RAM before / after compression.
    if counters.get("compr_data_size"):
        out["compression_ratio"] = round(
            counters["orig_data_size"] / counters["compr_data_size"], 2
        )
    return out


#: nbdcache's page counters: every page that is not a hole is one of these.
HELD_PAGE_COUNTERS = ("pages_stored", "disk_pages", "same_pages", "zero_pages")


def nbdcache_args(profile: Profile, tmp_path: Path, exclusive_gets: str = "off") -> list[str]:
    """A RAM tier smaller than the swap traffic, so pages are written back to the image."""
    return [
        "--ram", profile.ram,
        "--backing", str(tmp_path / "swap.img"),
        "--exclusive-gets", exclusive_gets,
    ]  # fmt: skip


def start(
    start_server: Callable[..., NbdServer],
    kind: str,
    size: str,
    tmp_path: Path,
    profile: Profile,
    exclusive_gets: str = "off",
) -> NbdServer:
    if kind == "nbdcache":
        return start_server(
            kind, size, nbdcache_args(profile, tmp_path, exclusive_gets), metrics=True
        )
    return start_server(kind, size)


def assert_verified(result: GuestResult, config: GuestConfig) -> None:
    """The guest ran the hog to the end, every page verified, and it really swapped."""
    assert result.status == "ok", result.describe_failure()
    hog = result.hog
    assert hog.get("result") == "ok", result.describe_failure()
    assert int(hog["errors"]) == 0, result.describe_failure()
    assert int(hog["pages"]) == config.hog_mib * MiB // PAGE
    traffic = result.swap_traffic("after-hog")
    assert traffic["oom_kill"] == 0, result.describe_failure()
    # The hog's memory cannot fit in the guest's RAM: at least the excess
    # went out to swap, and came back in to be verified.
    excess_pages = (config.hog_mib - config.memory_mib) * MiB // PAGE
    assert traffic["pswpout"] >= excess_pages, traffic
    assert traffic["pswpin"] >= excess_pages, traffic


def assert_clean_exit(server: NbdServer) -> None:
    exit_ = server.stop()
    assert exit_.returncode == 0, f"{server.name} did not exit cleanly:\n{server.log_tail()}"


@pytest.mark.parametrize(
    ("kind", "exclusive_gets"),
    [
        pytest.param("nbdcache", "off", id="nbdcache-off"),
        pytest.param("nbdcache", "lazy", id="nbdcache-lazy"),
        pytest.param("nbdcache", "eager", id="nbdcache-eager"),
        pytest.param("nbdkit", None, id="nbdkit-memory"),
    ],
)
def test_swap_verifies_every_page(
    guest_image: GuestImage,
    profile: Profile,
    start_server: Callable[..., NbdServer],
    record: Callable[..., None],
    tmp_path: Path,
    kind: str,
    exclusive_gets: str | None,
) -> None:
    server = start(start_server, kind, profile.size, tmp_path, profile, exclusive_gets or "off")
    config = GuestConfig(
        memory=profile.memory,
        hog_mib=profile.hog_mib,
        passes=profile.passes,
        timeout=profile.timeout,
        pause_at=("hog-exit",),
    )
    seen: dict[str, Any] = {}

    def at_hog_exit(point: str, _result: GuestResult) -> None:
        seen["counters"] = server_counters(server)
        seen["image"] = image_bytes(tmp_path / "swap.img")

    result = run_guest(
        guest_image, server.target, config, tmp_path / "console.log", on_pause=at_hog_exit
    )
    counters = seen.get("counters", {})
    record(
        result,
        server,
        exclusive_gets=exclusive_gets,
        image_at_hog_exit_mib=round(seen.get("image", 0) / MiB, 1) if kind == "nbdcache" else None,
        compression_ratio=counters.get("compression_ratio"),
        counters=counters.get("counters"),
        stats=counters.get("stats"),
    )
    assert server.alive(), f"{server.name} died:\n{server.log_tail()}"
    assert_verified(result, config)
    if kind == "nbdcache":
        # The tier is smaller than what the guest swapped out: pages went to the image.
        assert seen["image"] > 0, "nothing was written back to the backing image"
    assert_clean_exit(server)


def discard_bound(result: GuestResult, config: GuestConfig) -> int:
    """The most a server may hold once the hog has exited, with --discard=pages.

    The kernel still uses some swap then (pages it swapped in and keeps in
    its swap cache), and each such slot keeps its whole cluster from being
    freed and trimmed. Everything else was trimmed. Without discard the
    server would still hold nearly everything the hog pushed out (at least
    its excess over the guest's RAM, less the zero pages); the bound allows
    what the kernel uses plus a third of what went out to swap (or of the
    hog's excess, if larger) for partly used clusters.
    """
    swap = result.event("swap")
    assert swap is not None, result.describe_failure()
    still_used = int(swap[1]["used_kib"]) * 1024
    excess = (config.hog_mib - config.memory_mib) * MiB
    swapped_out = result.swap_traffic("after-hog")["pswpout"] * PAGE
    return still_used + max(excess, swapped_out) // 3


@pytest.mark.parametrize("kind", EVERYWHERE)
def test_discard_pages_gives_freed_swap_back(
    guest_image: GuestImage,
    profile: Profile,
    start_server: Callable[..., NbdServer],
    record: Callable[..., None],
    tmp_path: Path,
    kind: str,
) -> None:
    server = start(start_server, kind, profile.size, tmp_path, profile)
    config = GuestConfig(
        memory=profile.memory,
        hog_mib=profile.hog_mib,
        passes=profile.passes,
        discard="pages",
        timeout=profile.timeout,
        pause_at=("hog-exit",),
    )
    seen: dict[str, Any] = {}

    def at_hog_exit(point: str, result: GuestResult) -> None:
        seen["counters"] = server_counters(server)  # first: waits for nbdcache to settle
        seen["allocated"] = allocated_bytes(server.url)
        seen["image"] = image_bytes(tmp_path / "swap.img")

    result = run_guest(
        guest_image, server.target, config, tmp_path / "console.log", on_pause=at_hog_exit
    )
    counters = seen.get("counters", {})
    record(
        result,
        server,
        allocated_at_hog_exit_mib=round(seen.get("allocated", -1) / MiB, 1),
        image_at_hog_exit_mib=round(seen.get("image", 0) / MiB, 1) if kind == "nbdcache" else None,
        compression_ratio=counters.get("compression_ratio"),
        counters=counters.get("counters"),
    )
    assert_verified(result, config)
    bound = discard_bound(result, config)
    assert seen["allocated"] <= bound, (
        f"server still holds {seen['allocated'] / MiB:.1f} MiB after the hog exited "
        f"(bound {bound / MiB:.1f} MiB)\n{result.describe_failure()}"
    )
    if kind == "nbdcache":
        # The tier and the image hold no more than that either.
        assert seen["image"] <= bound, f"image holds {seen['image'] / MiB:.1f} MiB"
        counters = seen["counters"]["counters"]
        held = {name: int(counters[name]) for name in HELD_PAGE_COUNTERS}
        assert sum(held.values()) * PAGE <= bound, (held, bound // PAGE)
    assert_clean_exit(server)


def prefill(url: str, size_bytes: int) -> None:
    """Write a pattern over the whole export (data the kernel must trim)."""
    qemu_io = shutil.which("qemu-io")
    assert qemu_io, "qemu-io not found (apt-get install qemu-utils)"
    subprocess.run(
        [qemu_io, "-f", "raw", "-c", f"write -P 0x5a 0 {size_bytes}", url],
        check=True,
        capture_output=True,
        timeout=600,
    )


def export_size(url: str) -> int:
    out = subprocess.run(
        ["nbdinfo", "--size", url], capture_output=True, text=True, check=True
    ).stdout
    return int(out.strip())


@pytest.mark.parametrize("kind", EVERYWHERE)
def test_discard_once_trims_whole_device_at_swapon(
    guest_image: GuestImage,
    profile: Profile,
    start_server: Callable[..., NbdServer],
    record: Callable[..., None],
    tmp_path: Path,
    kind: str,
) -> None:
    server = start(start_server, kind, profile.size, tmp_path, profile)
    size = export_size(server.url)
    prefill(server.url, size)
    assert allocated_bytes(server.url) == size  # precondition: every byte is data
    # The point is the trim at swapon; a smaller hog still swaps after it.
    config = GuestConfig(
        memory=profile.memory,
        hog_mib=min(profile.hog_mib, profile.memory_mib + 64),
        passes=1,
        discard="once",
        timeout=profile.timeout,
        pause_at=("swapon",),
    )
    seen: dict[str, int] = {}

    def at_swapon(point: str, result: GuestResult) -> None:
        seen["allocated"] = allocated_bytes(server.url)

    result = run_guest(
        guest_image, server.target, config, tmp_path / "console.log", on_pause=at_swapon
    )
    record(result, server, allocated_at_swapon_mib=round(seen.get("allocated", -1) / MiB, 2))
    assert "allocated" in seen, result.describe_failure()
    # Only the swap header (the first page, written by mkswap) is left.
    assert seen["allocated"] <= 64 * 1024, f"{seen['allocated']} bytes left after swapon"
    assert_verified(result, config)
    assert_clean_exit(server)


@pytest.mark.skipif(
    PROFILE.name != "full",
    reason="the guest nbd driver stalls now and then under emulation on a loaded host "
    "(hung kworker, no server error): runs with NBDCACHE_E2E=full; "
    "test_attach_scripts_in_guest covers the same driver in CI",
)
@pytest.mark.parametrize("kind", EVERYWHERE)
def test_guest_nbd_driver_swaps(
    guest_image: GuestImage,
    profile: Profile,
    start_server: Callable[..., NbdServer],
    record: Callable[..., None],
    tmp_path: Path,
    kind: str,
) -> None:
    """nbd.ko + nbd-client -b 4096 in the guest, over qemu's user-mode network."""
    server = start(start_server, kind, profile.nbd_size, tmp_path, profile)
    config = GuestConfig(
        memory=profile.nbd_memory,
        hog_mib=profile.nbd_hog_mib,
        passes=1,
        disk="nbd",
        discard="pages",
        timeout=profile.timeout,
    )
    result = run_guest(guest_image, server.target, config, tmp_path / "console.log")
    record(result, server)
    assert result.event("nbd-client") is not None, result.describe_failure()
    assert result.disk.get("dev") == "/dev/nbd0", result.describe_failure()
    assert result.disk.get("logical_block_size") == "4096", result.disk
    assert_verified(result, config)
    assert_clean_exit(server)


REPO = Path(__file__).resolve().parents[2]
ATTACH = REPO / "deploy" / "attach-swap.sh"
DETACH = REPO / "deploy" / "detach-swap.sh"


@pytest.mark.skipif(
    not (ATTACH.exists() and DETACH.exists()), reason="deploy/attach-swap.sh not written yet"
)
@pytest.mark.parametrize("kind", EVERYWHERE)
def test_attach_scripts_in_guest(
    profile: Profile,
    start_server: Callable[..., NbdServer],
    record: Callable[..., None],
    tmp_path: Path,
    kind: str,
) -> None:
    """deploy/attach-swap.sh and detach-swap.sh, run as root in the guest the way users do."""
    image = build_guest(
        {
            "/usr/local/sbin/attach-swap.sh": ATTACH,
            "/usr/local/sbin/detach-swap.sh": DETACH,
        }
    )
    server = start(start_server, kind, profile.nbd_size, tmp_path, profile)
    config = GuestConfig(
        memory=profile.nbd_memory,
        hog_mib=profile.nbd_hog_mib,
        passes=1,
        disk="attach",
        attach_args=("--priority", "7"),
        timeout=profile.timeout,
        pause_at=("hog-exit",),
    )
    seen: dict[str, int] = {}

    def at_hog_exit(point: str, result: GuestResult) -> None:
        seen["allocated"] = allocated_bytes(server.url)

    result = run_guest(image, server.target, config, tmp_path / "console.log", on_pause=at_hog_exit)
    record(result, server, allocated_at_hog_exit_mib=round(seen.get("allocated", -1) / MiB, 1))
    failure = result.describe_failure()
    # Refused when not root, and when the device is already attached.
    nonroot = result.event("attach-nonroot")
    assert nonroot is not None and nonroot[1]["status"] != "0", failure
    assert nonroot[1]["swaps"] == "0", failure
    again = result.event("attach-again")
    assert again is not None and again[1]["status"] != "0", failure
    assert again[1]["swaps"] == "1", failure
    # Attached with 4 KiB blocks at the asked priority, swapping, every page verified.
    assert result.disk.get("dev", "").startswith("/dev/nbd"), failure
    assert result.disk.get("logical_block_size") == "4096", result.disk
    swaps = result.event("swaps")
    assert swaps is not None and swaps[1]["priority"] == "7", failure
    assert_verified(result, config)
    # --discard=pages: what the hog freed was trimmed.
    bound = discard_bound(result, config)
    assert seen["allocated"] <= bound, f"{seen['allocated'] / MiB:.1f} MiB still allocated"
    # detach-swap.sh: refused when not root; as root, swap off and the device released.
    detach_nonroot = result.event("detach-nonroot")
    assert detach_nonroot is not None and detach_nonroot[1]["status"] != "0", failure
    detached = result.event("detached")
    assert detached is not None, failure
    assert detached[1]["swaps"] == "0" and detached[1]["size_bytes"] == "0", failure
    assert_clean_exit(server)
