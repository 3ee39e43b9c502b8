"""Rollout generation: B prompts x G samples per GRPO step in one batched decode loop.

    from mlx_rft.rollout import generate_rollouts
    batch = generate_rollouts(model, tokenizer, prompt_ids, group_size, sampling, seed=0)
"""

from .engine import RolloutStats, generate_rollouts
from .sampling import TokenSampler, validate_sampling

__all__ = ["RolloutStats", "TokenSampler", "generate_rollouts", "validate_sampling"]
