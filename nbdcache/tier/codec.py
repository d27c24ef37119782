"""Page encoding: what a 4 KiB page becomes before it reaches an allocator.

This module owns the admission rules of the tier, in the order zram applies
them on its write path:

1. a *zero page* (all zero bytes) and a *same-filled page* (one 8-byte word
   repeated 512 times) are recognised before any compression and cost no
   arena space: the page table keeps the word (`filled_word`);
2. everything else is compressed with lz4 block format, without a size
   prefix (the uncompressed size is always `PAGE_SIZE`);
3. a page whose compressed form is larger than the *incompressible
   threshold* (default 7/8 of a page, like zram's huge-page rule) is not
   worth packing: it is kept raw, as the full 4096 bytes.  With a backing
   image such pages go to the image instead; without one they take a whole
   frame.

The compressor ``none`` stores every page raw; it is the baseline the
benchmarks compare against.

Detection works on `bytes`: comparing two memoryviews of equal content is an
element-by-element loop in CPython (tens of microseconds per page), so
callers turn memoryviews into `bytes` first (one 4 KiB copy, a few hundred
nanoseconds).

`native` is the C module `nbdcache.tier._pages` when it was built (it needs
lz4's headers at install time), else None.  It applies these same rules to a
whole run of pages in one call (`encode`; `encode_page` for one page), and
expands runs of pages straight into a reply buffer (`decode`); the tier uses
it for every page it stores and every request of more than one page it
loads.  ``NBDCACHE_PURE_PYTHON=1`` in the environment turns it off.
"""

from __future__ import annotations

import os
import sys
import warnings
from array import array
from collections.abc import Callable
from types import ModuleType
from typing import Final

import lz4.block

from nbdcache.tier import DISK, HOLE, PAGE_SIZE, RAM, SAME, ZERO, ZERO_PAGE
from nbdcache.tier.arena import HANDLE_LENGTH_MASK, HANDLE_SHIFT, HANDLE_SPLIT

COMPRESSORS: Final = ("lz4", "none")

#: Default incompressible threshold: compressed pages above 7/8 of a page are kept raw.
DEFAULT_INCOMPRESSIBLE_THRESHOLD: Final = PAGE_SIZE * 7 // 8

#: The largest threshold accepted: a compressed object plus allocator
#: bookkeeping must still be clearly smaller than a frame.
MAX_INCOMPRESSIBLE_THRESHOLD: Final = PAGE_SIZE - 64

_WORDS_PER_PAGE: Final = PAGE_SIZE // 8

_compress = lz4.block.compress
# The hot path passes (source, mode, store_size) positionally: parsing
# keywords costs a measurable share of compressing 4 KiB.  Make sure this
# lz4 binding still takes them in that order.
if _compress(ZERO_PAGE[:64], "default", False) != _compress(ZERO_PAGE[:64], store_size=False):
    raise ImportError("lz4.block.compress no longer takes (source, mode, store_size)")


def _load_native() -> ModuleType | None:
    if os.environ.get("NBDCACHE_PURE_PYTHON") or sys.byteorder != "little":
        return None
    try:
        from nbdcache.tier import _pages  # type: ignore[attr-defined]
    except ImportError:
        return None
    # The build must know this page table and have every entry point.
    constants = {
        "PAGE_SIZE": PAGE_SIZE,
        "HOLE": HOLE,
        "ZERO": ZERO,
        "SAME": SAME,
        "RAM": RAM,
        "DISK": DISK,
        "HANDLE_SHIFT": HANDLE_SHIFT,
        "HANDLE_SPLIT": HANDLE_SPLIT,
        "HANDLE_LENGTH_MASK": HANDLE_LENGTH_MASK,
    }
    if any(getattr(_pages, name, None) != value for name, value in constants.items()) or not all(
        hasattr(_pages, name) for name in ("encode", "encode_page", "decode", "Encoder")
    ):
        # A stale build: the pure-Python loops are correct, just slower.
        warnings.warn(
            f"{_pages.__file__} is from another version of nbdcache; "
            "running without it (reinstall nbdcache to rebuild it)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    module: ModuleType = _pages
    return module


#: The C loops over runs of pages, or None (see the module docstring).
native: Final = _load_native()


#: A run of pages as `native.encode` leaves it: the lz4 blocks at page
#: strides, the size per page (-1: zero or same-filled, 4096: kept raw) and
#: the repeated words.
Encoded = tuple[bytearray, "array[int]", "array[int]"]


def filled_word(page: bytes) -> int:
    """Return the repeated 8-byte word of a zero or same-filled page, else -1.

    The word is read little-endian, so a zero page gives 0 and `expand_word`
    of the result is the page again.  `page` must be `bytes` of `PAGE_SIZE`.
    """
    if page == ZERO_PAGE:
        return 0
    # Cheap rejections first: almost every page that is not same-filled
    # differs in its first byte and the first byte of the next word, or
    # between its first and last words.
    if page[0] != page[8]:
        return -1
    head = page[:8]
    if page[-8:] != head or page != head * _WORDS_PER_PAGE:
        return -1
    return int.from_bytes(head, "little")


def expand_word(word: int) -> bytes:
    """The page made of `word` (little-endian) repeated 512 times."""
    return word.to_bytes(8, "little") * _WORDS_PER_PAGE


def decompress_page(src: bytes | memoryview) -> bytes:
    """Expand one lz4 block (no size prefix) into a page."""
    page: bytes = lz4.block.decompress(src, PAGE_SIZE)
    return page


class Codec:
    """Compression with the incompressible rule.

    `encode(page)` returns either the compressed block (at most `threshold`
    bytes) or `page` itself, which the tier stores raw; the two are told apart
    by length (`PAGE_SIZE` means raw, since `threshold < PAGE_SIZE`).
    """

    __slots__ = ("compressor", "encode", "threshold")

    def __init__(
        self,
        compressor: str = "lz4",
        threshold: int = DEFAULT_INCOMPRESSIBLE_THRESHOLD,
    ) -> None:
        if compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {compressor!r}; choose one of {COMPRESSORS}")
        if not 0 < threshold <= MAX_INCOMPRESSIBLE_THRESHOLD:
            raise ValueError(
                f"incompressible threshold must be in 1..{MAX_INCOMPRESSIBLE_THRESHOLD}, "
                f"got {threshold}"
            )
        self.compressor = compressor
        self.threshold = threshold
        self.encode: Callable[[bytes], bytes] = (
            self._encode_lz4 if compressor == "lz4" else _encode_none
        )

    def _encode_lz4(self, page: bytes) -> bytes:
        out: bytes = _compress(page, "default", False)  # no size prefix
        if len(out) > self.threshold:
            return page
        return out


def _encode_none(page: bytes) -> bytes:
    return page
