"""An export served on a Unix socket and used through ``nbd+unix://``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Fixture = Callable[..., Any]

MiB = 1024 * 1024


def test_nbdinfo_over_unix_socket(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    tool("nbdinfo")
    server = start_server(size="64M", unix=True)
    info = json.loads(run(["nbdinfo", "--json", server.unix_uri()]).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == 64 * MiB
    assert export["can_multi_conn"] is True
    assert info["structured"] is True


def test_qemu_io_over_unix_socket_shares_store_with_tcp(
    start_server: Fixture, run: Fixture, tool: Fixture, nbdsh: Fixture
) -> None:
    tool("qemu-io")
    server = start_server(size="64M", unix=True)
    run(["qemu-io", "-f", "raw", server.unix_uri(), "-c", "write -P 0x7e 12345 50000"])
    run(
        [
            "qemu-io",
            "-f",
            "raw",
            server.unix_uri(),
            "-c",
            "read -P 0x7e 12345 50000",
            "-c",
            "read -P 0 0 12345",
        ]
    )
    # the same export over TCP sees the data; a write over TCP is seen over the socket
    nbdsh(server.uri(), "assert h.pread(50000, 12345) == b'\\x7e' * 50000", "h.pwrite(b'tcp', 0)")
    nbdsh(server.unix_uri(), "assert h.pread(3, 0) == b'tcp'")


def test_nbdsh_block_status_over_unix_socket(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(size="64M", unix=True)
    nbdsh(
        server.unix_uri(),
        "check_fresh_export_is_hole(h)",
        "check_writes_are_data(h)",
        "check_trim(h)",
        script="block_status.py",
        base_allocation=True,
    )


def test_nbdcopy_over_unix_socket(
    start_server: Fixture, run: Fixture, tool: Fixture, tmp_path: Path
) -> None:
    tool("nbdcopy")
    server = start_server(size="16M", unix=True)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 * MiB))
    out = tmp_path / "out.img"
    run(["nbdcopy", str(src), server.unix_uri()])
    run(["nbdcopy", server.unix_uri(), str(out)])
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_config_file_unix_socket_and_named_exports(
    start_server: Fixture, run: Fixture, tool: Fixture, nbdsh: Fixture
) -> None:
    """``unix`` in the config file's [server] table; exports chosen by name in the URI."""
    tool("nbdinfo")
    server = start_server(
        unix=True,
        exports=[
            {"name": "swap", "size": "32M", "description": "swap space"},
            {"name": "scratch", "size": "16M"},
        ],
    )
    listed = json.loads(run(["nbdinfo", "--list", "--json", server.unix_uri()]).stdout)
    assert sorted(e["export-name"] for e in listed["exports"]) == ["scratch", "swap"]
    nbdsh(server.unix_uri("swap"), "assert h.get_size() == 32 * 1024 * 1024")
    nbdsh(server.unix_uri("scratch"), "assert h.get_size() == 16 * 1024 * 1024")
    nbdsh(server.unix_uri(""), "assert h.get_size() == 32 * 1024 * 1024")
