"""GRPO-family policy losses: one pure function per variant, chosen from `LOSSES`.

Shapes: N completions (rows), T completion positions. Inputs are per-token log-probs of the sampled
tokens under the current policy (`logp`, differentiable), the behaviour policy that sampled them
(`old_logp`; None means "this very policy", i.e. stop_gradient(logp), so the ratio is 1 and the
gradient is REINFORCE's) and, for the KL penalty, a frozen reference policy (`ref_logp`).

Per token (A = the row's advantage, eps_low = epsilon, eps_high = epsilon_high or epsilon):

    log_w = logp - old_logp                       importance_sampling_level "token"
    log_w = sum_t m_t (logp - old_logp) / |y|     "sequence" (GSPO): one weight per row
    r = exp(log_w)
    clipped PPO (grpo, bnpo, dr_grpo, dapo):
        loss_t = -min(min(r, delta) * A, clip(r, 1 - eps_low, 1 + eps_high) * A)   (delta optional)
    cispo (MiniMax-M1):
        loss_t = -stop_gradient(min(r, 1 + eps_high)) * A * logp_t
    loss_t *= w_t                                 off_policy_correction tis / mis (below)
    loss_t *= entropy_mask_t                      top_entropy_quantile < 1
    loss_t += beta * (exp(ref - logp) - (ref - logp) - 1)     k3 KL estimator, beta > 0
    loss_t -= entropy_coef * H_t                  entropy bonus, H_t = entropy of softmax(z_t / T)

Rollouts from older weights (separate rollout workers): old_logp is then the proximal policy
(this step's weights; None), the behaviour log-probs b come separately, and
    w_t = exp(old_logp - b)   tis: min(w_t, C)     mis: w_t if w_t <= C else 0
(truncated / masked importance sampling, C = off_policy_cap).

Aggregation over the mask m (the variants differ only here and in the per-token term), with
S = num_sequences (rows in the whole accumulated batch; default N, this micro-batch's rows):

    grpo      sum over rows of  (sum_t m l / max(sum_t m, 1))  / S
    bnpo      (sum m l / max(sum m, 1)) * N / S                  token mean of this micro-batch
    dr_grpo   sum m l / (S * max_completion_length)
    dapo      sum m l / global_token_count                       (whole accumulated batch)
    cispo     as dapo

This is TRL's `GRPOTrainer._compute_loss`, with two deliberate differences in parametrisation:
CISPO's cap is 1 + epsilon_high (the paper's form; TRL's `epsilon_high` is the cap itself, so TRL's
5.0 is 4.0 here), and the sequence level is GSPO as TRL writes it (the gradient flows through the
mean log-ratio); GSPO-token's stop-gradient form gives the same value and, with one advantage per
row as here, the same gradient for every aggregation, so it is not a separate option.

Gradient accumulation and several processes: pass `num_sequences` (all rows of the accumulated
batch, over all processes) and `global_token_count` (all masked-in completion tokens of it), then
*sum* the micro-batch losses and gradients (and sum, not average, gradients across processes). For
grpo, dr_grpo, dapo and cispo the sum is then exactly the full-batch loss; for bnpo it is the
row-weighted mean of the micro-batches' token means (TRL's mean over equal micro-batches).
With neither given, each call is the plain loss of its own batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import mlx.core as mx
import numpy as np

from ..errors import MlxRftError

IMPORTANCE_LEVELS = ("token", "sequence")
OFF_POLICY = ("none", "tis", "mis")


@dataclass
class LossConfig:
    """Which GRPO-family loss to use and its hyper-parameters (TRL names and defaults)."""

    loss_type: str = "dapo"  # one of LOSSES: grpo, bnpo, dr_grpo, dapo, cispo
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip 1 + epsilon_high (DAPO: 0.28); None -> epsilon
    delta: float | None = None  # cap on r in the unclipped term (INTELLECT-2); use > 1 + eps_high
    beta: float = 0.0  # KL-to-reference coefficient; 0 needs no reference model
    importance_sampling_level: str = "token"  # "token" or "sequence" (GSPO)
    max_completion_length: int | None = None  # dr_grpo's constant normaliser (max_new_tokens)
    top_entropy_quantile: float = 1.0  # keep the top fraction of tokens by entropy; 1 keeps all
    entropy_coef: float = 0.0  # entropy bonus: - entropy_coef * H_t per token (needs entropy)
    # Rollouts made with older weights (separate rollout workers): weight each token's policy term
    # by w = pi_proximal / pi_behaviour, truncated at the cap (tis) or zeroed above it (mis).
    off_policy_correction: str = "none"  # one of OFF_POLICY: none, tis, mis
    off_policy_cap: float = 2.0

    def __post_init__(self):
        if self.loss_type not in LOSSES:
            raise MlxRftError(
                f"loss_type={self.loss_type!r} is not valid; choose one of {', '.join(LOSSES)}"
            )
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            raise MlxRftError(
                f"importance_sampling_level={self.importance_sampling_level!r} is not valid; "
                f"choose one of {', '.join(IMPORTANCE_LEVELS)}"
            )
        if not 0 <= self.epsilon < 1:
            raise MlxRftError(f"epsilon={self.epsilon} must be in [0, 1): the lower clip is ratio >= 1 - epsilon")
        if not self.eps_high >= 0:
            raise MlxRftError(f"epsilon_high={self.epsilon_high} must be >= 0 (or empty to use epsilon)")
        if self.delta is not None and not self.delta > 1:
            raise MlxRftError(
                f"delta={self.delta} must be > 1 (a cap on the probability ratio; INTELLECT-2 "
                "uses 4), or leave it unset"
            )
        if not self.beta >= 0:
            raise MlxRftError(f"beta={self.beta} must be >= 0")
        if not 0 <= self.top_entropy_quantile <= 1:
            raise MlxRftError(
                f"top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1] (1 keeps "
                "every token)"
            )
        if self.off_policy_correction not in OFF_POLICY:
            raise MlxRftError(
                f"off_policy_correction={self.off_policy_correction!r} is not valid; choose one of "
                f"{', '.join(OFF_POLICY)}"
            )
        if not (np.isfinite(self.off_policy_cap) and self.off_policy_cap > 1):
            raise MlxRftError(
                f"off_policy_cap={self.off_policy_cap} must be a finite number > 1 (e.g. 2)"
            )
        if not (self.entropy_coef >= 0 and np.isfinite(self.entropy_coef)):
            raise MlxRftError(f"entropy_coef={self.entropy_coef} must be a finite number >= 0 (0 = off)")
        if self.loss_type == "dr_grpo" and not (self.max_completion_length or 0) > 0:
            raise MlxRftError(
                "loss_type dr_grpo divides by a constant max_completion_length; set it to the "
                "generation limit (max_new_tokens)"
            )

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass
class LossStats:
    """Diagnostics of one loss evaluation, as float32 mx scalars without gradient.

    Token-level fractions are over masked-in tokens; with importance_sampling_level "sequence"
    they are over rows with at least one token. Use `as_dict()` to return them from a function
    under `mx.value_and_grad` (dataclasses are not MLX trees).
    """

    clip_low: mx.array  # ratio < 1 - eps_low with A < 0 (the clip stops the gradient)
    clip_high: mx.array  # ratio > 1 + eps_high with A > 0 (cispo: capped weight)
    clip_region: mx.array  # either
    ratio_mean: mx.array  # mean importance ratio r (before any clipping)
    num_tokens: mx.array  # masked-in completion tokens in this micro-batch
    num_loss_tokens: mx.array  # tokens the policy term applies to (after entropy masking)
    kl_mean: mx.array | None = None  # mean k3 KL to the reference (when ref_logp is given)
    entropy_mean: mx.array | None = None  # mean token entropy (when entropy is given)
    # off_policy_correction: mean of w = pi_proximal / pi_behaviour before the cap, and the
    # fraction of tokens above the cap (truncated by tis, dropped by mis)
    is_weight_mean: mx.array | None = None
    is_capped: mx.array | None = None

    def as_dict(self) -> dict[str, mx.array]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: dict[str, mx.array]) -> "LossStats":
        return cls(**d)


LossFn = Callable[..., tuple[mx.array, LossStats]]


def mask_truncated_completions(
    mask: mx.array, truncated: Sequence[bool] | Sequence[str] | np.ndarray | mx.array
) -> mx.array:
    """Zero the mask rows of completions cut off by the length limit (DAPO's overlong filtering).

    `truncated` is [N] bools, or the rollout's finish reasons ("length" means truncated).
    """
    if len(truncated) and isinstance(truncated[0], str):
        truncated = [reason == "length" for reason in truncated]
    keep = 1.0 - mx.array(np.asarray(truncated, dtype=np.float32))
    if keep.shape != (mask.shape[0],):
        raise MlxRftError(
            f"{keep.shape[0]} truncation flags for {mask.shape[0]} mask rows; pass one per completion"
        )
    return mask * keep[:, None].astype(mask.dtype)


def high_entropy_mask(entropy: mx.array, mask: mx.array, top_quantile: float) -> mx.array:
    """[N, T] float mask of masked-in tokens whose entropy is >= the (1 - top_quantile) quantile.

    The quantile is over masked-in tokens, with linear interpolation (numpy / torch.quantile
    default), as TRL's `get_high_entropy_mask`. Computed in MLX without a host sync.
    """
    valid = mask > 0
    ent = mx.stop_gradient(entropy).astype(mx.float32)
    count = valid.sum()
    ordered = mx.sort(mx.where(valid, ent, mx.inf).reshape(-1))
    pos = (1.0 - top_quantile) * mx.maximum(count - 1, 0).astype(mx.float32)
    lo = mx.floor(pos).astype(mx.int32)
    hi = mx.minimum(lo + 1, mx.maximum(count - 1, 0))
    a, b = ordered[lo], ordered[hi]
    # a + (pos - lo) * (b - a), but exact when pos is an integer (b may be the +inf padding).
    frac = pos - lo.astype(mx.float32)
    threshold = mx.where(frac > 0, a + frac * (b - a), a)
    return ((ent >= threshold) & valid).astype(mx.float32)


# ----------------------------------------------------------------------------------------------
# Shared per-token pieces


def _prepare(logp, old_logp, ref_logp, advantages, mask, cfg, entropy):
    if logp.ndim != 2:
        raise MlxRftError(f"logp must be [N, T], got shape {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("entropy", entropy)):
        if x is not None and tuple(x.shape) != shape:
            raise MlxRftError(f"{name} has shape {tuple(x.shape)}, expected {shape} like logp")
    advantages = mx.array(advantages) if not isinstance(advantages, mx.array) else advantages
    if advantages.ndim == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    if tuple(advantages.shape) != shape[:1]:
        raise MlxRftError(
            f"advantages must be [N] = [{shape[0]}] (one per completion), got {tuple(advantages.shape)}"
        )
    if cfg.beta > 0 and ref_logp is None:
        raise MlxRftError(
            f"beta={cfg.beta} adds a KL penalty to a reference policy, but ref_logp is None; compute "
            "reference log-probs with the frozen initial model, or set beta to 0"
        )
    if cfg.top_entropy_quantile < 1 and entropy is None:
        raise MlxRftError(
            "top_entropy_quantile < 1 masks tokens by entropy, but no entropy was passed; compute "
            "log-probs with with_entropy=True, or set top_entropy_quantile to 1"
        )
    if cfg.entropy_coef > 0 and entropy is None:
        raise MlxRftError(
            "entropy_coef > 0 adds an entropy bonus, but no entropy was passed; compute log-probs "
            "with with_entropy=True, or set entropy_coef to 0"
        )
    mask = mask.astype(mx.float32)
    if old_logp is None:
        old_logp = mx.stop_gradient(logp)
    return advantages.astype(mx.float32)[:, None], mask, old_logp


def _log_weights(logp, old_logp, mask, level):
    """Log importance weights: [N, T] per token, or [N, 1] per sequence (GSPO)."""
    # `where`, not a product: padding may hold anything, and exp(garbage) * 0 can be NaN.
    log_ratio = mx.where(mask > 0, logp - old_logp, 0.0)
    if level == "token":
        return log_ratio
    lengths = mx.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
    return (log_ratio * mask).sum(axis=-1, keepdims=True) / lengths


def _masked_mean(x, mask):
    """Mean of x over masked-in tokens ([N, T] x) or over rows with a token ([N, 1] x)."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        rows = (mask.sum(axis=-1, keepdims=True) > 0).astype(mx.float32)
        return (x * rows).sum() / mx.maximum(rows.sum(), 1.0)
    return (x * mask).sum() / mx.maximum(mask.sum(), 1.0)


def _kl(logp, ref_logp, mask):
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = mx.where(mask > 0, ref_logp - logp, 0.0)
    return mx.exp(d) - d - 1.0


def _finish(per_token, logp, ref_logp, mask, cfg, entropy, stats):
    """Entropy-mask the policy term, add beta * KL; returns the [N, T] per-token loss and stats."""
    loss_mask = mask
    if cfg.top_entropy_quantile < 1:
        ent_mask = high_entropy_mask(entropy, mask, cfg.top_entropy_quantile)
        per_token = per_token * ent_mask
        loss_mask = ent_mask
    kl_mean = None
    if ref_logp is not None:
        kl = _kl(logp, ref_logp, mask)
        kl_mean = mx.stop_gradient(_masked_mean(kl, mask))
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl
    if cfg.entropy_coef > 0:  # on every masked-in token, like the KL term (differentiable)
        per_token = per_token - cfg.entropy_coef * entropy
    per_token = mx.where(mask > 0, per_token, 0.0)  # [N, T] also for sequence-level terms
    stats = LossStats(
        **stats,
        num_tokens=mask.sum(),
        num_loss_tokens=loss_mask.sum(),
        kl_mean=kl_mean,
        entropy_mean=None if entropy is None else mx.stop_gradient(_masked_mean(entropy, mask)),
    )
    return per_token, stats


def _clipped_terms(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, is_weight=None):
    """PPO-clipped per-token loss (grpo, bnpo, dr_grpo, dapo) and its stats."""
    adv, mask, old_logp = _prepare(logp, old_logp, ref_logp, advantages, mask, cfg, entropy)
    ratio = mx.exp(_log_weights(logp, old_logp, mask, cfg.importance_sampling_level))
    clipped = mx.clip(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.eps_high)
    unclipped = ratio if cfg.delta is None else mx.minimum(ratio, cfg.delta)
    per_token = -mx.minimum(unclipped * adv, clipped * adv)
    if is_weight is not None:
        per_token = per_token * is_weight

    r = mx.stop_gradient(ratio)
    low = ((r < 1.0 - cfg.epsilon) & (adv < 0)).astype(mx.float32)
    high = ((r > 1.0 + cfg.eps_high) & (adv > 0)).astype(mx.float32)
    stats = dict(
        clip_low=_masked_mean(low, mask),
        clip_high=_masked_mean(high, mask),
        clip_region=_masked_mean(mx.maximum(low, high), mask),
        ratio_mean=_masked_mean(r, mask),
    )
    return (*_finish(per_token, logp, ref_logp, mask, cfg, entropy, stats), mask)


def _cispo_terms(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, is_weight=None):
    """CISPO per-token loss: REINFORCE weighted by the capped, stop-gradient importance ratio."""
    adv, mask, old_logp = _prepare(logp, old_logp, ref_logp, advantages, mask, cfg, entropy)
    ratio = mx.stop_gradient(mx.exp(_log_weights(logp, old_logp, mask, cfg.importance_sampling_level)))
    cap = 1.0 + cfg.eps_high
    weight = mx.minimum(ratio, cap)
    per_token = -weight * adv * logp
    if is_weight is not None:
        per_token = per_token * is_weight

    high = ((ratio > cap) & (adv > 0)).astype(mx.float32)
    zero = mx.array(0.0)
    stats = dict(
        clip_low=zero,
        clip_high=_masked_mean(high, mask),
        clip_region=_masked_mean(high, mask),
        ratio_mean=_masked_mean(ratio, mask),
    )
    return (*_finish(per_token, logp, ref_logp, mask, cfg, entropy, stats), mask)


def _token_sum_over(per_token, mask, normaliser):
    return (per_token * mask).sum() / normaliser


# ----------------------------------------------------------------------------------------------
# The variants. All share one signature:
#   fn(logp, old_logp, ref_logp, advantages, mask, cfg, *, entropy=None, global_token_count=None,
#      num_sequences=None)
#       -> (loss scalar, LossStats)


def grpo_loss(
    logp: mx.array,
    old_logp: mx.array | None,
    ref_logp: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    cfg: LossConfig,
    *,
    entropy: mx.array | None = None,
    global_token_count: float | mx.array | None = None,
    num_sequences: int | None = None,
    is_weight: mx.array | None = None,
) -> tuple[mx.array, LossStats]:
    """Original GRPO: token mean within each completion, then mean over completions."""
    per_token, stats, mask = _clipped_terms(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, is_weight)
    per_row = (per_token * mask).sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)
    return per_row.sum() / _rows(mask, num_sequences), stats


def bnpo_loss(
    logp: mx.array,
    old_logp: mx.array | None,
    ref_logp: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    cfg: LossConfig,
    *,
    entropy: mx.array | None = None,
    global_token_count: float | mx.array | None = None,
    num_sequences: int | None = None,
    is_weight: mx.array | None = None,
) -> tuple[mx.array, LossStats]:
    """BNPO: token mean over the (local) micro-batch."""
    per_token, stats, mask = _clipped_terms(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, is_weight)
    share = mask.shape[0] / _rows(mask, num_sequences)
    return _token_sum_over(per_token, mask, mx.maximum(mask.sum(), 1.0)) * share, stats


def dr_grpo_loss(
    logp: mx.array,
    old_logp: mx.array | None,
    ref_logp: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    cfg: LossConfig,
    *,
    entropy: mx.array | None = None,
    global_token_count: float | mx.array | None = None,
    num_sequences: int | None = None,
    is_weight: mx.array | None = None,
) -> tuple[mx.array, LossStats]:
    """Dr. GRPO: token sum over a constant N * max_completion_length (no length bias)."""
    per_token, stats, mask = _clipped_terms(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, is_weight)
    return _token_sum_over(per_token, mask, _rows(mask, num_sequences) * cfg.max_completion_length), stats


def _rows(mask, num_sequences) -> float:
    if num_sequences is None:
        return float(mask.shape[0])
    if not num_sequences >= mask.shape[0]:
        raise MlxRftError(
            f"num_sequences={num_sequences} is smaller than this micro-batch's {mask.shape[0]} rows; "
            "pass the number of completions in the whole accumulated batch"
        )
    return float(num_sequences)


def _global_count(mask, global_token_count):
    if global_token_count is None:
        return mx.maximum(mask.sum(), 1.0)
    return mx.maximum(mx.array(global_token_count, dtype=mx.float32), 1.0)


def dapo_loss(
    logp: mx.array,
    old_logp: mx.array | None,
    ref_logp: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    cfg: LossConfig,
    *,
    entropy: mx.array | None = None,
    global_token_count: float | mx.array | None = None,
    num_sequences: int | None = None,
    is_weight: mx.array | None = None,
) -> tuple[mx.array, LossStats]:
    """DAPO: token sum over the token count of the whole accumulated (multi-process) batch."""
    per_token, stats, mask = _clipped_terms(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, is_weight)
    return _token_sum_over(per_token, mask, _global_count(mask, global_token_count)), stats


def cispo_loss(
    logp: mx.array,
    old_logp: mx.array | None,
    ref_logp: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    cfg: LossConfig,
    *,
    entropy: mx.array | None = None,
    global_token_count: float | mx.array | None = None,
    num_sequences: int | None = None,
    is_weight: mx.array | None = None,
) -> tuple[mx.array, LossStats]:
    """CISPO (MiniMax-M1): capped stop-gradient IS weight x A x logp, aggregated as dapo."""
    per_token, stats, mask = _cispo_terms(logp, old_logp, ref_logp, advantages, mask, cfg, entropy, is_weight)
    return _token_sum_over(per_token, mask, _global_count(mask, global_token_count)), stats


LOSSES: dict[str, LossFn] = {
    "grpo": grpo_loss,
    "bnpo": bnpo_loss,
    "dr_grpo": dr_grpo_loss,
    "dapo": dapo_loss,
    "cispo": cispo_loss,
}


def compute_loss(
    cfg: LossConfig,
    logp: mx.array,
    old_logp: mx.array | None,
    ref_logp: mx.array | None,
    advantages: mx.array | np.ndarray,
    mask: mx.array,
    *,
    entropy: mx.array | None = None,
    global_token_count: float | mx.array | None = None,
    num_sequences: int | None = None,
    behaviour_logp: mx.array | None = None,
) -> tuple[mx.array, LossStats]:
    """The `cfg.loss_type` loss; see the module docstring for the formulas.

    Args:
        cfg: the loss configuration.
        logp: [N, T] log-probs of the sampled tokens under the current policy (differentiable).
        old_logp: [N, T] log-probs under the behaviour policy, or None (= stop_gradient(logp)).
        ref_logp: [N, T] reference-policy log-probs; needed only when cfg.beta > 0 (reported as
            kl_mean whenever given).
        advantages: [N], one per completion.
        mask: [N, T], 1 for completion tokens that count (apply `mask_truncated_completions` and
            `AdvantageResult.row_mask` here).
        entropy: [N, T] token entropies, needed when cfg.top_entropy_quantile < 1.
        global_token_count: dapo / cispo normaliser, the masked-in tokens of the whole accumulated
            batch over all processes; defaults to this micro-batch's count.
        num_sequences: grpo / bnpo / dr_grpo normaliser, the rows of the whole accumulated batch
            over all processes; defaults to this micro-batch's N.
        behaviour_logp: [N, T] log-probs under the policy that sampled the tokens, when that is
            not old_logp's (rollouts from older weights). With cfg.off_policy_correction tis or
            mis each token's policy term is weighted by `off_policy_weights`; with none it is
            ignored (pass the behaviour log-probs as old_logp instead).
    """
    try:
        fn = LOSSES[cfg.loss_type]
    except KeyError:
        raise MlxRftError(
            f"unknown loss_type {cfg.loss_type!r}; choose one of {', '.join(LOSSES)}"
        ) from None
    weight, extra = None, {}
    if cfg.off_policy_correction != "none" and behaviour_logp is not None:
        proximal = mx.stop_gradient(logp if old_logp is None else old_logp)
        weight, extra["is_weight_mean"], extra["is_capped"] = off_policy_weights(
            proximal, behaviour_logp, mask, cfg.off_policy_correction, cfg.off_policy_cap
        )
    loss, stats = fn(
        logp, old_logp, ref_logp, advantages, mask, cfg,
        entropy=entropy, global_token_count=global_token_count, num_sequences=num_sequences,
        is_weight=weight,
    )
    for name, value in extra.items():
        setattr(stats, name, value)
    return loss, stats


def off_policy_weights(
    proximal_logp: mx.array, behaviour_logp: mx.array, mask: mx.array, mode: str, cap: float
) -> tuple[mx.array, mx.array, mx.array]:
    """Per-token weights for tokens sampled by an older policy (no gradient).

    w = pi_proximal / pi_behaviour = exp(proximal - behaviour); tis (truncated importance
    sampling) uses min(w, cap), mis (masked importance sampling) uses w where w <= cap and 0
    above it. Returns ([N, T] weights, mean w over masked-in tokens, fraction above the cap).
    """
    if mode not in ("tis", "mis"):
        raise MlxRftError(f"off-policy correction {mode!r} is not valid; choose tis or mis")
    mask = mask.astype(mx.float32)
    w = mx.exp(mx.where(mask > 0, mx.stop_gradient(proximal_logp) - behaviour_logp, 0.0))
    above = w > cap
    out = mx.minimum(w, cap) if mode == "tis" else mx.where(above, 0.0, w)
    return out * mask, _masked_mean(w, mask), _masked_mean(above.astype(mx.float32), mask)
