"""The `nbdcache` command line: `serve`, `--version`.

Flags map one-to-one onto the config models (`nbdcache.config`); a flag
wins over the file.  Configuration problems print one line naming the field
and exit 2 before any socket is opened.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

import uvloop

from nbdcache import __version__, config, protocol
from nbdcache.device import Device
from nbdcache.server import Export, NBDServer
from nbdcache.tier.simple import DictStore

log = logging.getLogger("nbdcache")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nbdcache", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"nbdcache {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve exports over NBD")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help="TCP address to listen on (repeatable; IPv6 as [::1]:10809)",
    )
    serve.add_argument("--unix", metavar="PATH", help="also listen on this Unix socket")
    serve.add_argument("--export", metavar="NAME", dest="name", help="export name")
    serve.add_argument("--size", metavar="SIZE", help="export size, e.g. 512M or 4G")
    serve.add_argument(
        "--read-only", action="store_const", const=True, default=None, help="refuse writes"
    )
    serve.add_argument(
        "--log-level", metavar="L", help="debug, info, warning or error (default info)"
    )
    return ap


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    server = {
        k: v
        for k, v in {
            "listen": args.listen,
            "unix": args.unix,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    export = {
        k: v
        for k, v in {"name": args.name, "size": args.size, "read_only": args.read_only}.items()
        if v is not None
    }
    return server, export


def build_exports(cfg: config.Config) -> list[Export]:
    exports = []
    for e in cfg.exports:
        flags = (
            protocol.FLAG_HAS_FLAGS
            | protocol.FLAG_SEND_TRIM
            | protocol.FLAG_SEND_WRITE_ZEROES
            | protocol.FLAG_SEND_FAST_ZERO
            | protocol.FLAG_SEND_CACHE
            | protocol.FLAG_CAN_MULTI_CONN
        )
        if e.read_only:
            flags |= protocol.FLAG_READ_ONLY
        info = protocol.ExportInfo(e.name, e.size, flags, e.description)
        exports.append(Export(info, Device(DictStore(e.size // 4096), e.size)))
    return exports


def _attach_help(host: str, port: int, name: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return (
        f"  nbdinfo nbd://{h}:{port}/{name}\n"
        f"  nbd-client {host} {port} /dev/nbd0 -N {name} -b 4096\n"
        f"  qemu-system-x86_64 ... -drive file=nbd://{h}:{port}/{name},format=raw,if=virtio"
    )


async def _serve(cfg: config.Config) -> None:
    server = NBDServer(
        build_exports(cfg),
        max_inflight_bytes=cfg.server.max_inflight_bytes,
        shutdown_grace=cfg.server.shutdown_grace,
    )
    bound: list[tuple[str, int]] = []
    for item in cfg.server.listen:
        host, port = config.parse_address(item)
        bound += await server.listen_tcp(host, port)
    if cfg.server.unix:
        if os.path.exists(cfg.server.unix):
            os.unlink(cfg.server.unix)
        await server.listen_unix(cfg.server.unix)
    for e in cfg.exports:
        log.info("export %r: %d bytes%s", e.name, e.size, " (read-only)" if e.read_only else "")
    for host, port in bound:
        log.info("listening on %s port %d", host, port)
    if cfg.server.unix:
        log.info("listening on unix socket %s", cfg.server.unix)
    if bound:
        host, port = bound[0]
        log.info("attach with, for example:\n%s", _attach_help(host, port, cfg.exports[0].name))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()
    if cfg.server.unix and os.path.exists(cfg.server.unix):
        os.unlink(cfg.server.unix)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config.load(args.config, *_overrides(args))
    except config.ConfigError as exc:
        print(f"nbdcache: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.server.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        uvloop.run(_serve(cfg))
    except OSError as exc:
        print(f"nbdcache: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
