"""Configuration: sizes, addresses, merging flags over the file, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nbdcache import config


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 << 20), ("4G", 4 << 30), ("4GiB", 4 << 30), ("8k", 8192), (4096, 4096)],
)
def test_sizes_take_human_units(text: object, size: int) -> None:
    assert config.parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "address"),
    [("127.0.0.1:1234", ("127.0.0.1", 1234)), ("[::1]:99", ("::1", 99)), (":7", ("127.0.0.1", 7))],
)
def test_addresses(value: str, address: tuple[str, int]) -> None:
    assert config.parse_address(value) == address


def test_flags_win_over_the_file_and_apply_to_the_first_export(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        '[server]\nlisten = ["127.0.0.1:1"]\n'
        '[[exports]]\nname = "a"\nsize = "1M"\n[[exports]]\nname = "b"\nsize = "2M"\n'
    )
    cfg = config.load(
        f,
        {"listen": ["127.0.0.1:2"]},
        {"size": "8M", "read_only": True, "sequential_cutoff": "1M"},
    )
    assert cfg.server.listen == ["127.0.0.1:2"]
    assert [(e.name, e.size, e.read_only, e.sequential_cutoff) for e in cfg.exports] == [
        ("a", 8 << 20, True, 1 << 20),
        ("b", 2 << 20, False, 4 << 20),
    ]


def test_embedded_default_needs_no_file() -> None:
    cfg = config.load(None, {}, {})
    assert cfg.server.listen == ["127.0.0.1:10809"]
    assert cfg.exports[0].size >= 1 << 30


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[exports]]\nsize = "1000"\n', "exports[0].size: must be a positive multiple of 4096"),
        ('[[exports]]\nsize = "lots"\n', "exports[0].size: expected a size"),
        ('[server]\nlisten = ["1.2.3"]\n', "server.listen: bad IP address"),
        ("[server]\nfoo = 1\n", "server.foo: unknown setting"),
        (
            '[[exports]]\nname = "a"\n[[exports]]\nname = "a"\n',
            "exports: export name 'a' is used twice",
        ),
        ("[server\n", "c.toml"),
        (
            '[[exports]]\nallowed_networks = ["10.0.0.0/33"]\n',
            "exports[0].allowed_networks: not an address or network: '10.0.0.0/33'",
        ),
        (
            '[[exports]]\nallowed_names = ["alice"]\n',
            "exports[0].allowed_names: needs server.tls_ca",
        ),
        ('[server]\ntls = "require"\n', "server: tls = on or require needs tls_cert"),
        ('[server]\ntls_ca = "ca.pem"\n', "server: tls_cert, tls_key and tls_ca need tls"),
        ("[server]\nmax_connections = 0\n", "server.max_connections: must be at least 1"),
        (
            '[[exports]]\nsequential_cutoff = "1000"\n',
            "exports[0].sequential_cutoff: must be a whole number of 4096-byte pages, or 0",
        ),
        ("[server]\nhandshake_timeout = -1\n", "server.handshake_timeout: must not be negative"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(config.ConfigError) as err:
        config.load(f, {}, {})
    assert message in str(err.value)


def test_cli_exits_2_with_one_line_before_listening() -> None:
    # Port 1 would need privileges or be refused: exiting 2 with the field
    # named shows validation ran before any bind.
    run = subprocess.run(
        [sys.executable, "-m", "nbdcache", "serve", "--listen", "127.0.0.1:1", "--size", "12345"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == "nbdcache: exports[0].size: must be a positive multiple of 4096"
