"""Everything mlx-rft does differently on MLX's CPU backend, in one place.

MLX's Linux CPU wheel is slow in three ways that matter for RL fine-tuning; each remedy is
measured in BENCHMARKS.md:

* `blas`: the wheel's reference BLAS computes float32 matmul ~30x slower than MKL or OpenBLAS.
  An optimized BLAS must be loaded before `mlx.core`, so `mlx_rft/__init__.py` does it on import,
  and only when the installed MLX is the Linux CPU wheel (never with CUDA or Metal). Process-wide
  by nature: a loaded library cannot be unloaded. MLX_RFT_BLAS picks or disables it.
* `kernels`: MLX's CPU `exp` costs ~12 ns per element; SwiGLU, the attention softmax and the
  vocabulary-wide log-softmax take faster paths (NumPy's vectorised exp, a fused polynomial).
  MLX_RFT_FAST_KERNELS=0 keeps mlx-lm's functions.
* `allocator`: glibc hands large freed blocks back to the kernel, so every fresh MLX array
  page-faults again; raised malloc thresholds keep them. MLX_RFT_RETAIN_MEMORY=0 keeps glibc's.

The last two change state that other code shares (mlx-lm's model modules, glibc's malloc), so
they are in force only inside `speedups()`:

    with cpu.speedups(model):
        ...  # training, rollouts, evaluation

On exit mlx-lm's globals and glibc's thresholds are as before. Blocks nest (the inner ones cost
next to nothing). The log-softmax functions that `algo/logprobs.py` and the sampler call directly
need no block: they take their CPU paths on the CPU and fall through to MLX elsewhere.

Importing this package imports no MLX.
"""

from __future__ import annotations

from contextlib import contextmanager

from .blas import BlasStatus, blas_status, ensure_fast_blas

__all__ = ["speedups", "ensure_fast_blas", "blas_status", "BlasStatus"]


@contextmanager
def speedups(model=None):
    """Within this block mlx-lm's SwiGLU and attention take the CPU paths of `kernels` (for the
    modules of `model`'s layers; every mlx-lm model module imported so far when `model` is None)
    and glibc keeps freed memory; on exit both are restored. Yields the mlx-lm globals swapped.

    A no-op unless MLX's default device is the CPU: on CUDA or Metal nothing CPU-specific loads.
    """
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        yield []
        return
    from . import allocator, kernels

    with kernels.patched(model) as swapped, allocator.retained():
        yield swapped
