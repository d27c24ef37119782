"""Sweeps: many lab runs over a grid, one CSV row each, appended as they finish.

A grid is servers x tier x delay x kind. `plan="product"` runs every
combination (the full sweep); `plan="axes"` runs each axis through the
first value of the others (servers at the first delay and tier, delays at
the first server count and tier, tiers for nbdcache at the first server
count and delay): far fewer runs, the same curves. The CSV is written row by
row, so an interrupted sweep keeps what it measured; runs already in the CSV
(same parameters, status ok) are skipped when it is run again.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from . import lab as _lab
from .lab import Lab, Remote, RunSpec

COLUMNS = (
    "kind", "servers", "tier", "delay_ms", "layout", "size", "memory", "hog_mib", "passes",
    "proxy", "status", "hog_errors", "boot_s", "hog_s", "swap_out_mib", "swap_in_mib",
    "swap_mib_s", "wall_s", "started",
)  # fmt: skip
KEY = ("kind", "servers", "tier", "delay_ms", "layout", "memory", "hog_mib", "passes", "proxy")


def grid(
    base: RunSpec,
    servers: Sequence[int],
    tiers: Sequence[str],
    delays: Sequence[float],
    kinds: Sequence[str],
    plan: str = "product",
) -> list[RunSpec]:
    """The runs of a sweep, in order (nbdkit has no tier: one tier value for it)."""
    specs: list[RunSpec] = []

    def add(kind: str, n: int, tier: str, delay: float) -> None:
        spec = replace(
            base, kind=kind, servers=n, tier=tier if kind == "nbdcache" else "-", delay_ms=delay
        )
        if spec not in specs:
            specs.append(spec)

    if plan == "product":
        for kind, n, tier, delay in itertools.product(kinds, servers, tiers, delays):
            add(kind, n, tier, delay)
    elif plan == "axes":
        for kind in kinds:
            for n in servers:
                add(kind, n, tiers[0], delays[0])
            for delay in delays:
                add(kind, servers[0], tiers[0], delay)
            if kind == "nbdcache":
                for tier in tiers:
                    add(kind, servers[0], tier, delays[0])
    else:
        raise ValueError(f"plan {plan!r}: product or axes")
    return specs


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row.get(k)) for k in KEY)


def done_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_sweep(
    specs: Sequence[RunSpec],
    csv_path: Path,
    workdir: Path,
    remotes: Sequence[Remote] = (),
    echo: IO[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run each spec not already in the CSV; yield each new row once written."""
    done = {_key(r) for r in done_rows(csv_path) if r.get("status") == "ok"}
    image = _lab.build_guest()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists()
    for i, spec in enumerate(specs, 1):
        probe = {**spec.__dict__, "kind": "remote" if remotes else spec.kind}
        if _key(probe) in done:
            continue
        name = f"{i:03d}-{spec.kind}-{spec.servers}s-{spec.tier}-{spec.delay_ms}ms"
        with Lab(spec, workdir / name, remotes, echo=None) as lab:
            _result, row = lab.run(image)
        if echo is not None:
            print(
                f"[{i}/{len(specs)}] {name}: {row['status']} hog {row['hog_s']} s, "
                f"{row['swap_mib_s']} MiB/s",
                file=echo,
                flush=True,
            )
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
                new_file = False
            writer.writerow(row)
        yield row
