"""Fast float32 matmul for MLX's Linux CPU wheel: the one speed-up that cannot be scoped.

The Linux `mlx[cpu]` wheel (the `mlx-cpu` distribution) resolves `cblas_sgemm` from a slow
reference BLAS (~6 GFLOP/s on a 2-core x86 machine). Loading an optimized BLAS that exports the
same symbol with RTLD_GLOBAL *before* `mlx.core` is imported makes the dynamic linker bind MLX's
calls to it instead (25-60x faster GEMM, see BENCHMARKS.md). A shared library cannot be unloaded
or rebound afterwards, so this one is process-wide by nature; it changes which library computes
the products, nothing in mlx-lm's or MLX's Python state.

`mlx_rft/__init__.py` calls `ensure_fast_blas()` first thing, which is the only place it runs
from. It does nothing unless the installed MLX is the CPU wheel on Linux: which wheel is installed
is read from the package metadata, without importing mlx (a CUDA or Metal build never loads a CPU
BLAS). This module must not import mlx itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger("mlx_rft")

ENV_VAR = "MLX_RFT_BLAS"
FIX_HINT = (
    "install one: `pip install mkl` (any Linux x86_64) or "
    "`apt-get install libopenblas0-pthread` (Debian/Ubuntu), or point "
    f"{ENV_VAR}=/path/to/libblas.so at a library that exports cblas_sgemm"
)


@dataclass(frozen=True)
class BlasStatus:
    """What `ensure_fast_blas` did. `path` is None when MLX runs on its bundled BLAS."""

    path: str | None
    reason: str


_status: BlasStatus | None = None


def _candidates() -> list[str]:
    """Optimized BLAS libraries in order of measured speed (MKL, then OpenBLAS)."""
    found: list[str] = []
    prefixes = {sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX", "")}
    for prefix in filter(None, prefixes):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    found += [
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
    ]
    for name in ("mkl_rt", "openblas"):
        lib = ctypes.util.find_library(name)
        if lib:
            found.append(lib)
    seen, unique = set(), []
    for path in found:
        if path not in seen:
            seen.add(path)
            unique.append(path)
    return unique


# The distributions that ship `libmlx` on Linux: `mlx[cpu]` installs the first, `mlx[cuda]` one of
# the others.
CPU_WHEEL = "mlx-cpu"
GPU_WHEELS = ("mlx-cuda-12", "mlx-cuda-13", "mlx-cuda")


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def cpu_wheel_reason() -> str | None:
    """Why no CPU BLAS is needed here (None when MLX is the Linux CPU wheel), from the platform and
    the installed MLX distributions; imports nothing of MLX."""
    if platform.system() != "Linux":
        return f"not needed on {platform.system()}"  # macOS MLX uses Accelerate
    gpu = [d for d in GPU_WHEELS if _installed(d)]
    if gpu:
        return f"not needed with MLX's CUDA wheel ({gpu[0]})"
    if not _installed(CPU_WHEEL):
        return f"MLX is not the {CPU_WHEEL} wheel (a source build links its own BLAS)"
    return None


def _try_load(path: str) -> bool:
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return hasattr(lib, "cblas_sgemm")


def ensure_fast_blas() -> BlasStatus:
    """Load an optimized BLAS globally before MLX, once per process.

    Honours MLX_RFT_BLAS: a library path, or `none` to keep MLX's bundled BLAS. Only the Linux
    CPU wheel needs this (`cpu_wheel_reason`); elsewhere it loads nothing.
    """
    global _status
    if _status is not None:
        return _status
    reason = cpu_wheel_reason()
    if reason is not None:
        _status = BlasStatus(None, reason)
        return _status
    if "mlx.core" in sys.modules:
        _status = BlasStatus(None, "mlx.core was imported before mlx_rft; too late to swap BLAS")
        logger.warning(
            "mlx.core was imported before mlx_rft, so float32 matmul runs on MLX's slow bundled "
            "BLAS. Import mlx_rft first (or run through the mlx-rft command)."
        )
        return _status
    wanted = os.environ.get(ENV_VAR)
    if wanted:
        if wanted.lower() == "none":
            _status = BlasStatus(None, f"disabled by {ENV_VAR}=none")
            return _status
        if not Path(wanted).exists() or not _try_load(wanted):
            raise RuntimeError(
                f"{ENV_VAR}={wanted!r} is not a loadable library exporting cblas_sgemm; "
                f"unset it or {FIX_HINT}"
            )
        _status = BlasStatus(wanted, f"from {ENV_VAR}")
    else:
        for path in _candidates():
            if _try_load(path):
                _status = BlasStatus(path, "auto-detected")
                break
        else:
            _status = BlasStatus(None, "no optimized BLAS found")
            logger.warning(
                "MLX on Linux CPU is using its bundled reference BLAS (~30x slower float32 "
                "matmul); %s",
                FIX_HINT,
            )
            return _status
    logger.info("fast BLAS for MLX CPU matmul: %s", _status.path)
    return _status


def blas_status() -> BlasStatus:
    return ensure_fast_blas()
