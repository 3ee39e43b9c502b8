"""Typed records passed between stages: prompts -> rollouts -> rewards -> advantages -> loss.

Shapes: B prompts, G completions per prompt, N = B * G rows, T = longest completion in the batch.
Row n belongs to prompt n // G (groups are contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx


@dataclass
class SamplingConfig:
    """How completions are sampled. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    include_stop: bool = False  # keep the matched stop string at the end of the text


@dataclass
class RolloutBatch:
    """B prompts x G samples produced by the rollout engine."""

    prompt_ids: list[list[int]]  # B lists of prompt token ids (unpadded)
    completion_ids: mx.array  # [N, T] int32, right-padded (pad value unspecified: use the mask)
    completion_mask: mx.array  # [N, T] float32, 1 for generated tokens (EOS included), 0 for padding
    logprobs: mx.array  # [N, T] float32, log_softmax(logits / temperature)[token], 0 at padding
    truncated_logprobs: mx.array | None  # [N, T] log-prob under the top-k/top-p/min-p truncated dist
    texts: list[str]  # N decoded completions (EOS removed; stop string removed unless include_stop)
    finish_reasons: list[str]  # N, "stop" (EOS or stop string) or "length" (max_new_tokens)
    group_index: list[int]  # N, the prompt index b of each row
    group_size: int  # G

    @property
    def num_rows(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> mx.array:  # [N] completion lengths in tokens
        return self.completion_mask.sum(axis=1)


@dataclass
class PromptExample:
    """One dataset row: the rendered prompt plus all extra columns (for reward functions)."""

    prompt: str  # text after the chat template
    prompt_ids: list[int]
    columns: dict[str, Any]  # every dataset column, e.g. "answer", "tests"
