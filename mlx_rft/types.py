"""Typed records passed between stages: prompts -> rollouts -> rewards -> advantages -> loss.

Shapes: B prompts, G completions per prompt, N = B * G rows, T = longest completion in the batch.
Row n belongs to prompt n // G (groups are contiguous).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx

from .errors import MlxRftError


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

    def validate(self) -> SamplingConfig:
        """The one set of sampling rules (train, eval and generate): raise naming the bad field."""

        def bad(name: str, value, rule: str):
            raise MlxRftError(f"sampling {name}={value!r} is invalid; set it {rule}")

        def real(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not (real(self.temperature) and self.temperature >= 0):
            bad("temperature", self.temperature, "to a finite value >= 0 (0 = greedy)")
        if not (real(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "in (0, 1] (1 = off)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "to an integer >= 0 (0 = off)")
        if not (real(self.min_p) and 0 <= self.min_p < 1):
            bad("min_p", self.min_p, "in [0, 1) (0 = off)")
        if not (real(self.xtc_probability) and 0 <= self.xtc_probability <= 1):
            bad("xtc_probability", self.xtc_probability, "in [0, 1] (0 = off)")
        if not (real(self.xtc_threshold) and 0 <= self.xtc_threshold <= 0.5):
            bad("xtc_threshold", self.xtc_threshold, "in [0, 0.5]")
        if not (real(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", self.repetition_penalty, "to a finite value > 0 (1 = off)")
        if not isinstance(self.repetition_context_size, int) or self.repetition_context_size < 1:
            bad("repetition_context_size", self.repetition_context_size, "to an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not real(getattr(self, name)):
                bad(name, getattr(self, name), "to a finite value (0 = off)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "to an integer >= 1")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "to a list of non-empty strings")
        return self


@dataclass
class RolloutBatch:
    """B prompts x G samples produced by the rollout engine."""

    prompt_ids: list[list[int]]  # B lists of prompt token ids (unpadded)
    completion_ids: mx.array  # [N, T] int32, right-padded (pad value unspecified: use the mask)
    completion_mask: mx.array  # [N, T] float32, 1 for sampled tokens (EOS included), 0 for padding
    # and for the environment's replies between the turns of multi-turn episodes
    logprobs: mx.array  # [N, T] float32, log_softmax(logits / temperature)[token], 0 at padding
    truncated_logprobs: mx.array | None  # [N, T] log-prob under the top-k/top-p/min-p truncated dist
    texts: list[str]  # N decoded completions (EOS removed; stop string removed unless include_stop)
    finish_reasons: list[str]  # N, "stop" (EOS or stop string) or "length" (max_new_tokens)
    group_index: list[int]  # N, the prompt index b of each row
    group_size: int  # G
    episodes: list | None = None  # N episode records (mlx_rft.episodes.Episode) of multi-turn rows

    @property
    def num_rows(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> mx.array:  # [N] completion lengths in tokens
        return self.completion_mask.sum(axis=1)

    def select_groups(self, groups: Sequence[int]) -> RolloutBatch:
        """The batch of the given prompt groups, in that order (whole groups of G rows)."""
        G = self.group_size
        rows = [g * G + j for g in groups for j in range(G)]
        idx = mx.array(rows, dtype=mx.int32)
        pick = (lambda a: a[idx]) if rows else (lambda a: a[:0])
        return RolloutBatch(
            prompt_ids=[self.prompt_ids[g] for g in groups],
            completion_ids=pick(self.completion_ids),
            completion_mask=pick(self.completion_mask),
            logprobs=pick(self.logprobs),
            truncated_logprobs=None if self.truncated_logprobs is None else pick(self.truncated_logprobs),
            texts=[self.texts[r] for r in rows],
            finish_reasons=[self.finish_reasons[r] for r in rows],
            group_index=[b for b in range(len(groups)) for _ in range(G)],
            group_size=G,
            episodes=None if self.episodes is None else [self.episodes[r] for r in rows],
        )

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """One batch holding the groups of several (same G), right-padded to the longest T."""
        if not batches:
            raise ValueError("concat needs at least one RolloutBatch")
        if len(batches) == 1:
            return batches[0]
        G = batches[0].group_size
        if any(b.group_size != G for b in batches):
            raise ValueError("cannot concatenate rollouts with different group sizes")
        T = max(int(b.completion_ids.shape[1]) for b in batches)

        def cat(name: str) -> mx.array:
            parts = [getattr(b, name) for b in batches]
            return mx.concatenate(
                [mx.pad(p, [(0, 0), (0, T - p.shape[1])]) if p.shape[1] < T else p for p in parts]
            )

        has_trunc = all(b.truncated_logprobs is not None for b in batches)
        prompts = [p for b in batches for p in b.prompt_ids]
        return RolloutBatch(
            prompt_ids=prompts,
            completion_ids=cat("completion_ids"),
            completion_mask=cat("completion_mask"),
            logprobs=cat("logprobs"),
            truncated_logprobs=cat("truncated_logprobs") if has_trunc else None,
            texts=[t for b in batches for t in b.texts],
            finish_reasons=[r for b in batches for r in b.finish_reasons],
            group_index=[g for g in range(len(prompts)) for _ in range(G)],
            group_size=G,
            episodes=(
                [e for b in batches for e in b.episodes]
                if all(b.episodes is not None for b in batches) else None
            ),
        )


@dataclass
class PromptExample:
    """One dataset row: the rendered prompt plus all extra columns (for reward functions)."""

    prompt: str  # text after the chat template
    prompt_ids: list[int]
    columns: dict[str, Any]  # every dataset column, e.g. "answer", "tests"
    # Prompts with series (soft tokens): the token-id arrays and z-normalised channels in order
    # (timeseries/prompts.py); prompt_ids then hold placeholders at the soft-token positions.
    pieces: tuple | None = None
