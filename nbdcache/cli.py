"""The `nbdcache` command line: `serve`, `--version`.

Flags map one-to-one onto the config models (`nbdcache.config`); a flag
wins over the file.  Configuration problems print one line naming the field
and exit 2 before any socket is opened.  SIGHUP re-reads the file (flags
still win) and applies the new certificates and access lists; a bad file is
logged and the running settings stay.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any

import uvloop

from nbdcache import __version__, activation, config, export, memlock, metrics, probe, tls
from nbdcache.limits import Limits
from nbdcache.server import Export, NBDServer

log = logging.getLogger("nbdcache")

DEFAULT_METRICS_URL = "http://127.0.0.1:10810/metrics"


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
    tier = serve.add_argument_group("RAM tier")
    tier.add_argument(
        "--ram", metavar="SIZE", help="arena for compressed pages (default: min(size, 1G))"
    )
    tier.add_argument("--allocator", choices=["zsmalloc", "z3fold", "zbud"])
    tier.add_argument("--compressor", choices=["lz4", "none"])
    wb = serve.add_argument_group("backing image and writeback")
    wb.add_argument("--backing", metavar="FILE", help='image path, or "none" for RAM only')
    wb.add_argument("--durability", choices=["volatile", "durable"])
    wb.add_argument("--exclusive-gets", choices=["off", "lazy", "eager"])
    wb.add_argument(
        "--writeback-high", metavar="F", type=float, help="start at this arena fraction"
    )
    wb.add_argument("--writeback-low", metavar="F", type=float, help="stop at this arena fraction")
    wb.add_argument("--writeback-inflight", metavar="N", type=int, help="pages in flight at most")
    wb.add_argument(
        "--sequential-cutoff",
        metavar="SIZE",
        help="with the arena past --writeback-low, multi-page sequential streams past "
        "this go straight to the image (0: never; default 4M)",
    )
    wb.add_argument(
        "--preallocate",
        action="store_const",
        const=True,
        default=None,
        help="reserve the whole image at start",
    )
    wb.add_argument("--io-threads", metavar="N", type=int, help="image I/O threads per export")
    wb.add_argument("--data-dir", metavar="DIR", help="where scratch images live")
    serve.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus counters here")
    serve.add_argument(
        "--mlock",
        action="store_const",
        const=True,
        default=None,
        help="lock all memory in RAM and set PR_SET_IO_FLUSHER (swap served to this host)",
    )
    sec = serve.add_argument_group("TLS and limits")
    sec.add_argument("--tls", choices=["off", "on", "require"], help="STARTTLS mode (default off)")
    sec.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain)")
    sec.add_argument("--tls-key", metavar="PEM", help="server private key")
    sec.add_argument("--tls-ca", metavar="PEM", help="CA for client certificates (then required)")
    sec.add_argument("--max-connections", metavar="N", type=int, help="in total (default 256)")
    sec.add_argument(
        "--max-connections-per-client", metavar="N", type=int, help="per address (default 64)"
    )
    sec.add_argument(
        "--handshake-timeout", metavar="S", type=float, help="seconds, 0: none (default 30)"
    )
    sec.add_argument("--idle-timeout", metavar="S", type=float, help="seconds, 0: none (default)")
    sec.add_argument(
        "--no-keepalive",
        dest="keepalive",
        action="store_const",
        const=False,
        default=None,
        help="no TCP keepalive",
    )
    sec.add_argument(
        "--max-inflight-requests", metavar="N", type=int, help="per connection (default 1024)"
    )
    stats = sub.add_parser("stats", help="print a running server's counters")
    stats.add_argument("--url", default=DEFAULT_METRICS_URL, help=f"default {DEFAULT_METRICS_URL}")
    probe_ = sub.add_parser("probe", help="complete an NBD handshake (a health check)")
    probe_.add_argument(
        "--connect",
        metavar="HOST:PORT",
        default=os.environ.get("NBDCACHE_PROBE_CONNECT", f"127.0.0.1:{config.DEFAULT_PORT}"),
        help=f"server address (default $NBDCACHE_PROBE_CONNECT, else 127.0.0.1:"
        f"{config.DEFAULT_PORT})",
    )
    probe_.add_argument("--unix", metavar="PATH", help="connect to this Unix socket instead")
    probe_.add_argument("--export", metavar="NAME", default="", help="default: the first")
    probe_.add_argument("--timeout", metavar="S", type=float, default=5.0)
    return ap


_SERVER_FLAGS = (
    "listen",
    "unix",
    "log_level",
    "io_threads",
    "data_dir",
    "metrics",
    "tls",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "max_connections",
    "max_connections_per_client",
    "handshake_timeout",
    "idle_timeout",
    "keepalive",
    "max_inflight_requests",
    "mlock",
)
_EXPORT_FLAGS = {
    "name": "name",
    "size": "size",
    "read_only": "read_only",
    "ram": "ram",
    "allocator": "allocator",
    "compressor": "compressor",
    "backing": "backing",
    "durability": "durability",
    "exclusive_gets": "exclusive_gets",
    "writeback_high": "writeback_high",
    "writeback_low": "writeback_low",
    "writeback_inflight": "writeback_inflight",
    "sequential_cutoff": "sequential_cutoff",
    "preallocate": "preallocate",
}


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    opts = vars(args)
    server = {k: opts[k] for k in _SERVER_FLAGS if opts.get(k) is not None}
    export = {v: opts[k] for k, v in _EXPORT_FLAGS.items() if opts.get(k) is not None}
    return server, export


def _attach_help(host: str, port: int, name: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return (
        f"  nbdinfo nbd://{h}:{port}/{name}\n"
        f"  nbd-client {host} {port} /dev/nbd0 -N {name} -b 4096\n"
        f"  qemu-system-x86_64 ... -drive file=nbd://{h}:{port}/{name},format=raw,if=virtio"
    )


def _tls_context(cfg: config.Config) -> ssl.SSLContext | None:
    s = cfg.server
    if s.tls == "off":
        return None
    assert s.tls_cert is not None and s.tls_key is not None
    return tls.server_context(s.tls_cert, s.tls_key, s.tls_ca)


def _access(cfg: config.Config) -> dict[str, tls.AccessList]:
    return {e.name: tls.AccessList.build(e.allowed_names, e.allowed_networks) for e in cfg.exports}


def _reload(server: NBDServer, load: Callable[[], config.Config]) -> None:
    """SIGHUP: new certificates and access lists; the rest needs a restart."""
    try:
        cfg = load()
        ctx = _tls_context(cfg)
    except (config.ConfigError, tls.TLSConfigError) as exc:
        log.error("reload failed, keeping the running settings: %s", exc)
        return
    # Access lists belong to a TLS mode and to exports: a file that changes
    # either is refused whole, or an export could lose its rules unnoticed.
    if cfg.server.tls != server.tls_mode:
        log.error(
            "reload refused, keeping the running settings: tls = %s needs a restart "
            "(running with %s)",
            cfg.server.tls,
            server.tls_mode,
        )
        return
    names = {e.name for e in cfg.exports}
    if names != set(server.by_name):
        log.error(
            "reload refused, keeping the running settings: adding or removing exports "
            "needs a restart (file: %s; running: %s)",
            ", ".join(sorted(names)),
            ", ".join(sorted(server.by_name)),
        )
        return
    server.reload(ctx, _access(cfg))
    log.info("reloaded certificates and access lists")


async def _serve(
    cfg: config.Config,
    exports: list[Export],
    inherited: list[socket.socket],
    load: Callable[[], config.Config],
) -> None:
    s = cfg.server
    server = NBDServer(
        exports,
        max_inflight_bytes=cfg.server.max_inflight_bytes,
        shutdown_grace=cfg.server.shutdown_grace,
        limits=Limits(
            max_connections=s.max_connections,
            max_connections_per_client=s.max_connections_per_client,
            handshake_timeout=s.handshake_timeout,
            idle_timeout=s.idle_timeout,
            keepalive=s.keepalive,
            max_inflight_requests=s.max_inflight_requests,
        ),
        tls_mode=s.tls,
        ssl_context=_tls_context(cfg),
        access=_access(cfg),
    )
    bound: list[tuple[str, int]] = []
    # Socket activation: the launcher's sockets replace listen and unix.
    unix = None if inherited else cfg.server.unix
    for sock in inherited:
        await server.listen_socket(sock)
        if sock.family != socket.AF_UNIX:
            bound.append(sock.getsockname()[:2])
    for item in () if inherited else cfg.server.listen:
        host, port = config.parse_address(item)
        bound += await server.listen_tcp(host, port)
    if unix:
        if os.path.exists(unix):
            os.unlink(unix)
        await server.listen_unix(unix)
    metrics_server = None
    if cfg.server.metrics:
        host, port = config.parse_address(cfg.server.metrics)
        collector = metrics.StatsCollector(
            {e.info.name: e.device.store.stats for e in exports}, server.stats
        )
        metrics_server = await metrics.serve_metrics(collector, host, port)
        log.info("metrics on http://%s:%d/metrics", host, port)
    for e in cfg.exports:
        log.info(
            "export %r: %s, RAM tier %s (%s, %s), %s%s",
            e.name,
            _size(e.size),
            _size(e.ram_bytes),
            e.allocator,
            e.compressor,
            f"backing image {e.backing or 'scratch'} ({e.durability})"
            if e.has_backing
            else "no backing image",
            " read-only" if e.read_only else "",
        )
    if s.tls != "off":
        log.info(
            "TLS %s (client certificates %s)",
            s.tls,
            "required" if s.tls_ca else "not requested",
        )
    for sock in inherited:
        log.info("listening on %s (socket activation)", activation.describe(sock))
    for host, port in () if inherited else bound:
        log.info("listening on %s port %d", host, port)
    if unix:
        log.info("listening on unix socket %s", unix)
    if bound:
        host, port = bound[0]
        log.info("attach with, for example:\n%s", _attach_help(host, port, cfg.exports[0].name))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, server, load)
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()
    await export.close(exports)
    if metrics_server is not None:
        metrics_server.close()
    if unix and os.path.exists(unix):
        os.unlink(unix)


def _size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _stats(url: str) -> int:
    try:
        table = metrics.fetch(url)
    except OSError as exc:
        print(f"nbdcache: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    print(metrics.format_table(table))
    return 0


def _probe(args: argparse.Namespace) -> int:
    address: str | tuple[str, int]
    if args.unix:
        address = args.unix
    else:
        try:
            address = config.parse_address(args.connect)
        except ValueError as exc:
            print(f"nbdcache: --connect: {exc}", file=sys.stderr)
            return 2
    try:
        result = probe.probe(address, args.export, args.timeout)
    except (OSError, probe.ProbeError) as exc:
        print(f"nbdcache: probe {args.unix or args.connect}: {exc}", file=sys.stderr)
        return 1
    print(f"export {result.export!r}: {result.size} bytes, flags {result.flags:#x}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "stats":
        return _stats(args.url)
    if args.command == "probe":
        return _probe(args)

    def load() -> config.Config:
        return config.load(args.config, *_overrides(args))

    try:
        cfg = load()
        _tls_context(cfg)  # certificates are checked before anything starts
    except (config.ConfigError, tls.TLSConfigError) as exc:
        print(f"nbdcache: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.server.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )

    try:
        inherited = activation.listen_sockets()
    except activation.ActivationError as exc:
        print(f"nbdcache: socket activation: {exc}", file=sys.stderr)
        return 2
    if memlock.keep_heap():
        log.debug("malloc: buffers up to %d MiB from the heap", memlock.HEAP_BUFFER_MAX >> 20)
    if cfg.server.mlock:
        # Before any thread is started: threads inherit the flag.
        refused = memlock.prepare_threads()
        if refused:
            log.warning("PR_SET_IO_FLUSHER not set (%s); going on without it", refused)
        else:
            log.info("PR_SET_IO_FLUSHER set")

    async def run() -> None:
        # Images are opened (and locked) inside the loop, before any socket.
        exports = export.build(cfg)
        try:
            if cfg.server.mlock:
                # After the arenas are mapped, so MCL_CURRENT checks the limit
                # against them now rather than a later allocation failing.
                memlock.lock_all()
                log.info("memory locked: %d MiB", memlock.locked_bytes() >> 20)
            await _serve(cfg, exports, inherited, load)
        except BaseException:
            await export.close(exports)
            raise

    try:
        uvloop.run(run())
    except export.ImageError as exc:
        print(f"nbdcache: {exc}", file=sys.stderr)
        return 2
    except memlock.MemoryLockError as exc:
        print(f"nbdcache: {exc}", file=sys.stderr)
        return 2  # a setting to change, not a failure to retry
    except OSError as exc:
        print(f"nbdcache: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
