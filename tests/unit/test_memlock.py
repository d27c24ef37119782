"""`memlock.keep_heap`: request-sized buffers come from the heap.

Checked in a fresh interpreter, where glibc's defaults still hold: a 1 MiB
buffer is a mapping of its own before, and lies in ``[heap]`` after.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nbdcache import memlock

_PROBE = """
import ctypes, sys
from nbdcache import memlock

def in_heap(buf):
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo <= addr < hi
    return False

before = in_heap(bytearray(1 << 20))
took = memlock.keep_heap()
after = [in_heap(bytearray(n)) for n in (1 << 20, 1 << 20, 3 << 20, 30 << 20)]
print(before, took, all(after))
"""


@pytest.mark.skipif(not memlock.is_glibc(), reason="mallopt's parameters are glibc's")
def test_request_sized_buffers_come_from_the_heap_once_kept() -> None:
    env = {k: v for k, v in os.environ.items() if k not in memlock.MALLOC_ENVIRONMENT}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    assert out == ["False", "True", "True"]


@pytest.mark.skipif(not memlock.is_glibc(), reason="mallopt's parameters are glibc's")
def test_an_operators_malloc_settings_win() -> None:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    assert out == ["False", "False", "False"]
