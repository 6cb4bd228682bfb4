"""The allocator settings the CLI applies: a batch-sized block is reused from the heap, not mapped
fresh from the kernel on every step."""

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, sys
import numpy as np
from fishcomp.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "on" else False
before = libc.mallinfo2().hblkhd
block = np.ones(20 << 20, dtype=np.uint8)  # a bf16 batch of 64 maps: 19.7 MB
print(int(applied), libc.mallinfo2().hblkhd - before)
"""


def _glibc_with_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")


def _mapped_growth(mode: str, env: dict) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc's mallinfo2 reports where blocks come from")
def test_batch_sized_blocks_come_from_the_reusable_heap_once_applied():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    applied, grown = _mapped_growth("on", clean)
    assert applied == 1 and grown == 0
    _, grown_by_default = _mapped_growth("off", clean)
    assert grown_by_default >= 20 << 20  # glibc's default: a fresh mapping, faulted in and zeroed every time


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc's mallinfo2 reports where blocks come from")
def test_a_users_own_malloc_tunables_win():
    applied, grown = _mapped_growth("on", {**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert applied == 0 and grown >= 20 << 20
