"""Zero and same-filled detection, lz4 round trips and the incompressible rule."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tier_helpers import TIER_SETTINGS, page_of

from nbdcache.tier import PAGE_SIZE, ZERO_PAGE
from nbdcache.tier.codec import (
    DEFAULT_INCOMPRESSIBLE_THRESHOLD,
    Codec,
    decompress_page,
    expand_word,
    filled_word,
)


def test_zero_page_is_word_zero() -> None:
    assert filled_word(ZERO_PAGE) == 0
    assert expand_word(0) == ZERO_PAGE


@TIER_SETTINGS
@given(st.binary(min_size=8, max_size=8))
def test_same_filled_page_gives_its_word_back(word: bytes) -> None:
    page = word * (PAGE_SIZE // 8)
    found = filled_word(page)
    assert found == int.from_bytes(word, "little")
    assert expand_word(found) == page


@TIER_SETTINGS
@given(
    st.binary(min_size=8, max_size=8),
    st.integers(0, PAGE_SIZE - 1),
    st.integers(1, 255),
)
def test_one_differing_byte_is_not_same_filled(word: bytes, where: int, flip: int) -> None:
    page = bytearray(word * (PAGE_SIZE // 8))
    page[where] ^= flip
    assert filled_word(bytes(page)) == -1


def test_period_other_than_eight_is_not_same_filled() -> None:
    # Repeats every 16 bytes: first and last words equal, but not 8-periodic.
    page = (b"A" * 8 + b"B" * 8) * (PAGE_SIZE // 16)
    assert filled_word(page) == -1


@TIER_SETTINGS
@given(st.integers(0, 2**32), st.integers(0, PAGE_SIZE))
def test_lz4_round_trip(seed: int, length: int) -> None:
    codec = Codec("lz4")
    page = page_of("data", seed, length)
    out = codec.encode(page)
    if len(out) == PAGE_SIZE:
        assert out is page  # kept raw
    else:
        assert len(out) <= DEFAULT_INCOMPRESSIBLE_THRESHOLD
        assert decompress_page(out) == page


def test_incompressible_page_is_kept_raw() -> None:
    codec = Codec("lz4")
    page = os.urandom(PAGE_SIZE)
    assert codec.encode(page) is page
    assert len(codec.encode(b"x" * PAGE_SIZE)) < 100


def test_threshold_decides_what_is_incompressible() -> None:
    page = page_of("data", 7, 1500)  # compresses to a little over 1500 bytes
    compressed = len(Codec("lz4").encode(page))
    assert 1500 <= compressed < 1700
    strict = Codec("lz4", threshold=compressed - 1)
    assert strict.encode(page) is page
    assert len(Codec("lz4", threshold=compressed).encode(page)) == compressed


def test_compressor_none_stores_raw() -> None:
    codec = Codec("none")
    page = b"y" * PAGE_SIZE
    assert codec.encode(page) is page


@pytest.mark.parametrize("threshold", [0, -1, PAGE_SIZE, PAGE_SIZE - 1])
def test_bad_threshold_is_refused(threshold: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        Codec("lz4", threshold=threshold)


def test_unknown_compressor_is_refused() -> None:
    with pytest.raises(ValueError, match="compressor"):
        Codec("zstd")
