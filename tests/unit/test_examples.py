"""Every example config in config/ loads."""

from pathlib import Path

import pytest

from nbdcache import config

EXAMPLES = sorted((Path(__file__).parents[2] / "config").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path: Path) -> None:
    assert config.load(path, {}, {}).exports
