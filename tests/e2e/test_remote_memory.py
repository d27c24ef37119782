"""Swap spread over several nbdcache servers: striped, and mirrored through a failure.

The guest gets one virtio disk per server (qemu's NBD client, no
reconnect: a dead server fails its requests with EIO at once).

- Striped: one swap area per server at the same priority; the kernel hands
  out swap clusters from them in turn, so both servers hold part of the
  hog's pages, and every page verifies.
- Mirrored: md RAID1 over two servers, swap on /dev/md0. Once the hog has
  filled its memory (and pushed at least its excess over the guest's RAM out
  to swap), the second server is killed with SIGKILL. md fails that member
  on its first I/O error and goes on with the other; the hog reads every
  page back from the survivor and verifies it. Then a fresh server is
  hotplugged as a new disk, `mdadm --add` puts it in the mirror and md
  resyncs it: the mirror is whole again.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_swap import PAGE, MiB, assert_clean_exit, assert_verified, nbdcache_args
from vm.initramfs import GuestImage, build_guest
from vm.profiles import Profile, current
from vm.runner import ConsoleLine, GuestConfig, GuestResult, run_guest
from vm.servers import NbdServer, allocated_bytes

PROFILE = current()
pytestmark = pytest.mark.timeout(PROFILE.timeout + 600)


def mirror_size(profile: Profile) -> str:
    """Swap size of the mirror: md resyncs all of it after the re-add, so small in CI."""
    return "384M" if profile.name == "ci" else profile.size


def start_nbdcache(
    start_server: Callable[..., NbdServer], profile: Profile, size: str, directory: Path
) -> NbdServer:
    """An nbdcache server whose backing image lives in `directory` (created here)."""
    directory.mkdir()
    return start_server("nbdcache", size, nbdcache_args(profile, directory))


def test_striped_swap_over_two_servers(
    guest_image: GuestImage,
    profile: Profile,
    start_server: Callable[..., NbdServer],
    record: Callable[..., None],
    tmp_path: Path,
) -> None:
    servers = [
        start_nbdcache(start_server, profile, profile.size, tmp_path / f"s{i}") for i in range(2)
    ]
    config = GuestConfig(
        memory=profile.memory,
        hog_mib=profile.hog_mib,
        passes=profile.passes,
        layout="stripe",
        timeout=profile.timeout,
        pause_at=("hog-exit",),
    )
    held: list[int] = []

    def at_hog_exit(point: str, _result: GuestResult) -> None:
        held.extend(allocated_bytes(server.url) for server in servers)

    result = run_guest(
        guest_image,
        [s.target for s in servers],
        config,
        tmp_path / "console.log",
        on_pause=at_hog_exit,
    )
    record(
        result,
        servers[0],
        layout="stripe",
        servers=2,
        allocated_at_hog_exit_mib=[round(b / MiB, 1) for b in held],
    )
    failure = result.describe_failure()
    swaps = [fields for _, fields in result.events("swaps")]
    assert [s["dev"] for s in swaps] == ["/dev/vda", "/dev/vdb"], failure
    assert {s["priority"] for s in swaps} == {"10"}, failure
    assert_verified(result, config)
    # The kernel spread the pages: each server holds a good share of the
    # hog's excess over the guest's RAM (the rest of the hog was resident).
    excess = (config.hog_mib - config.memory_mib) * MiB
    assert len(held) == 2, failure
    for server, nbytes in zip(servers, held, strict=True):
        assert nbytes >= excess // 4, f"{server.url} holds only {nbytes / MiB:.1f} MiB"
    for server in servers:
        assert_clean_exit(server)


def test_mirror_survives_a_killed_server_and_resyncs_a_fresh_one(
    guest_image: GuestImage,
    profile: Profile,
    start_server: Callable[..., NbdServer],
    record: Callable[..., None],
    tmp_path: Path,
) -> None:
    size = mirror_size(profile)

    survivor, victim = (
        start_nbdcache(start_server, profile, size, tmp_path / name) for name in "ab"
    )
    config = GuestConfig(
        memory=profile.memory,
        hog_mib=profile.hog_mib,
        passes=profile.passes,
        layout="mirror",
        readd=True,
        timeout=profile.timeout,
    )
    killed: dict[str, Any] = {}
    fresh: list[NbdServer] = []

    def kill_after_fill(line: ConsoleLine, _result: GuestResult) -> None:
        # The hog has written all its pages: the excess is out in swap, on
        # both members. From here on it reads them back.
        if line.text.startswith("HOG phase=fill") and not killed:
            assert victim.proc is not None
            # What the victim holds now: a mirror that had dropped it already
            # would have stopped writing to it.
            killed["victim_bytes"] = allocated_bytes(victim.url)
            victim.proc.send_signal(signal.SIGKILL)
            killed["t"] = line.t
            killed["pswpout"] = int(line.text.split("pswpout=")[1].split()[0])

    def at_readd(point: str, result: GuestResult) -> None:
        if point == "readd":
            server = start_nbdcache(start_server, profile, size, tmp_path / "fresh")
            fresh.append(server)
            result.hotplug(server.target)

    result = run_guest(
        guest_image,
        [survivor.target, victim.target],
        config,
        tmp_path / "console.log",
        on_pause=at_readd,
        on_line=kill_after_fill,
    )
    degraded = result.md("after-hog")
    resynced = result.md("resynced")
    record(
        result,
        survivor,
        layout="mirror",
        servers=2,
        killed_at_s=round(killed.get("t", -1), 1),
        swapped_out_at_kill_mib=round(killed.get("pswpout", 0) * PAGE / MiB, 1),
        md_after_kill=degraded,
        md_resynced=resynced,
        mdstat=result.mdstat,
    )
    failure = result.describe_failure()
    assert killed, "the hog never finished its fill phase\n" + failure
    assert victim.stop().returncode == -signal.SIGKILL
    # Killed once the hog's excess over the guest's RAM was out in swap.
    excess_pages = (config.hog_mib - config.memory_mib) * MiB // PAGE
    assert killed["pswpout"] >= excess_pages, killed
    # Both members took the swap writes until then.
    assert killed["victim_bytes"] >= excess_pages * PAGE // 2, killed
    # Every page verified, read back from the surviving member.
    assert_verified(result, config)
    # md failed the dead member and ran degraded.
    assert result.md("created").get("degraded") == "0", failure
    assert degraded.get("degraded") == "1", failure
    members = dict(m.split(":", 1) for m in degraded["members"].split(","))
    assert members["vda"] == "in_sync", members
    assert "faulty" in members["vdb"].split("+"), members
    assert any("[2/1] [U_]" in line for line in result.mdstat), result.mdstat
    # The fresh server was added and resynced: the mirror is whole again.
    assert len(fresh) == 1, failure
    assert resynced.get("degraded") == "0", failure
    members = dict(m.split(":", 1) for m in resynced["members"].split(","))
    assert members == {"vda": "in_sync", "vdc": "in_sync"}, members
    # The resync copied the swap area to the fresh server.
    assert allocated_bytes(fresh[0].url) > 0
    assert_clean_exit(survivor)
    assert_clean_exit(fresh[0])


REPO = Path(__file__).resolve().parents[2]
ATTACH = REPO / "deploy" / "attach-swap.sh"
DETACH = REPO / "deploy" / "detach-swap.sh"


@pytest.mark.skipif(
    PROFILE.name != "full",
    reason="two more boots on the guest's nbd driver: NBDCACHE_E2E=full "
    "(test_attach_scripts_in_guest covers the scripts' single-target path in CI)",
)
@pytest.mark.parametrize("mode", ["stripe", "mirror"])
def test_attach_scripts_stripe_and_mirror(
    profile: Profile,
    start_server: Callable[..., NbdServer],
    record: Callable[..., None],
    tmp_path: Path,
    mode: str,
) -> None:
    """attach-swap.sh --stripe / --mirror over two servers, and detach-swap.sh, in the guest."""
    image = build_guest(
        {"/usr/local/sbin/attach-swap.sh": ATTACH, "/usr/local/sbin/detach-swap.sh": DETACH}
    )
    servers = [
        start_nbdcache(start_server, profile, profile.nbd_size, tmp_path / f"s{i}")
        for i in range(2)
    ]
    config = GuestConfig(
        memory=profile.nbd_memory,
        hog_mib=profile.nbd_hog_mib,
        passes=1,
        disk="attach",
        layout=mode,
        attach_args=(f"--{mode}",),
        timeout=profile.timeout,
    )
    result = run_guest(image, [s.target for s in servers], config, tmp_path / "console.log")
    record(result, servers[0], layout=f"attach-{mode}", servers=2)
    failure = result.describe_failure()
    nonroot = result.event("attach-nonroot")
    assert nonroot is not None and nonroot[1]["status"] != "0", failure
    # A target that does not answer refuses the whole attach, before any change.
    unreachable = result.event("attach-unreachable")
    assert unreachable is not None and unreachable[1]["status"] == "1", failure
    assert unreachable[1]["swaps"] == "0" and unreachable[1]["nbd_attached"] == "0", failure
    again = result.event("attach-again")
    assert again is not None and again[1]["status"] != "0", failure
    swaps = [fields for _, fields in result.events("swaps")]
    if mode == "stripe":
        assert [s["dev"] for s in swaps] == ["/dev/nbd0", "/dev/nbd1"], failure
        assert {s["priority"] for s in swaps} == {"10"}, failure
    else:
        assert [s["dev"] for s in swaps] == ["/dev/md0"], failure
        md = result.md("after-hog")
        assert md.get("degraded") == "0", failure
        assert md.get("members") == "nbd0:in_sync,nbd1:in_sync", failure
    assert_verified(result, config)
    detached = result.event("detached")
    assert detached is not None, failure
    assert detached[1] == {"swaps": "0", "size_bytes": "0", "md_arrays": "0"}, failure
    for server in servers:
        assert_clean_exit(server)
