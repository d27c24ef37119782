"""nbdcopy in both directions between files, ``nbdcache serve`` and an nbdkit peer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

Fixture = Callable[..., Any]

MiB = 1024 * 1024
SIZE = 64 * MiB


def make_image(path: Path) -> None:
    """Random data, with zero MiBs and zero pages, so nbdcopy both copies and skips."""
    with open(path, "wb") as f:
        for i in range(SIZE // MiB):
            if i % 5 == 2:
                f.write(bytes(MiB))
            else:
                buf = bytearray(os.urandom(MiB))
                buf[4096:8192] = bytes(4096)
                f.write(buf)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def sha256_of_export(tool: Fixture, uri: str) -> str:
    """Stream the export through nbdcopy to stdout and hash it."""
    tool("nbdcopy")
    digest = hashlib.sha256()
    total = 0
    with subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(4 * MiB):
            digest.update(block)
            total += len(block)
        assert proc.wait(timeout=120) == 0, "nbdcopy to stdout failed"
    assert total == SIZE, total
    return digest.hexdigest()


def test_file_to_export_and_back(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    tool("nbdcopy")
    server = start_server(size="64M")
    uri = server.uri()
    src = tmp_path / "src.img"
    out = tmp_path / "out.img"
    make_image(src)
    want = sha256_file(src)

    run(["nbdcopy", str(src), uri])
    assert sha256_of_export(tool, uri) == want

    run(["nbdcopy", uri, str(out)])
    assert out.stat().st_size == SIZE
    assert sha256_file(out) == want


def test_many_connections_and_requests(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    """nbdcopy over four connections (CAN_MULTI_CONN) with many requests in flight."""
    tool("nbdcopy")
    server = start_server(size="64M")
    uri = server.uri()
    src = tmp_path / "src.img"
    make_image(src)
    run(["nbdcopy", "--connections=4", "--requests=32", "--request-size=65536", str(src), uri])
    out = tmp_path / "out.img"
    run(["nbdcopy", "--connections=4", "--requests=32", "--request-size=1048576", uri, str(out)])
    assert sha256_file(out) == sha256_file(src)


def test_export_to_export_with_nbdkit_peer(
    start_server: Fixture, nbdkit_memory: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    """nbdcache -> nbdkit memory -> a second nbdcache export: all three hash the same."""
    tool("nbdcopy")
    server = start_server(exports=[{"name": "a", "size": "64M"}, {"name": "b", "size": "64M"}])
    peer = nbdkit_memory("64M")
    src = tmp_path / "src.img"
    make_image(src)
    want = sha256_file(src)
    run(["nbdcopy", str(src), server.uri("a")])
    run(["nbdcopy", server.uri("a"), peer])
    run(["nbdcopy", peer, server.uri("b")])
    assert sha256_of_export(tool, peer) == want
    assert sha256_of_export(tool, server.uri("b")) == want


def test_copy_preserves_sparseness(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    """Copying a mostly empty image leaves the export's empty parts as holes."""
    tool("nbdcopy")
    tool("nbdinfo")
    server = start_server(size="64M")
    uri = server.uri()
    src = tmp_path / "sparse.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(10 * MiB)
        f.write(os.urandom(MiB))
    run(["nbdcopy", str(src), uri])
    out = run(["nbdinfo", "--map", "--totals", "--json", uri]).stdout
    totals = {t["type"]: t["size"] for t in json.loads(out)}
    assert totals.get(0, 0) == MiB, totals
    assert sha256_of_export(tool, uri) == sha256_file(src)
