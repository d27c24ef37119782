"""Assembling an export from its configuration: tier, image, flags.

This is the one place that turns validated config into running parts: the
RAM tier, the backing image and the writeback store in front of it, the
transmission flags the handshake advertises, and the orderly close at
shutdown (a durable export writes back every dirty page first).
"""

from __future__ import annotations

import os
from pathlib import Path

from nbdcache import protocol
from nbdcache.backing import BackingImage, ImageError
from nbdcache.config import Config, ExportConfig
from nbdcache.device import Device
from nbdcache.server import Export
from nbdcache.tier import PAGE_SHIFT, PageStore
from nbdcache.tier.ram import RamTier
from nbdcache.tier.writeback import WritebackPolicy, WritebackStore

__all__ = ["ImageError", "build", "close", "transmission_flags"]


def transmission_flags(e: ExportConfig) -> int:
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
    if e.durability == "durable":
        flags |= protocol.FLAG_SEND_FLUSH | protocol.FLAG_SEND_FUA
    return flags


def _image(cfg: Config, e: ExportConfig) -> BackingImage:
    volatile = e.durability == "volatile"
    if e.backing is not None:
        path = Path(e.backing)
        scratch = False
    else:
        # A volatile export's scratch image: private to this process and
        # unlinked once open, so a crash leaves nothing behind.
        data_dir = Path(cfg.server.data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageError(f"data_dir {data_dir}: {exc.strerror}") from None
        path = data_dir / f"{e.name or 'default'}.{os.getpid()}.img"
        scratch = True
    image = BackingImage(
        path, e.size, volatile=volatile, io_threads=cfg.server.io_threads, preallocate=e.preallocate
    )
    if scratch:
        path.unlink()
    return image


def build(cfg: Config) -> list[Export]:
    """Open every export's store; raises ImageError with an operator's message."""
    exports: list[Export] = []
    try:
        for e in cfg.exports:
            ram = RamTier(
                e.size >> PAGE_SHIFT,
                e.ram_bytes,
                allocator=e.allocator,
                compressor=e.compressor,
                overcommit=not e.has_backing,
            )
            store: PageStore = ram
            if e.has_backing:
                wb = WritebackStore(
                    ram,
                    _image(cfg, e),
                    WritebackPolicy(
                        high=e.writeback_high,
                        low=e.writeback_low,
                        inflight=e.writeback_inflight,
                        exclusive_gets=e.exclusive_gets,
                        durable=e.durability == "durable",
                        wait_timeout=e.writeback_wait,
                        sequential_cutoff=e.sequential_cutoff >> PAGE_SHIFT,
                    ),
                )
                wb.adopt_image(preallocated=e.preallocate)
                store = wb
            info = protocol.ExportInfo(e.name, e.size, transmission_flags(e), e.description)
            exports.append(Export(info, Device(store, e.size)))
    except BaseException:
        for export in exports:
            store = export.device.store
            if isinstance(store, WritebackStore):
                store.image.close()
        raise
    return exports


async def close(exports: list[Export]) -> None:
    """Write back what durability requires, then release images and arenas."""
    for export in exports:
        export.device.close()
        store = export.device.store
        if isinstance(store, WritebackStore):
            await store.close()
            store.ram.close()
        elif isinstance(store, RamTier):
            store.close()
