"""GRPO-family algorithm core, pure array maths: group advantages and the loss variants.

The log-probs they take come from running the model (`mlx_rft.policy.logprobs`):

    logp, entropy = sequence_logprobs(model, prompt_ids, completion_ids, mask, G, temperature)
    adv = group_advantages(rewards, G, scale="group")
    loss, stats = compute_loss(LossConfig(loss_type="dapo"), logp, old_logp, ref_logp,
                               adv.advantages, mask)
"""

from .advantages import AdvantageResult, RewardMoments, group_advantages
from .losses import (
    LOSSES,
    LossConfig,
    LossStats,
    compute_loss,
    high_entropy_mask,
    mask_truncated_completions,
)

__all__ = [
    "AdvantageResult",
    "LOSSES",
    "LossConfig",
    "LossStats",
    "RewardMoments",
    "compute_loss",
    "group_advantages",
    "high_entropy_mask",
    "mask_truncated_completions",
]
