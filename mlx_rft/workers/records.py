"""A step's rollouts and rewards as a message payload (JSON header + arrays) and back.

Everything the trainer needs from a rollout worker: the sampled tokens, masks and behaviour
log-probs, the texts and finish reasons, the episode records of multi-turn rows, and the reward
result. Prompts do not travel: the trainer has the same dataset and rebuilds them from the
job's row indices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..episodes.runner import Episode
from ..rewards.base import RewardResult
from ..types import PromptExample, RolloutBatch

_ROLLOUT_ARRAYS = ("completion_ids", "completion_mask", "logprobs", "truncated_logprobs")


def pack_rollouts(rollouts: RolloutBatch, rewards: RewardResult) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    arrays = {
        name: np.asarray(getattr(rollouts, name)) for name in _ROLLOUT_ARRAYS
        if getattr(rollouts, name) is not None
    }
    funcs, details = list(rewards.per_func), list(rewards.details)
    arrays["reward_total"] = np.asarray(rewards.total, dtype=np.float64)
    arrays.update({f"reward_func_{i}": np.asarray(rewards.per_func[k]) for i, k in enumerate(funcs)})
    arrays.update({f"reward_detail_{i}": np.asarray(rewards.details[k]) for i, k in enumerate(details)})
    header = {
        "texts": rollouts.texts, "finish_reasons": rollouts.finish_reasons,
        "group_size": rollouts.group_size,
        "episodes": None if rollouts.episodes is None else [_episode_fields(e) for e in rollouts.episodes],
        "rewards": {
            "funcs": funcs, "details": details, "stats": rewards.stats, "metrics": rewards.metrics,
            "weights": rewards.weights, "judges": rewards.judges, "reasons": rewards.reasons,
        },
    }
    return header, arrays


def unpack_rollouts(
    header: dict[str, Any], arrays: dict[str, np.ndarray], examples: Sequence[PromptExample]
) -> tuple[RolloutBatch, RewardResult]:
    G = int(header["group_size"])
    n = len(header["texts"])
    if n != len(examples) * G:
        raise ValueError(f"{n} rollouts for {len(examples)} prompts x {G}")
    rollouts = RolloutBatch(
        prompt_ids=[list(e.prompt_ids) for e in examples],
        completion_ids=mx.array(arrays["completion_ids"]),
        completion_mask=mx.array(arrays["completion_mask"]),
        logprobs=mx.array(arrays["logprobs"]),
        truncated_logprobs=(
            mx.array(arrays["truncated_logprobs"]) if "truncated_logprobs" in arrays else None
        ),
        texts=list(header["texts"]),
        finish_reasons=list(header["finish_reasons"]),
        group_index=[i // G for i in range(n)],
        group_size=G,
        episodes=None if header["episodes"] is None else [Episode(**e) for e in header["episodes"]],
    )
    r = header["rewards"]
    rewards = RewardResult(
        total=arrays["reward_total"],
        per_func={k: arrays[f"reward_func_{i}"] for i, k in enumerate(r["funcs"])},
        details={k: arrays[f"reward_detail_{i}"] for i, k in enumerate(r["details"])},
        stats=r["stats"], metrics=r["metrics"], weights=r["weights"], judges=list(r["judges"]),
        reasons=r["reasons"],
    )
    return rollouts, rewards


def _episode_fields(episode: Episode) -> dict[str, Any]:
    """An episode's record without its environment (the reward has already used it)."""
    return {f.name: getattr(episode, f.name) for f in dataclasses.fields(episode) if f.name != "env"}
