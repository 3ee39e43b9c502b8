"""Keep freed host memory in the process while MLX runs on the CPU (Linux, glibc), for a block.

MLX's CPU backend has no buffer cache: every array is a fresh `malloc`, and glibc serves large
requests with `mmap` and returns them to the kernel on `free` (and trims the heap top). The next
array of that size then page-faults on zeroed pages again; in a training pass of the default model
the kernel's page clearing took a tenth of all CPU samples. Raising glibc's mmap and trim
thresholds keeps those pages mapped for reuse: the forward+backward of the GRPO benchmark runs
about 10% faster (BENCHMARKS.md). Inside the block the resident size stays at its high-water mark
instead of shrinking between steps, which a training process reaches every step anyway.

`retained()` sets the thresholds on entry and, when the outermost block exits, sets them back to
glibc's start-up values (or those the environment gave glibc) and returns the freed memory to the
kernel (`malloc_trim`). glibc has no call that turns its sliding mmap threshold back on once a
program set one, so after the block large blocks are mmapped as at process start.

MLX_RFT_RETAIN_MEMORY=0 keeps glibc's defaults. Other platforms and C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager

ENV_VAR = "MLX_RFT_RETAIN_MEMORY"
# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Requests below 1 GiB come from the heap (the largest arrays of a 0.6B model's step are smaller);
# the heap top is trimmed only past 2 GiB of free space.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
# glibc's start-up values of both thresholds (DEFAULT_MMAP_THRESHOLD_MIN, DEFAULT_TRIM_THRESHOLD).
GLIBC_DEFAULT = 128 * 1024

_lock = threading.Lock()
_depth = 0  # open `retained()` blocks
_set = False  # whether the outermost block changed the thresholds


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # musl or another C library: nothing to tune
        return None
    return libc


def wanted() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no")


def _startup_value(name: str) -> int:
    """The `name` threshold glibc started with: from MALLOC_<NAME>_ or GLIBC_TUNABLES when the
    environment set it, else glibc's built-in default."""
    value = os.environ.get(f"MALLOC_{name.upper()}_")
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        key, _, setting = item.partition("=")
        if key == f"glibc.malloc.{name}":
            value = setting
    try:
        return int(value)
    except (TypeError, ValueError):
        return GLIBC_DEFAULT


def _thresholds(libc, mmap_threshold: int, trim_threshold: int) -> bool:
    mmap_ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    return mmap_ok and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@contextmanager
def retained():
    """Within this block glibc keeps freed memory for reuse; yields whether the setting is in force.

    Blocks nest (and may be entered from several threads): the outermost one sets the thresholds
    and restores them on exit.
    """
    global _depth, _set
    with _lock:
        if _depth == 0:
            libc = _libc() if wanted() else None
            _set = libc is not None and _thresholds(libc, MMAP_THRESHOLD, TRIM_THRESHOLD)
        _depth += 1
        active = _set
    try:
        yield active
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _set:
                libc = _libc()
                _thresholds(libc, _startup_value("mmap_threshold"), _startup_value("trim_threshold"))
                libc.malloc_trim(0)
                _set = False


def in_force() -> bool:
    """Whether a `retained()` block has the raised thresholds in force now."""
    return _set
