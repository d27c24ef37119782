"""Build the guest or run one scenario by hand.

    cd tests/e2e
    python -m vm build
    python -m vm run --server nbdcache --memory 128M --hog-mib 256 --discard pages \
        -- --ram 32M --backing /tmp/swap.img
    python -m vm run --server nbdkit --disk nbd --hog-mib 96
    python -m vm run --servers 2 --layout mirror --size 384M --hog-mib 192 -- --ram 32M

Arguments after `--` go to the server (`nbdcache serve` or `nbdkit`); with
--servers N each server gets them (a --backing path gets a suffix .N).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from .initramfs import build_guest
from .runner import DISCARD_MODES, DISKS, GuestConfig, run_guest
from .servers import Nbdcache, NbdkitMemory, NbdServer, allocated_bytes


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(prog="python -m vm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="fetch the kernel and build the initramfs")
    run = sub.add_parser("run", help="boot the guest against a fresh server")
    run.add_argument("--server", choices=("nbdcache", "nbdkit"), default="nbdcache")
    run.add_argument("--size", default="1G", help="export size")
    run.add_argument("--memory", default="160M")
    run.add_argument("--hog-mib", type=int, default=480)
    run.add_argument("--passes", type=int, default=1)
    run.add_argument("--discard", choices=DISCARD_MODES, default="none")
    run.add_argument("--disk", choices=DISKS, default="virtio")
    run.add_argument("--servers", type=int, default=1, help="one virtio disk per server")
    run.add_argument("--layout", choices=("stripe", "mirror"), default="stripe")
    run.add_argument("--metrics", action="store_true", help="nbdcache: --metrics, print stats")
    run.add_argument(
        "--inspect", action="store_true", help="map the export after swapon and after the hog"
    )
    run.add_argument("--quiet", action="store_true", help="do not echo the console")
    run.add_argument("--workdir", type=Path, help="logs go here (default: a temp dir)")
    args = ap.parse_args(argv)

    image = build_guest()
    if args.command == "build":
        print(f"kernel:    {image.kernel.vmlinuz} ({image.kernel.package} {image.kernel.version})")
        print(f"initramfs: {image.initrd}")
        print("modules:   " + " ".join(Path(p).stem for p in image.kernel.load_order))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nbdcache-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    servers: list[NbdServer] = []
    for i in range(args.servers):
        argv = list(server_args)
        if args.servers > 1:
            argv = [
                f"{a}.{i}" if j and argv[j - 1] == "--backing" else a for j, a in enumerate(argv)
            ]
        log = workdir / ("server.log" if args.servers == 1 else f"server{i}.log")
        if args.server == "nbdcache":
            servers.append(Nbdcache(args.size, log, argv, metrics=args.metrics))
        else:
            servers.append(NbdkitMemory(args.size, log, argv))
    server = servers[0]
    config = GuestConfig(
        memory=args.memory,
        hog_mib=args.hog_mib,
        passes=args.passes,
        discard=args.discard,
        disk=args.disk,
        layout="single" if args.servers == 1 else args.layout,
        pause_at=("swapon", "hog-exit") if args.inspect else (),
    )
    inspected: dict[str, float] = {}

    def on_pause(point: str, _result: object) -> None:
        inspected[f"allocated_at_{point}_mib"] = round(allocated_bytes(server.url) / 2**20, 1)

    with contextlib.ExitStack() as stack:
        for each in servers:
            stack.enter_context(each)
        result = run_guest(
            image,
            [each.target for each in servers],
            config,
            console_log=workdir / "console.log",
            echo=None if args.quiet else sys.stderr,
            on_pause=on_pause,
        )
        summary = {"server": server.name, **result.summary(), **inspected}
        summary["allocated_after_mib"] = round(allocated_bytes(server.url) / 2**20, 1)
        if args.metrics and isinstance(server, Nbdcache):
            print(server.stats())
    summary["server_exit"] = server.exit.returncode if server.exit else None
    print(json.dumps(summary, indent=1))
    print(f"logs: {workdir}", file=sys.stderr)
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
