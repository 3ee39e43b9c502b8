"""mlx-rft: reinforcement fine-tuning (GRPO family, RLAIF) of language models on MLX."""

from .blas import ensure_fast_blas

# Must run before anything imports mlx.core (see blas.py).
ensure_fast_blas()

__version__ = "0.1.0"
