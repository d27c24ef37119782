"""Sizes of the end-to-end runs: a small form for CI and a full one.

Chosen with the environment variable NBDCACHE_E2E:
  ci    (default) 128 MiB guest, 256 MiB hog: about half a minute per boot
  full  160 MiB guest, 480 MiB hog, two verify passes (pages rewritten in
        between), swap filled past half; a few minutes per boot, and the
        peer server in every scenario
NBDCACHE_E2E_PEER=all runs the peer (nbdkit memory) in every scenario in
either form; NBDCACHE_E2E_PEER=main only in the main one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace


def mib(size: str) -> int:
    """'160M' or '1G' -> MiB."""
    m = re.fullmatch(r"(\d+)([MG])", size)
    if not m:
        raise ValueError(f"size {size!r}: use NNNM or NG")
    return int(m.group(1)) * (1024 if m.group(2) == "G" else 1)


@dataclass(frozen=True)
class Profile:
    name: str
    memory: str  # guest RAM (qemu -m)
    hog_mib: int  # memory the hog allocates and verifies
    passes: int  # hog verify passes
    size: str  # export size = swap size
    ram: str  # nbdcache --ram: smaller than the swap traffic, so writeback happens
    nbd_memory: str  # the guest nbd driver scenario, kept small (it crawls under TCG)
    nbd_hog_mib: int
    nbd_size: str
    timeout: float  # seconds per boot before the guest counts as hung
    peer_everywhere: bool  # also run nbdkit memory in the discard and nbd-driver scenarios

    @property
    def memory_mib(self) -> int:
        return mib(self.memory)


PROFILES = {
    "ci": Profile(
        name="ci",
        memory="128M",
        hog_mib=256,
        passes=1,
        size="512M",
        ram="32M",
        nbd_memory="128M",
        nbd_hog_mib=128,
        nbd_size="256M",
        timeout=300.0,
        peer_everywhere=False,
    ),
    "full": Profile(
        name="full",
        memory="160M",
        hog_mib=480,
        passes=2,
        size="640M",
        ram="64M",
        nbd_memory="128M",
        nbd_hog_mib=192,
        nbd_size="384M",
        timeout=1500.0,
        peer_everywhere=True,
    ),
}


def current() -> Profile:
    name = os.environ.get("NBDCACHE_E2E", "ci").strip().lower() or "ci"
    if name not in PROFILES:
        raise ValueError(f"NBDCACHE_E2E={name!r}: use one of {', '.join(PROFILES)}")
    profile = PROFILES[name]
    peer = os.environ.get("NBDCACHE_E2E_PEER", "").strip().lower()
    if peer:
        if peer not in ("all", "main"):
            raise ValueError(f"NBDCACHE_E2E_PEER={peer!r}: use all or main")
        profile = replace(profile, peer_everywhere=peer == "all")
    return profile
