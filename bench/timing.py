"""Helpers shared by the benchmarks. No MLX import: the torch and TRL variants use them too."""

from __future__ import annotations

import resource
import time


def best_of(fn, repeats: int = 3, warmup: bool = True) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one untimed warm-up call unless
    `warmup` is false. The fastest call is the one least disturbed by other load on the machine."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def max_rss_gb() -> float:
    """The process's peak resident set size so far: Linux's KiB count / 1e6, as in BENCHMARKS.md."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
