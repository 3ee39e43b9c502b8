"""Group-relative advantages: A = r - mean(group), optionally divided by a standard deviation.

Rows are N = B * G completions, G per prompt, groups contiguous (row n is in group n // G).

Conventions (the same as TRL's GRPOTrainer):
  * standard deviations are *unbiased* (Bessel's correction, divide by count - 1), as TRL's
    `nanstd` and torch's `std` default;
  * A = (r - mean_group) / (std + eps) with eps = 1e-4 for scale "group" (std of the group) and
    "batch" (std of all rewards in the batch; the mean is still the group's); "none" is r - mean_group;
  * missing rewards (None / NaN, e.g. a reward function that could not score a completion) drop out
    of every statistic and their rows get advantage 0.

Zero-variance groups (all valid rewards equal, or fewer than two valid rewards) carry no learning
signal; their rows get advantage 0 and are reported in `zero_std_mask`, which a trainer can use to
drop them from the loss (`AdvantageResult.row_mask(drop_zero_std=True)`).

Distributed training: groups stay whole on one process, so group statistics are local; only the
"batch" scale needs the whole batch. All-reduce (sum) `RewardMoments.of(rewards).as_array()` across
processes and pass `batch_stats=RewardMoments.from_array(total).mean_std()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MlxRftError

SCALES = ("group", "batch", "none")
# Groups whose std is this close to 0 count as zero-variance (TRL: torch.isclose(std, 0)).
ZERO_STD_ATOL = 1e-8


@dataclass
class AdvantageResult:
    """Advantages and the statistics behind them (B = N / G groups)."""

    advantages: np.ndarray  # [N] float32; 0 for rows without a reward and in zero-variance groups
    zero_std_mask: np.ndarray  # [N] bool, rows whose group has zero reward variance
    valid_mask: np.ndarray  # [N] bool, rows with a reward (not None / NaN)
    num_zero_std_groups: int
    group_mean: np.ndarray  # [B] float64, mean of valid rewards; NaN for groups without any
    group_std: np.ndarray  # [B] float64, unbiased std of valid rewards; 0 with < 2 valid rewards
    batch_mean: float  # mean of all valid rewards (or the given batch_stats)
    batch_std: float  # unbiased std of all valid rewards (or the given batch_stats); 0 if < 2

    def row_mask(self, drop_zero_std: bool = False) -> np.ndarray:
        """[N] float32 row weights for the loss mask: 0 for zero-variance groups when asked.

        Multiply it into the completion mask (mask * row_mask[:, None]). Rows without a reward are
        kept, as TRL does: their advantage is 0, so they only add the KL term.
        """
        keep = ~self.zero_std_mask if drop_zero_std else np.ones_like(self.zero_std_mask)
        return keep.astype(np.float32)


@dataclass(frozen=True)
class RewardMoments:
    """Count, sum and sum of squares of valid rewards: additive, so they all-reduce with a sum.

    Computed in float64; the sum-of-squares variance loses precision only when |mean| exceeds the
    std by ~1e6, far beyond reward scales.
    """

    count: float
    total: float
    total_sq: float

    @classmethod
    def of(cls, rewards: np.ndarray | Sequence[float | None]) -> "RewardMoments":
        r = _as_rewards(rewards)
        v = r[~np.isnan(r)]
        return cls(float(v.size), float(v.sum()), float((v * v).sum()))

    def __add__(self, other: "RewardMoments") -> "RewardMoments":
        return RewardMoments(
            self.count + other.count, self.total + other.total, self.total_sq + other.total_sq
        )

    def as_array(self) -> np.ndarray:
        return np.array([self.count, self.total, self.total_sq], dtype=np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray | Sequence[float]) -> "RewardMoments":
        count, total, total_sq = (float(x) for x in a)
        return cls(count, total, total_sq)

    def mean_std(self) -> tuple[float, float]:
        """(mean, unbiased std); NaN mean without rewards, std 0 with fewer than two."""
        if self.count == 0:
            return float("nan"), 0.0
        mean = self.total / self.count
        if self.count < 2:
            return mean, 0.0
        var = (self.total_sq - self.count * mean * mean) / (self.count - 1)
        return mean, float(np.sqrt(max(var, 0.0)))


def _as_rewards(rewards: np.ndarray | Sequence[float | None]) -> np.ndarray:
    """float64 [N] with None -> NaN; refuses other shapes and infinities."""
    if isinstance(rewards, np.ndarray) and rewards.dtype != object:
        r = rewards.astype(np.float64)
    else:
        try:
            r = np.array([np.nan if x is None else float(x) for x in rewards], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise MlxRftError(
                f"rewards must be numbers or None ({e}); make every reward function return a "
                "float (or None when it cannot score a completion)"
            ) from e
    if r.ndim != 1:
        raise MlxRftError(
            f"rewards must be one value per completion (shape [N]), got shape {r.shape}; sum the "
            "reward functions' outputs per completion first"
        )
    if np.isinf(r).any():
        n = int(np.flatnonzero(np.isinf(r))[0])
        raise MlxRftError(
            f"reward {n} is {r[n]}; reward functions must return finite numbers (or None when "
            "they cannot score a completion)"
        )
    return r


def _masked_mean_std(x: np.ndarray, valid: np.ndarray, axis: int | None) -> tuple:
    """Mean and unbiased std over valid entries; mean NaN with no entry, std 0 with < 2."""
    count = valid.sum(axis=axis)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        dev = np.where(valid, x - (mean if axis is None else np.expand_dims(mean, axis)), 0.0)
        var = (dev * dev).sum(axis=axis) / np.maximum(count - 1, 1)
    std = np.where(count > 1, np.sqrt(var), 0.0)
    return mean, std


def group_advantages(
    rewards: np.ndarray | Sequence[float | None],
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    *,
    batch_stats: tuple[float, float] | None = None,
) -> AdvantageResult:
    """Group-relative advantages of N = B * G rewards (see the module docstring for the formulas).

    Args:
        rewards: [N] rewards, None or NaN where a completion has no reward.
        group_size: G >= 2 completions per prompt; rows n // G share a prompt.
        scale: "group" (divide by the group's std), "batch" (by the batch's std) or "none".
        eps: added to the std before dividing (TRL: 1e-4).
        batch_stats: (mean, std) of the rewards over the whole batch, e.g. all-reduced across
            processes with `RewardMoments`; only the std is used (for scale "batch"), the mean is
            reported. Defaults to this call's rewards.
    """
    if scale not in SCALES:
        raise MlxRftError(f"unknown advantage scale {scale!r}; choose one of {', '.join(SCALES)}")
    if not isinstance(group_size, (int, np.integer)) or group_size < 2:
        raise MlxRftError(
            f"group_size must be an integer >= 2, got {group_size!r}: the GRPO baseline is the mean "
            "reward of the other completions of the same prompt, so with one completion per "
            "prompt every advantage is 0; sample G >= 2 completions per prompt"
        )
    if not eps >= 0:
        raise MlxRftError(f"eps must be >= 0, got {eps}")
    r = _as_rewards(rewards)
    n = r.size
    if n % group_size:  # (0 rows is a valid, empty batch: a process that kept no group)
        raise MlxRftError(
            f"{n} rewards are not a whole number of groups of {group_size}; pass all G completions "
            "of every prompt (N = number of prompts x group_size)"
        )
    groups = r.reshape(-1, group_size)
    valid = ~np.isnan(groups)

    group_mean, group_std = _masked_mean_std(groups, valid, axis=1)
    zero_std = np.isclose(group_std, 0.0, rtol=0.0, atol=ZERO_STD_ATOL)  # includes < 2 valid
    if batch_stats is None:
        batch_mean, batch_std = (float(v) for v in _masked_mean_std(r, ~np.isnan(r), axis=None))
    else:
        batch_mean, batch_std = (float(v) for v in batch_stats)
        if not batch_std >= 0:
            raise MlxRftError(f"batch_stats std must be >= 0, got {batch_std}")

    centred = np.where(valid, groups - group_mean[:, None], 0.0)
    if scale == "group":
        adv = centred / (group_std[:, None] + eps)
    elif scale == "batch":
        adv = centred / (batch_std + eps)
    else:
        adv = centred
    # Zero-variance groups: r - mean is 0 up to rounding; make it exactly 0.
    adv = np.where(zero_std[:, None] | ~valid, 0.0, adv)

    return AdvantageResult(
        advantages=adv.reshape(-1).astype(np.float32),
        zero_std_mask=np.repeat(zero_std, group_size),
        valid_mask=valid.reshape(-1),
        num_zero_std_groups=int(zero_std.sum()),
        group_mean=group_mean,
        group_std=group_std,
        batch_mean=batch_mean,
        batch_std=batch_std,
    )
