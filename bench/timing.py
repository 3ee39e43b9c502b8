"""Timing helper shared by the benchmarks (no MLX import: the torch variant runs it too)."""

from __future__ import annotations

import time


def best_of(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
