"""The reward-function API: N completions in, N scores out, several functions combined by weight.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, plain or `async`:

- `prompts`, `completions`: N strings (row n answers prompt n // G; prompts repeat per group).
- `columns`: the dataset's extra columns, each a list of N values aligned with the completions
  (e.g. `answer=[...]`, `tests=[...]`), plus `completion_ids` (N token-id lists) when the caller
  has them. A function receives only the columns it names, unless it takes `**kwargs`.
- It returns N scores; `None` (or NaN) means "cannot score this row" and drops out of the sum.
  It may instead return a `RewardOutput` (scores plus per-row sub-scores and scalar metrics, e.g.
  an LLM judge's per-criterion scores) or a mapping `{"score": [...], "<detail>": [...]}`.

This module holds the records: what a function may return (`RewardOutput`) and what a batch's
scoring gives (`RewardResult`). `reward_set.RewardSet` runs the functions; `registry.resolve_reward`
turns spec strings into functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RewardFunc = Callable[..., Any]

# Metric names (after the function's "name/") that are a fraction of the call's rows or groups.
FRACTION_METRICS = frozenset({"unordered_groups"})


@dataclass
class RewardOutput:
    """A richer return value for a reward function.

    scores: N values, None where the function cannot score the row.
    details: name -> N values (None allowed), e.g. a judge's per-criterion scores in [0, 1].
    metrics: name -> scalar for this batch, e.g. {"parse_failures": 3.0}.
    reason: why rows are None, when the function knows (e.g. "judge server unreachable: ...").
    """

    scores: list[float | None]
    details: dict[str, list[float | None]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


@dataclass
class RewardResult:
    """Scores of one batch of N completions by a RewardSet.

    total: [N] float64, weighted sum over the functions that scored each row (NaN where none did).
    per_func: function name -> [N] float64 raw (unweighted) scores, NaN where it returned None.
    details: "<function>/<detail>" -> [N] float64 sub-scores (NaN where missing).
    stats: function name -> {"mean", "std" (over scored rows, NaN if none), "failures" (None
        count, errors included), "errors" (rows whose scoring raised), "timeouts" (1 when the
        call hit the time limit), "seconds" (wall time)}.
    metrics: "<function>/<metric>" -> scalar reported by a function (RewardOutput.metrics).
    judges: names of the functions that are LLM judges (their stats also feed `judge/*`).
    reasons: function name -> why its rows are unscored (first error, time limit, its own reason).
    """

    total: np.ndarray
    per_func: dict[str, np.ndarray]
    details: dict[str, np.ndarray]
    stats: dict[str, dict[str, float]]
    metrics: dict[str, float]
    weights: dict[str, float]
    judges: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.total.shape[0])

    @property
    def num_unscored(self) -> int:
        return int(np.sum(np.isnan(self.total)))

    def select(self, rows: np.ndarray | list[int]) -> RewardResult:
        """The result for a subset of rows (in that order). Per-function stats are recomputed on
        the rows; wall times, time-outs and batch metrics stay those of the whole call."""
        rows = np.asarray(rows, dtype=np.int64)
        per_func = {k: v[rows] for k, v in self.per_func.items()}
        return dataclasses.replace(
            self, total=self.total[rows], per_func=per_func,
            details={k: v[rows] for k, v in self.details.items()},
            stats={k: {**s, **row_stats(per_func[k])} for k, s in self.stats.items()},
        )

    @staticmethod
    def concat(results: Sequence[RewardResult]) -> RewardResult:
        """Several scorings of the same functions as one: rows appended, stats recomputed over
        all rows, counts, wall times and batch metrics (counts and costs) added; metrics that are
        fractions (FRACTION_METRICS) averaged."""
        if len(results) == 1:
            return results[0]
        first = results[0]
        per_func = {k: np.concatenate([r.per_func[k] for r in results]) for k in first.per_func}
        stats = {}
        for k, s in first.stats.items():
            added = {key: float(sum(r.stats[k].get(key, 0.0) for r in results)) for key in s}
            stats[k] = {**added, **row_stats(per_func[k])}
        metrics: dict[str, float] = {}
        for r in results:
            for key, value in r.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(value)
        for key in metrics:
            if key.rsplit("/", 1)[-1] in FRACTION_METRICS:  # shares of each call: their mean, not sum
                metrics[key] /= sum(key in r.metrics for r in results)
        reasons: dict[str, str] = {}
        for r in results:
            for key, why in r.reasons.items():
                reasons.setdefault(key, why)
        return dataclasses.replace(
            first, total=np.concatenate([r.total for r in results]), per_func=per_func,
            details={k: np.concatenate([r.details[k] for r in results]) for k in first.details},
            stats=stats, metrics=metrics, reasons=reasons,
        )

    def unscored_reason(self) -> str:
        """Why rows went unscored, one clause per function that scored nothing."""
        parts = []
        for name, values in self.per_func.items():
            if np.isfinite(values).any():
                continue
            why = self.reasons.get(name) or "it returned None or NaN for every row"
            parts.append(f"reward {name!r} scored none of {values.size} rows: {why}")
        return "; ".join(parts) or f"{self.num_unscored} of {self.num_rows} rows were not scored"

    def summary(self) -> dict[str, float]:
        """Flat metrics for logging: reward/*, rewards/<name>/*, judge/* (when a judge scored)."""
        out: dict[str, float] = {}
        mean, std = _nan_mean_std(self.total)
        out["reward/mean"], out["reward/std"] = mean, std
        out["reward/unscored_frac"] = float(np.mean(np.isnan(self.total))) if self.num_rows else 0.0
        for name, s in self.stats.items():
            for key, value in s.items():
                out[f"rewards/{name}/{key}"] = float(value)
        for key, values in self.details.items():
            out[f"rewards/{key}/mean"] = _nan_mean_std(values)[0]
        for key, value in self.metrics.items():
            out[f"rewards/{key}"] = float(value)
        if self.judges:
            # One judge is the common case; with several, judge/* describes their pooled scores.
            pooled = np.concatenate([self.per_func[j] for j in self.judges])
            out["judge/mean"], out["judge/std"] = _nan_mean_std(pooled)
            out["judge/failures"] = float(sum(self.stats[j]["failures"] for j in self.judges))
        return out


def row_stats(values: np.ndarray) -> dict[str, float]:
    """mean and std over the scored rows, and failures (None/NaN rows), of one function's scores."""
    mean, std = _nan_mean_std(values)
    return {"mean": mean, "std": std, "failures": float(np.sum(np.isnan(values)))}


def _nan_mean_std(x: np.ndarray) -> tuple[float, float]:
    finite = x[~np.isnan(x)]
    if finite.size == 0:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std())


def reward_name(func: Callable) -> str:
    """A function's display name: its `reward_name` attribute, else `__name__`."""
    name = getattr(func, "reward_name", None) or getattr(func, "__name__", None)
    if name is None and hasattr(func, "func"):  # functools.partial
        name = getattr(func.func, "__name__", None)
    return str(name or type(func).__name__)
