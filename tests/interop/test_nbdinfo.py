"""nbdinfo against ``nbdcache serve``: what a user sees when inspecting the server."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Fixture = Callable[..., Any]

MiB = 1024 * 1024


def nbdinfo_json(run: Fixture, tool: Fixture, *args: str) -> Any:
    tool("nbdinfo")
    return json.loads(run(["nbdinfo", "--json", *args]).stdout)


def only_export(info: dict[str, Any]) -> dict[str, Any]:
    exports = info["exports"]
    assert len(exports) == 1, exports
    return dict(exports[0])


def test_json_shows_size_flags_and_block_sizes(
    start_server: Fixture, run: Fixture, tool: Fixture
) -> None:
    server = start_server(size="64M")
    info = nbdinfo_json(run, tool, server.uri())
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True, "structured replies not negotiated"
    assert info["TLS"] is False
    export = only_export(info)
    assert export["export-size"] == 64 * MiB
    assert "base:allocation" in export["contexts"]
    expected_flags = {
        "is_read_only": False,
        "can_trim": True,
        "can_zero": True,
        "can_fast_zero": True,
        "can_cache": True,
        "can_df": True,
        "can_multi_conn": True,
        # volatile by default: nothing to flush, no FUA
        "can_flush": False,
        "can_fua": False,
    }
    assert {k: export.get(k) for k in expected_flags} == expected_flags
    assert export.get("block_size_minimum") == 1
    assert export.get("block_size_preferred") == 4096
    assert export.get("block_size_maximum") == 32 * MiB


def test_json_size_units(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    server = start_server(size="1G")
    export = only_export(nbdinfo_json(run, tool, server.uri()))
    assert export["export-size"] == 1024 * MiB


def test_json_read_only(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    server = start_server(size="64M", read_only=True)
    export = only_export(nbdinfo_json(run, tool, server.uri()))
    assert export["is_read_only"] is True
    assert export["export-size"] == 64 * MiB


def test_can_and_is_queries(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    """nbdinfo --can / --is exit 0 for yes and 2 for no."""
    tool("nbdinfo")
    server = start_server(size="64M")
    uri = server.uri()
    for feature in ("connect", "trim", "zero", "fast-zero", "cache", "df", "multi-conn",
                    "structured-reply"):  # fmt: skip
        proc = run(["nbdinfo", "--can", feature, uri], check=False)
        assert proc.returncode == 0, f"--can {feature}: {proc.returncode} {proc.stderr}"
    for feature in ("flush", "fua"):
        proc = run(["nbdinfo", "--can", feature, uri], check=False)
        assert proc.returncode == 2, f"--can {feature}: {proc.returncode} {proc.stderr}"
    proc = run(["nbdinfo", "--is", "read-only", uri], check=False)
    assert proc.returncode == 2, proc.stderr
    assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(64 * MiB)


EXPORTS = [
    {"name": "one", "size": "64M", "description": "first export"},
    {"name": "two", "size": "1G", "description": "second export"},
    {"name": "three", "size": "8M", "read_only": True},
]


def test_list_shows_every_configured_export(
    start_server: Fixture, run: Fixture, tool: Fixture
) -> None:
    server = start_server(exports=EXPORTS)
    info = nbdinfo_json(run, tool, "--list", server.uri())
    by_name = {e["export-name"]: e for e in info["exports"]}
    assert sorted(by_name) == ["one", "three", "two"]
    assert by_name["one"]["export-size"] == 64 * MiB
    assert by_name["two"]["export-size"] == 1024 * MiB
    assert by_name["three"]["export-size"] == 8 * MiB
    assert by_name["one"].get("description") == "first export"
    assert by_name["two"].get("description") == "second export"
    assert by_name["three"]["is_read_only"] is True
    assert by_name["one"]["is_read_only"] is False


def test_list_plain_text(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    tool("nbdinfo")
    server = start_server(exports=EXPORTS)
    out = run(["nbdinfo", "--list", server.uri()]).stdout
    for name in ("one", "two", "three"):
        assert f'export="{name}":' in out, out
    assert "description: first export" in out, out


def test_named_and_default_export(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    server = start_server(exports=EXPORTS)
    two = only_export(nbdinfo_json(run, tool, server.uri("two")))
    assert two["export-size"] == 1024 * MiB
    assert two.get("description") == "second export"
    default = only_export(nbdinfo_json(run, tool, server.uri("")))
    assert default["export-size"] == 64 * MiB, "the empty name must select the first export"


def test_export_flag_names_the_export(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    server = start_server(size="64M", export="swap0")
    listed = nbdinfo_json(run, tool, "--list", server.uri())
    assert [e["export-name"] for e in listed["exports"]] == ["swap0"]
    assert only_export(nbdinfo_json(run, tool, server.uri("swap0")))["export-size"] == 64 * MiB
    assert only_export(nbdinfo_json(run, tool, server.uri("")))["export-size"] == 64 * MiB


def test_unknown_export_fails(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    tool("nbdinfo")
    server = start_server(exports=EXPORTS)
    proc = run(["nbdinfo", "--json", server.uri("missing")], check=False)
    assert proc.returncode != 0, proc.stdout


def nbdinfo_map(run: Fixture, uri: str) -> list[tuple[int, int, str]]:
    extents = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    result = [(e["offset"], e["length"], e["description"]) for e in extents]
    pos = 0
    for offset, length, _ in result:
        assert offset == pos, f"map not contiguous at {pos}: {result}"
        pos += length
    return result


def data_ranges(extents: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Merged (offset, length) of the extents nbdinfo calls "data" (neither hole nor zero)."""
    out: list[tuple[int, int]] = []
    for offset, length, description in extents:
        if "hole" in description or "zero" in description:
            continue
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def test_map_shows_data_after_writes_and_holes_after_trim(
    start_server: Fixture, run: Fixture, tool: Fixture, nbdsh: Fixture
) -> None:
    tool("nbdinfo")
    server = start_server(size="64M")
    uri = server.uri()

    fresh = nbdinfo_map(run, uri)
    assert fresh == [(0, 64 * MiB, "hole,zero")], fresh

    nbdsh(
        uri,
        "import os",
        "h.pwrite(os.urandom(64 * 1024), 1024 * 1024)",
        "h.pwrite(os.urandom(4096), 8 * 1024 * 1024)",
        "h.pwrite(b'x', 16 * 1024 * 1024 + 5000)",
        "h.pwrite(os.urandom(8192), 64 * 1024 * 1024 - 8192)",
    )
    written = nbdinfo_map(run, uri)
    assert data_ranges(written) == [
        (1 * MiB, 64 * 1024),
        (8 * MiB, 4096),
        (16 * MiB + 4096, 4096),
        (64 * MiB - 8192, 8192),
    ], written
    assert sum(length for _, length, _ in written) == 64 * MiB

    nbdsh(uri, "h.trim(32 * 1024, 1024 * 1024 + 16 * 1024)", "h.trim(4096, 8 * 1024 * 1024)")
    trimmed = nbdinfo_map(run, uri)
    assert data_ranges(trimmed) == [
        (1 * MiB, 16 * 1024),
        (1 * MiB + 48 * 1024, 16 * 1024),
        (16 * MiB + 4096, 4096),
        (64 * MiB - 8192, 8192),
    ], trimmed
    hole = [e for e in trimmed if e[0] == 1 * MiB + 16 * 1024]
    assert hole == [(1 * MiB + 16 * 1024, 32 * 1024, "hole,zero")], trimmed

    nbdsh(uri, "h.trim(64 * 1024 * 1024, 0)")
    assert nbdinfo_map(run, uri) == [(0, 64 * MiB, "hole,zero")]


def test_map_totals(start_server: Fixture, run: Fixture, tool: Fixture, nbdsh: Fixture) -> None:
    tool("nbdinfo")
    server = start_server(size="64M")
    nbdsh(server.uri(), "h.pwrite(b'\\x55' * (16 * 1024 * 1024), 0)")
    out = run(["nbdinfo", "--map", "--totals", "--json", server.uri()]).stdout
    totals = {t["type"]: t["size"] for t in json.loads(out)}
    assert totals == {0: 16 * MiB, 3: 48 * MiB}, totals


def test_ipv6_loopback(start_server: Fixture, run: Fixture, tool: Fixture) -> None:
    server = start_server(size="64M", ipv6=True)
    (host, port), = server.extra_tcp  # fmt: skip
    assert host == "::1"
    export = only_export(nbdinfo_json(run, tool, f"nbd://[::1]:{port}/"))
    assert export["export-size"] == 64 * MiB
    assert export["can_multi_conn"] is True
