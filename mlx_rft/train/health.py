"""Health alarms: warnings for the ways GRPO runs fail silently, each with its own threshold.

`HealthMonitor(HealthConfig()).update(step, metrics)` is called once per training step with that
step's metrics and returns the alarms that fired at this step (also logged as warnings). An alarm
fires once per episode: when its condition starts to hold; it re-arms after the condition has been
clear for `rearm_steps` consecutive steps. `monitor.metrics()` gives `health/<alarm>` = 1.0 while
an alarm's condition holds, for the metrics log.

Metric keys read (the trainer emits exactly these; a missing or NaN key skips its checks):

    reward/mean             mean total reward of the step's completions
    reward/std              std of the total reward (not used by a check yet; kept for context)
    completion/mean_length  mean completion length in tokens
    frac_zero_std_groups    fraction of prompt groups whose rewards are all equal (in [0, 1])
    clip/region_frac        fraction of tokens whose ratio is clipped (in [0, 1])
    loss                    the training loss
    eval/accuracy           held-out accuracy, only on evaluation steps
    judge/std               std of the LLM judge's scores in the step (only with a judge)
    update_norm             global L2 norm of the parameter change made by the step

Alarms (name: condition; a threshold set to None disables the alarm):

    length_collapse   mean length over the last `length_window` steps < length_collapse_ratio x
                      the baseline (mean over the first `length_baseline_steps` steps)
    length_explosion  ... > length_explode_ratio x the baseline
    judge_collapse    judge/std < judge_std_min on each of the last `judge_window` steps
    reward_hacking    at an eval step: reward/mean (averaged over `reward_window` steps) rose by
                      more than hacking_reward_rise since the first eval, while eval/accuracy rose
                      by no more than hacking_eval_tolerance
    zero_variance     mean frac_zero_std_groups over `zero_std_window` steps >= zero_std_frac
    clip_saturation   mean clip/region_frac over `clip_window` steps >= clip_frac
    frozen_params     update_norm < update_norm_min on each of the last `update_window` steps
    dead_loss         |loss| < loss_abs_max on each of the last `loss_window` steps while
                      reward/mean moved by less than flat_reward_range over them
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, fields

log = logging.getLogger(__name__)

KEYS = (
    "reward/mean", "reward/std", "completion/mean_length", "frac_zero_std_groups", "clip/region_frac",
    "loss", "eval/accuracy", "judge/std", "update_norm",
)


@dataclass
class HealthConfig:
    """Thresholds and windows (in steps); a threshold of None turns its alarm off."""

    length_baseline_steps: int = 10
    length_window: int = 5
    length_collapse_ratio: float | None = 0.4
    length_explode_ratio: float | None = 3.0
    judge_window: int = 5
    judge_std_min: float | None = 1e-3
    reward_window: int = 5
    hacking_reward_rise: float | None = 0.1
    hacking_eval_tolerance: float = 0.0
    zero_std_window: int = 5
    zero_std_frac: float | None = 0.9
    clip_window: int = 5
    clip_frac: float | None = 0.8
    update_window: int = 3
    update_norm_min: float | None = 1e-8
    loss_window: int = 10
    loss_abs_max: float | None = 1e-4
    flat_reward_range: float = 1e-3
    rearm_steps: int = 3

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("_window", "_steps")) and (not isinstance(v, int) or v < 1):
                from ..errors import MlxRftError

                raise MlxRftError(f"health config {f.name} must be a positive integer, got {v!r}")


@dataclass
class Alarm:
    """One fired alarm: what is wrong, what to check, and the numbers behind it."""

    name: str
    step: int
    message: str
    value: float
    threshold: float

    def __str__(self) -> str:
        return f"[health:{self.name}] step {self.step}: {self.message}"


def _num(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class HealthMonitor:
    """Watches per-step metrics for silent GRPO failures (see the module docstring)."""

    def __init__(self, config: HealthConfig | None = None, *, log_warnings: bool = True):
        self.config = c = config or HealthConfig()
        self.log_warnings = log_warnings
        self._length_baseline: list[float] = []
        self._length = deque(maxlen=c.length_window)
        self._judge = deque(maxlen=c.judge_window)
        self._reward = deque(maxlen=max(c.reward_window, c.loss_window))
        self._zero = deque(maxlen=c.zero_std_window)
        self._clip = deque(maxlen=c.clip_window)
        self._update = deque(maxlen=c.update_window)
        self._loss = deque(maxlen=c.loss_window)
        self._first_eval: tuple[int, float, float] | None = None  # (step, accuracy, reward)
        self._active: dict[str, bool] = {}
        self._clear_streak: dict[str, int] = {}
        self._fired: list[Alarm] = []

    @property
    def history(self) -> list[Alarm]:
        """Every alarm fired so far."""
        return list(self._fired)

    def metrics(self) -> dict[str, float]:
        """health/<alarm> = 1.0 while the alarm's condition holds, else 0.0 (checked alarms only)."""
        return {f"health/{k}": float(v) for k, v in sorted(self._active.items())}

    def update(self, step: int, metrics: dict[str, float]) -> list[Alarm]:
        """Feed one step's metrics; returns the alarms that fired now (each once per episode)."""
        c = self.config
        found: dict[str, tuple[bool, str, float, float]] = {}  # name -> (holds, message, value, thr)

        def window_full(d: deque) -> bool:
            return len(d) == d.maxlen

        reward = _num(metrics, "reward/mean")
        if reward is not None:
            self._reward.append(reward)

        length = _num(metrics, "completion/mean_length")
        if length is not None:
            if len(self._length_baseline) < c.length_baseline_steps:
                self._length_baseline.append(length)
            else:
                self._length.append(length)
                if window_full(self._length):
                    base = sum(self._length_baseline) / len(self._length_baseline)
                    recent = sum(self._length) / len(self._length)
                    ratio = recent / base if base > 0 else math.inf
                    if c.length_collapse_ratio is not None:
                        found["length_collapse"] = (
                            ratio < c.length_collapse_ratio,
                            f"mean completion length fell to {recent:.1f} tokens, {ratio:.0%} of its baseline "
                            f"{base:.1f}: the policy may be collapsing to short or empty answers; check for a "
                            "reward that favours brevity or bare formats, lower the learning rate, or add a "
                            "length reward",
                            ratio, c.length_collapse_ratio,
                        )
                    if c.length_explode_ratio is not None:
                        found["length_explosion"] = (
                            ratio > c.length_explode_ratio,
                            f"mean completion length rose to {recent:.1f} tokens, {ratio:.1f}x its baseline "
                            f"{base:.1f}: completions are running away; check the truncated fraction, add "
                            "the overlong penalty (reward 'overlong'), or lower the learning rate",
                            ratio, c.length_explode_ratio,
                        )

        judge_std = _num(metrics, "judge/std")
        if judge_std is not None and c.judge_std_min is not None:
            self._judge.append(judge_std)
            if window_full(self._judge):
                worst = max(self._judge)
                found["judge_collapse"] = (
                    worst < c.judge_std_min,
                    f"the judge's score std stayed below {c.judge_std_min:g} for {c.judge_window} steps "
                    f"(max {worst:.2e}): it gives every completion the same score; check judge parse "
                    "failures and its replies, the rubric's scale, or whether the policy is gaming it",
                    worst, c.judge_std_min,
                )

        acc = _num(metrics, "eval/accuracy")
        if acc is not None and c.hacking_reward_rise is not None and self._reward:
            recent = list(self._reward)[-c.reward_window:]
            reward_now = sum(recent) / len(recent)
            if self._first_eval is None:
                self._first_eval = (step, acc, reward_now)
            else:
                s0, acc0, reward0 = self._first_eval
                rise = reward_now - reward0
                found["reward_hacking"] = (
                    rise > c.hacking_reward_rise and acc - acc0 <= c.hacking_eval_tolerance,
                    f"training reward rose by {rise:+.3f} since step {s0} but held-out accuracy did not "
                    f"({acc0:.3f} -> {acc:.3f}): the policy may be gaming the reward; read recent samples "
                    "and tighten the verifier or the rubric",
                    rise, c.hacking_reward_rise,
                )

        zero = _num(metrics, "frac_zero_std_groups")
        if zero is not None and c.zero_std_frac is not None:
            self._zero.append(zero)
            if window_full(self._zero):
                mean = sum(self._zero) / len(self._zero)
                found["zero_variance"] = (
                    mean >= c.zero_std_frac,
                    f"{mean:.0%} of prompt groups had identical rewards over the last {c.zero_std_window} "
                    "steps, so advantages are zero and there is nothing to learn; the task is too easy or "
                    "too hard for the model: change its difficulty, or raise group_size or temperature",
                    mean, c.zero_std_frac,
                )

        clip = _num(metrics, "clip/region_frac")
        if clip is not None and c.clip_frac is not None:
            self._clip.append(clip)
            if window_full(self._clip):
                mean = sum(self._clip) / len(self._clip)
                found["clip_saturation"] = (
                    mean >= c.clip_frac,
                    f"{mean:.0%} of tokens were clipped over the last {c.clip_window} steps: updates "
                    "overshoot the trust region; lower the learning rate or num_iterations, or widen epsilon",
                    mean, c.clip_frac,
                )

        upd = _num(metrics, "update_norm")
        if upd is not None and c.update_norm_min is not None:
            self._update.append(upd)
            if window_full(self._update):
                worst = max(self._update)
                found["frozen_params"] = (
                    worst < c.update_norm_min,
                    f"the parameter update norm stayed below {c.update_norm_min:g} for {c.update_window} "
                    f"steps (max {worst:.2e}): trainable parameters are not moving; check that the "
                    "adapters are trainable, the learning rate and its warmup, and that gradients are non-zero",
                    worst, c.update_norm_min,
                )

        loss = _num(metrics, "loss")
        if loss is not None and c.loss_abs_max is not None:
            self._loss.append(loss)
            rewards = list(self._reward)[-c.loss_window:]
            if window_full(self._loss) and len(rewards) == c.loss_window:
                worst = max(abs(x) for x in self._loss)
                spread = max(rewards) - min(rewards)
                found["dead_loss"] = (
                    worst < c.loss_abs_max and spread < c.flat_reward_range,
                    f"the loss stayed within {c.loss_abs_max:g} of 0 and the reward moved by only "
                    f"{spread:.2e} over {c.loss_window} steps: there is no learning signal; check the "
                    "advantages (zero-variance groups), the reward functions, and the learning rate",
                    worst, c.loss_abs_max,
                )

        fired = []
        for name, (holds, message, value, threshold) in found.items():
            was = self._active.get(name, False)
            if holds:
                self._clear_streak[name] = 0
                if not was:
                    alarm = Alarm(name, step, message, float(value), float(threshold))
                    fired.append(alarm)
                    self._fired.append(alarm)
                    if self.log_warnings:
                        log.warning("%s", alarm)
                self._active[name] = True
            else:
                streak = self._clear_streak.get(name, 0) + 1
                self._clear_streak[name] = streak
                if not was or streak >= c.rearm_steps:
                    self._active[name] = False
        return fired
