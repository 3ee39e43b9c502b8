"""mlx-rft: reinforcement fine-tuning (GRPO family, RLAIF) of language models on MLX."""

from .blas import ensure_fast_blas

# Must run before anything imports mlx.core (see blas.py).
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
