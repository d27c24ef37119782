"""nbdsh (python3-libnbd) scripts against ``nbdcache serve``.

Each test runs one check function from tests/interop/scripts/ inside nbdsh,
connected to a fresh server. The scripts hold the assertions; a failing check
makes nbdsh exit non-zero with a traceback, which fails the test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

Fixture = Callable[..., Any]

MiB = 1024 * 1024

ERROR_CHECKS = [
    "check_read_past_end",
    "check_write_past_end",
    "check_trim_past_end",
    "check_write_zeroes_past_end",
    "check_cache_past_end",
    "check_offset_overflow",
    "check_invalid_flags",
    "check_valid_flags",
    "check_zero_length",
    "check_fast_zero",
]


@pytest.mark.parametrize("check", ERROR_CHECKS)
def test_errors(start_server: Fixture, nbdsh: Fixture, check: str) -> None:
    server = start_server(size="64M")
    nbdsh(server.uri(), f"{check}(h)", script="errors.py", base_allocation=True)


def test_block_status_past_end(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(size="64M")
    nbdsh(server.uri(), "check_block_status_past_end(h)", script="errors.py", base_allocation=True)


def test_read_only_export_refuses_writes(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(size="64M", read_only=True)
    nbdsh(server.uri(), "check_read_only(h)", script="errors.py")


def test_maximum_payload_works(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(size="64M")
    nbdsh(server.uri(), "check_max_payload(h)", script="errors.py")


def test_oversized_write_refused_and_server_goes_on(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(size="64M")
    nbdsh(server.uri(), "check_oversized_write(h)", script="errors.py")
    # whatever happened to that connection, a new one is served
    nbdsh(server.uri(), "h.pwrite(b'ok' * 2048, 0)", "assert h.pread(4096, 0) == b'ok' * 2048")


def test_requests_longer_than_max_payload(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(size="128M")
    nbdsh(
        server.uri(),
        "check_large_requests_without_payload(h)",
        script="errors.py",
        base_allocation=True,
    )


STRUCTURED_CHECKS = [
    "check_negotiated",
    "check_structured_read",
    "check_df_read",
    "check_unaligned_io",
    "check_pipelined_reads",
    "check_concurrent_subpage_writes",
]


@pytest.mark.parametrize("check", STRUCTURED_CHECKS)
def test_structured_reads(start_server: Fixture, nbdsh: Fixture, check: str) -> None:
    server = start_server(size="64M")
    nbdsh(server.uri(), f"{check}(h)", script="structured.py")


BLOCK_STATUS_CHECKS = [
    "check_context",
    "check_fresh_export_is_hole",
    "check_writes_are_data",
    "check_written_zeroes_are_data",
    "check_trim",
    "check_trim_partial_pages",
    "check_write_zeroes_makes_hole",
    "check_write_zeroes_no_hole",
    "check_write_zeroes_partial_pages",
    "check_rewrite_after_trim",
    "check_req_one",
    "check_unaligned_query",
    "check_many_extents",
    "check_whole_device_map",
]


def test_block_status_trim_and_write_zeroes(start_server: Fixture, nbdsh: Fixture) -> None:
    """All block-status checks on one server, each on its own region of the export."""
    server = start_server(size="64M")
    # check_fresh_export_is_hole must run before anything is written
    statements = [
        f"{check}(h)" for check in BLOCK_STATUS_CHECKS if check != "check_whole_device_map"
    ]
    nbdsh(server.uri(), *statements, script="block_status.py", base_allocation=True)


def test_block_status_whole_device(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(size="64M")
    nbdsh(server.uri(), "check_whole_device_map(h)", script="block_status.py", base_allocation=True)


MULTICONN_CHECKS = [
    "check_advertised",
    "check_write_here_read_there",
    "check_pipelined_writes_across_connections",
    "check_data_survives_reconnect",
    "check_concurrent_subpage_writes_across_connections",
]


@pytest.mark.parametrize("check", MULTICONN_CHECKS)
def test_multi_conn(start_server: Fixture, nbdsh: Fixture, check: str) -> None:
    server = start_server(size="64M")
    nbdsh(server.uri(), f"{check}(h)", script="multiconn.py", base_allocation=True)


def test_exports_have_separate_stores(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(
        exports=[
            {"name": "one", "size": "64M"},
            {"name": "two", "size": "32M"},
        ]
    )
    nbdsh(server.uri("one"), "h.pwrite(b'\\xaa' * 4096, 0)")
    nbdsh(
        server.uri("two"),
        "assert h.get_size() == 32 * 1024 * 1024",
        "assert h.pread(4096, 0) == bytes(4096), 'write to export one visible in two'",
    )
    nbdsh(
        server.uri(""),
        "assert h.get_size() == 64 * 1024 * 1024",
        "assert h.pread(4096, 0) == b'\\xaa' * 4096, 'empty name is not the first export'",
    )


def test_unknown_export_is_refused(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(exports=[{"name": "one", "size": "64M"}])
    proc = nbdsh(server.uri("nope"), "pass", check=False)
    assert proc.returncode != 0, "connecting to an unknown export succeeded"
    nbdsh(server.uri("one"), "h.pread(512, 0)")


def test_tls_allowed_falls_back_to_plaintext(start_server: Fixture, nbdsh: Fixture) -> None:
    """A client that would like TLS gets a refusal of STARTTLS and carries on without it."""
    server = start_server(size="64M")
    nbdsh(
        None,
        "h.set_tls(nbd.TLS_ALLOW)",
        f"h.connect_uri({server.uri()!r})",
        "assert not h.get_tls_negotiated()",
        "h.pwrite(b'plain' * 100, 0)",
        "assert h.pread(500, 0) == b'plain' * 100",
    )


def test_tls_required_is_refused_cleanly(
    start_server: Fixture, nbdsh: Fixture, run: Fixture
) -> None:
    """A client that insists on TLS cannot attach; the server carries on."""
    server = start_server(size="64M")
    proc = nbdsh(
        None,
        "h.set_tls(nbd.TLS_REQUIRE)",
        f"h.connect_uri({server.uri()!r})",
        check=False,
    )
    assert proc.returncode != 0, "attached with TLS required, but the server has no TLS"
    nbdsh(server.uri(), "h.pread(512, 0)")
    assert server.alive()


OPTION_EXPORTS = [
    {"name": "alpha", "size": "64M", "description": "the first"},
    {"name": "beta", "size": "16M", "description": "the second", "read_only": True},
    {"name": "gamma", "size": "1G"},
]


def test_option_list(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(exports=OPTION_EXPORTS)
    expected = [("alpha", "the first"), ("beta", "the second"), ("gamma", "")]
    nbdsh(server.uri(), f"check_list(h, {expected!r})", script="options.py", opt_mode=True)


def test_option_info_and_go(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(exports=OPTION_EXPORTS)
    exports = [
        ("alpha", 64 * MiB, "the first", False),
        ("beta", 16 * MiB, "the second", True),
        ("gamma", 1024 * MiB, "", False),
    ]
    nbdsh(
        server.uri(),
        f"check_info(h, {exports!r}, 'alpha')",
        script="options.py",
        opt_mode=True,
    )


def test_option_unknown_export_then_go(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(exports=OPTION_EXPORTS)
    nbdsh(
        server.uri(),
        "check_unknown_export_then_go(h, 'gamma')",
        script="options.py",
        opt_mode=True,
    )


def test_option_meta_contexts(start_server: Fixture, nbdsh: Fixture) -> None:
    server = start_server(size="64M")
    nbdsh(server.uri(), "check_meta_contexts(h)", script="options.py", opt_mode=True)
    nbdsh(server.uri(), "check_go_without_meta_context(h)", script="options.py", opt_mode=True)


def test_simple_replies_client(start_server: Fixture, nbdsh: Fixture) -> None:
    """libnbd without structured replies (as the kernel's nbd client works)."""
    server = start_server(size="64M")
    nbdsh(
        None,
        "h.set_request_structured_replies(False)",
        f"h.connect_uri({server.uri()!r})",
        "assert not h.get_structured_replies_negotiated()",
        "check_unaligned_io(h)",
        "check_pipelined_reads(h)",
        "h.trim(64 * 1024, 4 * 1024 * 1024)",
        "assert h.pread(64 * 1024, 4 * 1024 * 1024) == bytes(64 * 1024)",
        script="structured.py",
    )
