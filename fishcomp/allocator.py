"""The C allocator's settings for a process that allocates the same large tensors every step.

A training step on cached maps allocates tens of megabytes per tensor (a batch of 64 maps is
20-40 MB; its normalisation, activations and gradients as much again). glibc's malloc serves
such blocks from fresh `mmap`s and returns them on free, so every step pays the kernel for
zeroing and page-faulting all of them again: measured on the build machine, training the
`bbox_grid` head on 600 images' maps took 147 s with glibc's defaults and 120 s with the settings
below, the same numbers out (PyTorch's CPU-performance guide recommends jemalloc or tcmalloc for
the same reason; these settings need no extra library).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit systems: blocks up to 32 MB then come from the
# heap and are reused after free.
MMAP_THRESHOLD = 32 << 20
# Freed memory at the top of the heap is kept (up to this much) for the next step instead of
# being handed back to the kernel and faulted in again.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Apply the settings above; False where they do not apply (not glibc, or the user set
    MALLOC_* tunables in the environment, which win)."""
    if any(name.startswith("MALLOC_") for name in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
