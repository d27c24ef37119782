"""The lab's command line (run as root from deploy/lab: `python -m nbdlab ...`).

    python -m nbdlab run --servers 2 --kind nbdcache --delay-ms 0.5
    python -m nbdlab serve --servers 2 --delay-ms 2      # servers only, until Ctrl-C
    python -m nbdlab run --remote 192.0.2.10:10809/swap --remote 192.0.2.11:10809/swap
    python -m nbdlab sweep --servers 1,2,4 --delays 0,0.5,2 --tiers 32M --out results/
    python -m nbdlab plot results/sweep.csv
    python -m nbdlab cleanup

SIGINT and SIGTERM end the run the same way as a failure does: every
process the lab started is stopped and every namespace and link removed
before it exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from . import netns
from .lab import Lab, Remote, RunSpec
from .plot import plot
from .sweep import grid, run_sweep

CPU_NOTE = (
    "CPU-bound: guest under qemu TCG (software emulation); servers, proxies and qemu "
    "share one 2-core host"
)


class Interrupted(Exception):
    """SIGTERM (or SIGINT) arrived: unwind, cleaning up on the way."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _add_vm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="384M", help="export size per server")
    p.add_argument("--memory", default="128M", help="guest RAM")
    p.add_argument("--hog-mib", type=int, default=192)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--proxy", action="store_true", help="put the delay proxy in front even at 0 ms")
    p.add_argument(
        "--remote",
        action="append",
        default=[],
        metavar="HOST:PORT[/EXPORT]",
        help="real memory servers instead of namespaces (repeat; one disk each)",
    )


def _add_lab_args(p: argparse.ArgumentParser) -> None:
    """The options of one lab (`run`, `serve`)."""
    p.add_argument("--kind", choices=("nbdcache", "nbdkit"), default="nbdcache")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--tier", default="32M", help="nbdcache --ram per server")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--workdir", type=Path)
    _add_vm_args(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbdlab", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one VM run on N servers")
    _add_lab_args(run)
    run.add_argument("--layout", choices=("stripe", "mirror"), default="stripe")
    _add_lab_args(sub.add_parser("serve", help="start the servers (and proxies), print them, wait"))
    sw = sub.add_parser("sweep", help="runs over servers x tiers x delays x kinds, to CSV")
    sw.add_argument("--servers", type=_ints, default=[1, 2, 4])
    sw.add_argument("--tiers", type=lambda t: t.split(","), default=["32M"])
    sw.add_argument("--delays", type=_floats, default=[0.0, 0.5, 2.0])
    sw.add_argument("--kinds", type=lambda t: t.split(","), default=["nbdcache", "nbdkit"])
    sw.add_argument("--plan", choices=("product", "axes"), default="product")
    sw.add_argument("--out", type=Path, default=Path("results"))
    sw.add_argument("--name", default="sweep", help="CSV and PNG file name stem")
    _add_vm_args(sw)
    pl = sub.add_parser("plot", help="PNG charts of a sweep CSV")
    pl.add_argument("csv", type=Path)
    pl.add_argument("--out", type=Path)
    sub.add_parser("cleanup", help="remove namespaces and links a killed run left behind")
    args = ap.parse_args(argv)

    if args.command == "plot":
        for path in plot(args.csv, args.out or args.csv.parent, CPU_NOTE):
            print(path)
        return 0
    if args.command == "cleanup":
        for what in netns.remove_leftovers():
            print("removed", what)
        return 0

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)  # the terminal went away
    remotes = [Remote.parse(r) for r in args.remote]
    base = RunSpec(
        size=args.size,
        memory=args.memory,
        hog_mib=args.hog_mib,
        passes=args.passes,
        proxy=args.proxy,
    )
    try:
        if args.command in ("serve", "run"):
            spec = dataclasses.replace(
                base,
                kind=args.kind,
                servers=len(remotes) or args.servers,
                tier=args.tier,
                delay_ms=args.delay_ms,
            )
            workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nbdlab-"))
        if args.command == "serve":
            with Lab(spec, workdir, remotes, echo=sys.stderr) as lab:
                for target in lab.targets:
                    print(target.qemu_url(), flush=True)
                print("ready", flush=True)
                while True:
                    signal.pause()
        if args.command == "run":
            spec = dataclasses.replace(spec, layout=args.layout)
            with Lab(spec, workdir, remotes, echo=sys.stderr) as lab:
                result, row = lab.run()
            print(json.dumps(row, indent=1))
            print(f"logs: {workdir}", file=sys.stderr)
            return 0 if result.status == "ok" else 1
        servers = [len(remotes)] if remotes else args.servers
        specs = grid(base, servers, args.tiers, args.delays, args.kinds, args.plan)
        csv_path = args.out / f"{args.name}.csv"
        print(f"{len(specs)} runs -> {csv_path}", file=sys.stderr)
        failed = 0
        for row in run_sweep(specs, csv_path, args.out / "runs", remotes, echo=sys.stderr):
            failed += row["status"] != "ok"
        for path in plot(csv_path, args.out, CPU_NOTE):
            print(path)
        return 1 if failed else 0
    except Interrupted as exc:
        print(f"nbdlab: {exc}: stopped, everything removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
