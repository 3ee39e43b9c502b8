"""One GRPO step as named stages over typed records.

    collect      prompts -> Trajectory (rollouts, rewards, advantages, loss mask)     trainer
    reference    Trajectory.ref_logprobs (beta > 0 only)                                trainer
    batches      Trajectory -> [TrainBatch] (live groups, micro-batches)  `train_batches` here
    update       [TrainBatch] -> UpdateStats (num_iterations optimizer updates)         trainer
    metrics      Trajectory + UpdateStats -> one metrics row              `step_metrics` here

The records are what a reader (or a replacement stage) needs to know; the pure functions here
take no model and are tested directly. The trainer owns the stages that run the model.
A loss is a `LossFn`: `(model, batch, totals) -> (scalar loss, {stat name: scalar})`, where
totals holds the whole step's normalisers (`num_sequences`, `global_token_count`), so the
gradients of the micro-batches (and processes) add up to the full batch's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..algo.advantages import AdvantageResult
from ..episodes.runner import episode_metrics
from ..algo.losses import compute_loss
from ..config import GRPOConfig
from ..policy.checkpointing import checkpointed_layers
from ..policy.logprobs import sequence_logprobs
from ..rewards.base import RewardResult
from ..types import PromptExample, RolloutBatch

# LossStats fields -> metric names (the health monitor reads clip/region_frac).
STAT_NAMES = {
    "clip_low": "clip/low_frac", "clip_high": "clip/high_frac", "clip_region": "clip/region_frac",
    "ratio_mean": "ratio/mean", "kl_mean": "kl", "entropy_mean": "entropy",
    "num_tokens": "tokens/completion", "num_loss_tokens": "tokens/in_loss",
    "is_weight_mean": "off_policy/is_weight_mean", "is_capped": "off_policy/capped_frac",
}
SUMMED_STATS = ("num_tokens", "num_loss_tokens")  # counts add up over micro-batches; the rest average


@dataclass
class Trajectory:
    """One step's rollouts on this process: B prompts x G completions, rewards and advantages."""

    examples: list[PromptExample]
    rollouts: RolloutBatch
    rewards: RewardResult
    advantages: AdvantageResult
    row_keep: np.ndarray  # [N] 1.0 for rows in the loss (dropped groups, masked truncations: 0)
    loss_mask: mx.array  # [N, T] the completion mask times row_keep
    ref_logprobs: mx.array | None = None  # [N, T] under the reference policy (beta > 0)
    # [N, T] under this step's weights before its first update: the proximal policy of
    # off_policy_correction with num_iterations > 1 (with 1 it is the loss's own log-probs)
    proximal_logprobs: mx.array | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # generate, reward, logprobs
    # Every completion drawn this step, with dynamic sampling also the groups it filtered out
    # (their total rewards: the policy's reward, not only the kept batch's); None = `rewards`.
    drawn_rewards: np.ndarray | None = None
    sampling: dict[str, float] = field(default_factory=dict)  # dynamic sampling's metrics
    # Where the rollouts came from, with separate rollout workers: the weight version, staleness,
    # the trainer's wait (metric name -> value)
    source: dict[str, float] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.rollouts.group_size

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [e.prompt_ids for e in self.examples]


@dataclass
class TrainBatch:
    """One micro-batch of the gradient pass. With group_size G > 1 the rows are whole groups
    and each prompt runs once for its G completions; with 1 each row has its own prompt."""

    prompts: list[list[int]]
    group_size: int
    completion_ids: mx.array  # [n, T]
    mask: mx.array  # [n, T] loss mask
    old_logprobs: mx.array  # [n, T] behaviour log-probs recorded while sampling
    ref_logprobs: mx.array | None  # [n, T]
    advantages: mx.array  # [n]
    # Prompts with soft tokens: each prompt's pieces (PromptExample.pieces), embedded inside the
    # loss so that its gradient reaches the series encoder; None for text prompts.
    prompt_pieces: list | None = None
    proximal_logprobs: mx.array | None = None  # [n, T] (Trajectory.proximal_logprobs)

    @property
    def num_rows(self) -> int:
        return int(self.completion_ids.shape[0])


@dataclass
class UpdateStats:
    """What the update stage reports: the summed loss, norms and the loss's own statistics."""

    loss: float
    grad_norm: float
    update_norm: float
    loss_stats: dict[str, float] = field(default_factory=dict)  # metric name -> value

    def as_metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "grad_norm": self.grad_norm, "update_norm": self.update_norm,
                **self.loss_stats}


LossFn = Callable[[nn.Module, TrainBatch, dict[str, float]], tuple[mx.array, dict[str, mx.array]]]
BatchFn = Callable[[Trajectory, GRPOConfig], tuple[list[TrainBatch], np.ndarray]]


def grpo_loss(cfg: GRPOConfig) -> LossFn:
    """The configured GRPO-family loss on the policy's log-probs of a TrainBatch."""
    loss_cfg = cfg.loss_config()
    need_entropy = cfg.top_entropy_quantile < 1.0 or cfg.entropy_coef > 0

    def loss_fn(model: nn.Module, batch: TrainBatch, totals: dict[str, float]):
        # Entropy costs a second pass over [N, T, V], so it is computed only when entropy
        # masking or the entropy bonus needs it (then it is also logged).
        llm, embed = model, {}
        if batch.prompt_pieces is not None:  # model is a TimeSeriesLM
            llm = model.llm
            embed = {"prompt_embeddings": model.embed(batch.prompt_pieces, pad_left=True)[0]}
        with checkpointed_layers(llm) if cfg.gradient_checkpointing else contextlib.nullcontext():
            logp, entropy = sequence_logprobs(
                llm, batch.prompts, batch.completion_ids, batch.mask, batch.group_size,
                cfg.temperature, with_entropy=need_entropy, **embed,
            )
        # With an off-policy correction the ratio is taken against the proximal policy and the
        # behaviour log-probs give the correction's weights; without, against the behaviour.
        old, behaviour = batch.old_logprobs, None
        if cfg.off_policy_correction != "none":
            old, behaviour = batch.proximal_logprobs, batch.old_logprobs
        loss, stats = compute_loss(
            loss_cfg, logp, old, batch.ref_logprobs, batch.advantages, batch.mask,
            entropy=entropy, behaviour_logp=behaviour, **totals,
        )
        return loss, stats.as_dict()

    return loss_fn


def row_keep(adv: AdvantageResult, rollouts: RolloutBatch, cfg: GRPOConfig) -> np.ndarray:
    """[N] 1.0 for the rows the loss sees: dropped zero-std groups and (optionally) truncated
    completions are 0."""
    keep = adv.row_mask(drop_zero_std=cfg.drop_zero_std_groups)
    if cfg.mask_truncated_completions:
        keep = keep * np.array([r != "length" for r in rollouts.finish_reasons], dtype=np.float32)
    return keep


def micro_slices(n: int, group_size: int, m: int) -> list[slice]:
    """At most m contiguous slices covering n rows: on group boundaries (so each micro-batch
    runs its prompts once) when there are at least m groups."""
    groups = n // group_size
    if groups >= m:
        cuts = [group_size * (groups * i // m) for i in range(m + 1)]
    else:
        cuts = [n * i // m for i in range(m + 1)]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def live_rows(traj: Trajectory, cfg: GRPOConfig) -> np.ndarray:
    """Indices of the rows that can change the gradient, whole groups at a time.

    Rows whose mask is all zero never can; when the loss is exactly 0 at advantage 0 (no KL
    term, no entropy bonus, no entropy-quantile masking, which ranks all tokens) rows with
    advantage 0 cannot either. The step's normalisers still count every row, so the update is the full batch's."""
    G = traj.group_size
    live = traj.row_keep > 0
    if cfg.skip_zero_advantage and cfg.beta == 0 and cfg.top_entropy_quantile >= 1.0 and cfg.entropy_coef == 0:
        live &= np.asarray(traj.advantages.advantages) != 0
    groups = live.reshape(-1, G).any(axis=1)
    return np.flatnonzero(np.repeat(groups, G))


def train_batches(traj: Trajectory, cfg: GRPOConfig) -> tuple[list[TrainBatch], np.ndarray]:
    """The gradient pass's micro-batches (whole groups when they fit) and the rows they hold."""
    G = traj.group_size
    rows = live_rows(traj, cfg)
    prompts = traj.prompt_ids
    advantages = mx.array(np.asarray(traj.advantages.advantages, dtype=np.float32))
    ro = traj.rollouts
    batches = []
    for sl in micro_slices(len(rows), G, cfg.gradient_accumulation_steps):
        a, b = sl.start, sl.stop
        idx = mx.array(rows[a:b])
        if a % G == 0 and b % G == 0:
            owners, g = [r // G for r in rows[a:b:G]], G
        else:
            owners, g = [r // G for r in rows[a:b]], 1
        p = [prompts[o] for o in owners]
        pieces = None
        if traj.examples and traj.examples[0].pieces is not None:
            pieces = [traj.examples[o].pieces for o in owners]
        batches.append(TrainBatch(
            prompts=p, group_size=g, completion_ids=ro.completion_ids[idx],
            mask=traj.loss_mask[idx], old_logprobs=ro.logprobs[idx],
            ref_logprobs=None if traj.ref_logprobs is None else traj.ref_logprobs[idx],
            advantages=advantages[idx], prompt_pieces=pieces,
            proximal_logprobs=None if traj.proximal_logprobs is None else traj.proximal_logprobs[idx],
        ))
    return batches, rows


def combine_loss_stats(per_batch: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Micro-batch loss statistics -> step metrics: counts summed, the rest token-weighted."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    for stats, weight in per_batch:
        for k, v in stats.items():
            pairs.setdefault(k, []).append((v, weight))
    out = {}
    for k, vw in pairs.items():
        if k in SUMMED_STATS:
            out[STAT_NAMES[k]] = sum(v for v, _ in vw)
            continue
        tot = sum(w for _, w in vw)
        out[STAT_NAMES.get(k, k)] = sum(v * w for v, w in vw) / tot if tot else float("nan")
    return out


def step_metrics(
    traj: Trajectory, rows: np.ndarray, upd: UpdateStats, cfg: GRPOConfig, *,
    update_seconds: float, step_seconds: float, lr: float,
) -> dict[str, Any]:
    """One metrics row for the step (rank-local; the trainer all-reduces what must be global)."""
    ro, adv, G = traj.rollouts, traj.advantages.advantages, traj.group_size
    lengths = np.asarray(ro.completion_mask.sum(axis=1))  # sampled tokens
    gen_tokens = float(lengths.sum())
    prompts = traj.prompt_ids
    # Tokens the update runs over: episodes' environment replies too (fed, not trained on).
    extent = lengths + np.array([e.env_tokens for e in ro.episodes]) if ro.episodes else lengths
    trained_tokens = float(extent[rows].sum()) + sum(len(prompts[r // G]) for r in rows[::G])
    t = traj.seconds
    reward_stats = traj.rewards.summary()
    if traj.drawn_rewards is not None:
        drawn = traj.drawn_rewards[np.isfinite(traj.drawn_rewards)]
        reward_stats["reward/mean"] = float(drawn.mean()) if drawn.size else float("nan")
        reward_stats["reward/std"] = float(drawn.std()) if drawn.size else float("nan")
    return {
        **reward_stats,
        "advantage/mean": _stat(np.mean, adv),
        "advantage/std": _stat(np.std, adv),
        "advantage/abs_max": _stat(np.max, np.abs(adv)),
        "frac_zero_std_groups": traj.advantages.num_zero_std_groups / max(len(traj.examples), 1),
        "completion/mean_length": _stat(np.mean, lengths),
        "completion/min_length": _stat(np.min, lengths),
        "completion/max_length": _stat(np.max, lengths),
        "completion/truncated_frac": _stat(np.mean, np.array([r == "length" for r in ro.finish_reasons])),
        "completion/distinct_per_group": distinct_per_group(ro.texts, G),
        "entropy/sampled": sampled_entropy(ro.logprobs, ro.completion_mask),
        "tokens_per_sec/generate": gen_tokens / max(t.get("generate", 0.0), 1e-9),
        "tokens_per_sec/train": cfg.num_iterations * trained_tokens / max(update_seconds, 1e-9),
        "update/rows": len(rows),
        "time/generate": t.get("generate", 0.0), "time/reward": t.get("reward", 0.0),
        "time/logprobs": t.get("logprobs", 0.0), "time/update": update_seconds,
        "time/step": step_seconds,
        "memory/peak_gb": mx.get_peak_memory() / 1e9,
        "lr": lr,
        **upd.as_metrics(),
        "tokens/completion": gen_tokens,  # all generated tokens, not only those in the update
        **traj.sampling,
        **traj.source,
        **(episode_metrics(ro.episodes) if ro.episodes else {}),
    }


def _stat(fn, values: np.ndarray) -> float:
    """fn(values) as a float; NaN for no values (a process that kept no group this step)."""
    return float(fn(values)) if np.size(values) else float("nan")


def sampled_entropy(logprobs: mx.array, mask: mx.array) -> float:
    """Mean of -log p over the sampled tokens: an unbiased estimate of the policy's per-token
    entropy at the sampling temperature, free from the behaviour log-probs (no extra pass)."""
    n = float(mask.sum().item())
    return float(-(logprobs * mask).sum().item() / n) if n else float("nan")


def distinct_per_group(texts: list[str], group_size: int) -> float:
    """Mean number of different completions in a group (1 = all G samples identical)."""
    groups = [texts[i : i + group_size] for i in range(0, len(texts), group_size)]
    return float(np.mean([len(set(g)) for g in groups])) if groups else float("nan")


def rollout_records(step: int, traj: Trajectory) -> list[dict[str, Any]]:
    """rollouts.jsonl lines: each completion with its prompt, rewards and advantage."""
    G, rw = traj.group_size, traj.rewards
    return [
        {
            "step": step, "prompt": traj.examples[i // G].prompt, "completion": text,
            "reward": _num(rw.total[i]), "advantage": float(traj.advantages.advantages[i]),
            "finish_reason": traj.rollouts.finish_reasons[i],
            **{f"reward/{k}": _num(v[i]) for k, v in rw.per_func.items()},
            **({"episode": traj.rollouts.episodes[i].as_record()} if traj.rollouts.episodes else {}),
        }
        for i, text in enumerate(traj.rollouts.texts)
    ]


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
