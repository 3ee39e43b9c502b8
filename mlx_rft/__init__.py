"""mlx-rft: reinforcement fine-tuning (GRPO family, RLAIF) of language models on MLX."""

from .cpu.blas import ensure_fast_blas

# The one process-wide CPU change, and the only place it runs from: on MLX's Linux CPU wheel an
# optimized BLAS must be loaded before anything imports mlx.core (see cpu/blas.py). Everything
# else CPU-specific is scoped to `mlx_rft.cpu.speedups()`.
ensure_fast_blas()

__version__ = "0.1.0"

_LAZY = {
    "GRPOConfig": ("mlx_rft.config", "GRPOConfig"),
    "GRPOTrainer": ("mlx_rft.train.trainer", "GRPOTrainer"),
    "load_model": ("mlx_rft.models", "load_model"),
}

__all__ = ["GRPOConfig", "GRPOTrainer", "load_model", "ensure_fast_blas", "__version__"]


def __getattr__(name: str):
    # Public names load on first use, so `import mlx_rft` stays cheap (and MLX-free) for the CLI.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mlx_rft' has no attribute {name!r}")
