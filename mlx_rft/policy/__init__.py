"""Running the policy model: what training needs from it besides sampling (that is `rollout/`).

    adapters       adapters_disabled / adapters_fused: LoRA off, or merged, for a while
"""
