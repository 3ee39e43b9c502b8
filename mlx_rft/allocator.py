"""Keep freed host memory in the process while MLX runs on the CPU (Linux, glibc).

MLX's CPU backend has no buffer cache: every array is a fresh `malloc`, and glibc serves large
requests with `mmap` and returns them to the kernel on `free` (and trims the heap top). The next
array of that size then page-faults on zeroed pages again; in a training pass of the default model
the kernel's page clearing took a tenth of all CPU samples (`perf`). Raising glibc's mmap and trim
thresholds keeps those pages mapped for reuse: the forward+backward of the GRPO benchmark runs
about 10% faster (BENCHMARKS.md). The resident size stays at the run's high-water mark instead of
shrinking between steps, which a training process reaches every step anyway.

MLX_RFT_RETAIN_MEMORY=0 keeps glibc's defaults. Other platforms and C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "MLX_RFT_RETAIN_MEMORY"
# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Requests below 1 GiB come from the heap (the largest arrays of a 0.6B model's step are smaller);
# the heap top is trimmed only past 2 GiB of free space.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_done: bool | None = None


def retain_freed_memory() -> bool:
    """Set glibc's thresholds once per process; True when they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    _done = mmap_ok and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
