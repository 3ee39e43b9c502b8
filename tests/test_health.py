"""Health alarms on synthetic metric sequences: each failure pattern fires its alarm once per
episode; healthy runs (including GRPO's normal near-zero loss) fire nothing."""

import logging
import math

import numpy as np
import pytest

from mlx_rft.errors import MlxRftError
from mlx_rft.train.health import Alarm, HealthConfig, HealthMonitor


def healthy_run(steps=80, seed=0, eval_every=10):
    """Metrics of a run that learns: reward and eval accuracy rise, everything else is ordinary."""
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        t = step / steps
        m = {
            "reward/mean": 0.2 + 0.5 * t + rng.normal(0, 0.03),
            "reward/std": 0.3 + rng.normal(0, 0.02),
            "completion/mean_length": 120 + 30 * t + rng.normal(0, 8),
            "frac_zero_std_groups": float(np.clip(0.3 + rng.normal(0, 0.1), 0, 1)),
            "clip/region_frac": float(np.clip(0.1 + rng.normal(0, 0.03), 0, 1)),
            "loss": rng.normal(0, 2e-5),  # GRPO's on-policy loss is ~0 even while learning
            "judge/std": 0.2 + rng.normal(0, 0.02),
            "update_norm": 1e-3 * (1 + rng.random()),
        }
        if step % eval_every == 0:
            m["eval/accuracy"] = 0.25 + 0.4 * t
        yield step, m


def feed(monitor, run):
    fired = []
    for step, m in run:
        fired += monitor.update(step, m)
    return fired


def with_changes(start, **changes):
    """A healthy run where from `start` on each named metric follows changes[name](step)."""
    for step, m in healthy_run():
        if step >= start:
            for key, f in changes.items():
                m[key.replace("__", "/")] = f(step)
        yield step, m


@pytest.mark.parametrize("seed", range(5))
def test_healthy_runs_raise_nothing(seed):
    monitor = HealthMonitor()
    assert feed(monitor, healthy_run(seed=seed)) == []
    assert set(monitor.metrics().values()) == {0.0}
    assert {"health/length_collapse", "health/reward_hacking", "health/dead_loss"} <= set(monitor.metrics())


@pytest.mark.parametrize(
    "name, changes",
    [
        ("length_collapse", {"completion__mean_length": lambda s: 12.0}),
        ("length_explosion", {"completion__mean_length": lambda s: 900.0}),
        ("judge_collapse", {"judge__std": lambda s: 0.0}),
        ("zero_variance", {"frac_zero_std_groups": lambda s: 1.0}),
        ("clip_saturation", {"clip__region_frac": lambda s: 0.95}),
        ("frozen_params", {"update_norm": lambda s: 0.0}),
        ("dead_loss", {"loss": lambda s: 0.0, "reward__mean": lambda s: 0.5}),
        ("reward_hacking", {"reward__mean": lambda s: 0.2 + 0.02 * (s - 20), "eval__accuracy": lambda s: 0.3}),
    ],
)
def test_each_failure_fires_once(name, changes):
    if name == "reward_hacking":
        run = (
            (s, {**m, "eval/accuracy": 0.3} if "eval/accuracy" in m else m)
            for s, m in with_changes(20, reward__mean=changes["reward__mean"])
        )
    else:
        run = with_changes(30, **changes)
    monitor = HealthMonitor(log_warnings=False)
    fired = feed(monitor, run)
    assert [a.name for a in fired] == [name]  # once, though the condition holds until the end
    alarm = fired[0]
    assert isinstance(alarm, Alarm) and alarm.step >= 20
    assert alarm.message and str(alarm).startswith(f"[health:{name}] step {alarm.step}")
    assert math.isfinite(alarm.value) and math.isfinite(alarm.threshold)
    assert monitor.metrics()[f"health/{name}"] == 1.0
    assert monitor.history == fired


def test_fire_timing_follows_windows():
    c = HealthConfig()
    monitor = HealthMonitor(c, log_warnings=False)
    fired = feed(monitor, with_changes(30, update_norm=lambda s: 0.0))
    assert fired[0].step == 30 + c.update_window - 1  # the first full window of zeros
    monitor = HealthMonitor(c, log_warnings=False)
    fired = feed(monitor, with_changes(30, judge__std=lambda s: 1e-6))
    assert fired[0].step == 30 + c.judge_window - 1 and fired[0].value == pytest.approx(1e-6)


def test_reward_hacking_needs_eval_to_stall():
    # The same reward rise with a rising eval accuracy is learning, not hacking.
    monitor = HealthMonitor(log_warnings=False)
    run = with_changes(20, reward__mean=lambda s: 0.2 + 0.02 * (s - 20))
    assert feed(monitor, run) == []


def test_alarm_refires_after_the_condition_clears():
    c = HealthConfig(rearm_steps=3)
    monitor = HealthMonitor(c, log_warnings=False)

    def norm(step):
        return 0.0 if 20 <= step < 30 or 50 <= step < 60 else 1e-3

    fired = feed(monitor, with_changes(1, update_norm=norm))
    assert [(a.name, a.step) for a in fired] == [("frozen_params", 22), ("frozen_params", 52)]


def test_flicker_within_rearm_window_does_not_refire():
    monitor = HealthMonitor(HealthConfig(rearm_steps=5, update_window=1), log_warnings=False)
    seq = [1e-3, 0, 1e-3, 0, 1e-3, 0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 0]
    fired = []
    for step, v in enumerate(seq, start=1):
        fired += monitor.update(step, {"update_norm": v})
    assert [a.step for a in fired] == [2, 12]


def test_thresholds_are_configurable_and_none_disables():
    run = list(with_changes(30, clip__region_frac=lambda s: 0.5))
    assert feed(HealthMonitor(log_warnings=False), run) == []  # 0.5 < default 0.8
    fired = feed(HealthMonitor(HealthConfig(clip_frac=0.4), log_warnings=False), run)
    assert [a.name for a in fired] == ["clip_saturation"] and fired[0].threshold == 0.4
    off = HealthMonitor(HealthConfig(update_norm_min=None), log_warnings=False)
    assert feed(off, with_changes(30, update_norm=lambda s: 0.0)) == []
    assert "health/frozen_params" not in off.metrics()
    with pytest.raises(MlxRftError, match="judge_window"):
        HealthConfig(judge_window=0)


def test_missing_and_nan_metrics_are_skipped():
    monitor = HealthMonitor(log_warnings=False)
    for step in range(1, 40):
        assert monitor.update(step, {"loss": float("nan"), "update_norm": None, "reward/mean": "n/a"}) == []
    assert monitor.metrics() == {}


def test_alarms_are_logged(caplog):
    monitor = HealthMonitor()
    with caplog.at_level(logging.WARNING, logger="mlx_rft.train.health"):
        feed(monitor, with_changes(30, frac_zero_std_groups=lambda s: 1.0))
    warnings = [r.getMessage() for r in caplog.records if r.name == "mlx_rft.train.health"]
    assert len(warnings) == 1 and "zero_variance" in warnings[0] and "group_size" in warnings[0]
