"""Running the policy model: what training needs from it besides sampling (that is `rollout/`).

    logprobs       sequence_logprobs: per-token log-probs and entropies by teacher forcing
    head           the LM head and the selective log-softmax, chunked, with a custom VJP
    kv_cache       the left-padded KV cache of a teacher-forced pass
    checkpointing  checkpointed_layers: gradient checkpointing of the transformer blocks
    adapters       adapters_disabled / adapters_fused: LoRA off, or merged, for a while
"""
