"""The HTML run report, checked without a browser: which panels it draws and from what data, the
numbers it prints (rounded), the sample completions (escaped), and an atomic write."""

import base64
import json
import math
import re

import numpy as np
import pytest

from mlx_rft.train import report
from mlx_rft.train.report import (
    build_panels, fmt_value, merge_by_step, moving_average, read_samples, render_page, write_report,
)

ALL_PANELS = ("reward", "heldout", "length", "kl", "entropy", "clip", "loss", "zero_std", "time")


@pytest.fixture(autouse=True)
def small_figures(monkeypatch):
    monkeypatch.setattr(report, "DPI", 30)  # the same figures, cheap to encode


def eval_row(step, acc, baseline=0.25):
    return {"step": step, "eval/accuracy": acc, "eval/unscored": 0.0, "eval/distinct_answers": 5.0,
            "eval/constant_baseline": baseline, "eval/time": 33.289566354000044}


def train_row(step, zero_variance=False):
    fmt, correct = 0.5 + 0.04 * step + 1e-13, 0.1 + 0.05 * step / 3
    return {
        "step": step, "reward/mean": fmt + correct, "reward/std": 0.3141592653589793,
        "reward/unscored_frac": 0.0,
        "rewards/format/mean": fmt, "rewards/format/std": 0.1, "rewards/format/failures": 0.0,
        "rewards/correct/mean": correct, "rewards/correct/std": 0.2, "rewards/correct/failures": 0.0,
        "rewards/judge/criterion/mean": 0.7,  # a function's detail: not a reward function
        "completion/mean_length": 40.0 + step / 7, "completion/truncated_frac": 0.125,
        "kl": 0.001 * step, "entropy": 1.2345678901234, "clip/low_frac": 0.0, "clip/high_frac": 0.01,
        "clip/region_frac": 0.01, "loss": 0.02 / step, "frac_zero_std_groups": 0.25,
        "time/generate": 6.5, "time/reward": 0.01, "time/logprobs": 0.0, "time/update": 3.3,
        "time/step": 10.0, "health/zero_variance": float(zero_variance), "health/length_collapse": 0.0,
    }


def synthetic_history():
    """What the trainer leaves: the eval before training, 12 steps (a periodic eval on step 6,
    the zero_variance alarm on steps 4-6 and 9), then the eval after training on step 12."""
    rows = [eval_row(0, 0.375)]
    for step in range(1, 13):
        rows.append(train_row(step, zero_variance=step in (4, 5, 6, 9)))
    rows[6].update(eval_row(6, 0.5))
    rows.append(eval_row(12, 0.609375))
    return rows


def summary_of(history):
    before, after = history[0], history[-1]
    return {
        "model": "/models/<tiny>", "steps": 12, "finetune_type": "lora", "loss_type": "dapo",
        **{f"before {k}": v for k, v in before.items() if k != "step"},
        **{f"after {k}": v for k, v in after.items() if k != "step"},
    }


def rollout(step, reward, completion, **kw):
    return {"step": step, "prompt": "x" * 500 + f" What is 2+{step}?", "completion": completion,
            "reward": reward, "advantage": 0.0, "finish_reason": "stop",
            "reward/format": 1.0, "reward/correct": reward, **kw}


def write_rollouts(run_dir):
    lines = [
        rollout(4, 0.9876543210123, "<script>alert(1)</script> the best one"),
        rollout(4, 0.5, "a middling one"),
        rollout(4, None, "an unscored one"),
        rollout(4, -0.25, "the worst & last one"),
        rollout(8, 1.0, "same"), rollout(8, 1.0, "same again"),
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 12, "prompt": "torn'
    (run_dir / "rollouts.jsonl").write_text(text)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    write_rollouts(run_dir)
    history = synthetic_history()
    report.DPI, old = 30, report.DPI  # module scope: the autouse monkeypatch is not active yet
    try:
        path = write_report(run_dir, history, summary_of(history))
    finally:
        report.DPI = old
    return path.read_text()


def panel_ids(html: str) -> list[str]:
    return re.findall(r"<figure id='panel-([a-z_]+)'>", html)


def panels_of(history) -> dict:
    return {p.id: p for p in build_panels(merge_by_step(history))}


# --------------------------------------------------------------------------- the full page
def test_every_panel_is_drawn_as_an_embedded_png(page):
    assert panel_ids(page) == list(ALL_PANELS)
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(ALL_PANELS)
    assert all(base64.b64decode(img).startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert "<script" not in page and "http" not in page  # self-contained, nothing to run or fetch


def test_the_headline_is_the_held_out_score_before_and_after(page):
    headline = re.search(r"<div class='headline'>(.*?)</div></div>", page, re.S).group(1)
    assert "0.375 → 0.609" in headline and "(+0.234)" in headline
    assert "a constant answer scores 0.250" in headline
    evals = re.search(r"<table class='kv evals'>(.*?)</table>", page, re.S).group(1)
    assert re.search(r"eval/accuracy</th><td class='n'>0.375</td><td class='n'>0.609</td>", evals)
    assert re.search(r"eval/distinct_answers</th><td class='n'>5</td>", evals)  # a count: an int


def test_no_long_floats_anywhere_in_the_page(page):
    assert not re.search(r"\d\.\d{6,}", page), re.search(r".{40}\d\.\d{6,}.{10}", page).group(0)
    assert "33.290" in page  # eval/time, rounded


def test_alarms_are_listed_with_their_first_step(page):
    alarms = re.search(r"<table class='kv alarms'>(.*?)</table>", page, re.S).group(1)
    assert re.search(r"<th>zero_variance</th><td class='n'>4</td><td class='n'>4</td>", alarms)
    assert "length_collapse" not in alarms  # checked, never fired


def test_best_and_worst_sample_per_step_escaped(page):
    samples = page[page.index("id='samples'"):]
    assert "<script>" not in samples and "&lt;script&gt;alert(1)&lt;/script&gt; the best one" in samples
    assert "the worst &amp; last one" in samples and "reward <b>-0.250</b>" in samples
    assert "reward <b>0.988</b>" in samples
    assert "a middling one" not in samples and "an unscored one" not in samples
    assert "all 2 completions scored the same" in samples  # step 8
    assert "x" * 300 not in samples and "What is 2+4?" in samples  # the prompt's tail kept
    assert [int(s) for s in re.findall(r"<tr><td class='n'>(\d+)</td>", samples)] == [4, 8]


# --------------------------------------------------------------------------- what each panel draws
def test_held_out_panel_has_the_before_periodic_and_after_points():
    ax = panels_of(synthetic_history())["heldout"].figure.axes[0]
    score, baseline = ax.lines[0], ax.lines[1]
    assert list(score.get_xdata()) == [0, 6, 12]
    assert list(score.get_ydata()) == [0.375, 0.5, 0.609375]
    assert baseline.get_linestyle() == "--" and set(baseline.get_ydata()) == {0.25}
    assert [t.get_text() for t in ax.texts] == ["0.375", "0.609"]  # the first and last values


def test_reward_panel_draws_each_function_raw_and_smoothed_and_shades_alarms():
    history = [train_row(s, zero_variance=s in (10, 11)) for s in range(1, 41)]
    rng = np.random.default_rng(0)
    for row in history:
        row["rewards/correct/mean"] = float(rng.random())
    ax = panels_of(history)["reward"].figure.axes[0]
    labels = [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]
    assert labels == ["total (weighted)", "format", "correct"]  # not judge/criterion, a detail
    # Each function: a faint raw line and its bold moving average over 4 steps (10% of 40).
    correct = [line for line in ax.lines if line.get_color() == ax.lines[4].get_color()]
    raw, smooth = (line.get_ydata() for line in correct)
    assert np.allclose(smooth, moving_average(np.asarray(raw), 4)) and not np.allclose(raw, smooth)
    assert [line.get_alpha() for line in correct] == [0.3, None]
    spans = [p.get_x() for p in ax.patches]  # the alarm's shaded steps
    assert spans == [9.5]
    assert "moving average over 4 steps" in panels_of(history)["reward"].note


def test_one_reward_function_is_not_drawn_twice():
    history = [train_row(s) for s in range(1, 5)]
    for row in history:
        row["reward/mean"] = row["rewards/format/mean"]
        del row["rewards/correct/mean"]
    ax = panels_of(history)["reward"].figure.axes[0]
    assert [line.get_label() for line in ax.lines] == ["format"]


def test_step_time_is_stacked_from_the_stages():
    history = [train_row(s) for s in range(1, 4)]
    ax = panels_of(history)["time"].figure.axes[0]
    labels = [c.get_label() for c in ax.containers]
    assert labels == ["generate", "reward", "logprobs", "update", "other"]
    tops = [bar.get_y() + bar.get_height() for bar in ax.containers[-1]]
    assert np.allclose(tops, 10.0)  # the stages and "other" add up to time/step
    many = panels_of([train_row(s) for s in range(1, report.BAR_STEPS + 2)])["time"].figure.axes[0]
    assert [c.get_label() for c in many.collections] == labels  # stacked areas, not bars


def test_a_panel_without_data_is_left_out():
    history = synthetic_history()
    for row in history:
        for key in ("kl", "entropy", "clip/low_frac", "clip/high_frac", "clip/region_frac"):
            row.pop(key, None)
        if "loss" in row:
            row["loss"] = math.nan  # logged, but never a number: no panel either
    assert list(panels_of(history)) == ["reward", "heldout", "length", "zero_std", "time"]
    only_eval = [eval_row(0, 0.375)]
    assert list(panels_of(only_eval)) == ["heldout"]


def test_a_history_without_health_keys_takes_them_from_metrics_jsonl(tmp_path):
    history = synthetic_history()
    log = [{"step": r["step"], **r} for r in history]
    for row in history:
        for key in [k for k in row if k.startswith("health/")]:
            del row[key]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + "{torn")
    page = write_report(tmp_path, history, {}).read_text()
    assert re.search(r"<th>zero_variance</th><td class='n'>4</td>", page)


# --------------------------------------------------------------------------- hostile and empty input
def test_nan_inf_and_odd_values_do_not_crash(tmp_path):
    history = [eval_row(0, math.nan)]
    for s, v in enumerate([math.inf, -math.inf, math.nan, 1e300, 1e300, None, "n/a", 0.5], start=1):
        history.append({**train_row(s), "reward/mean": v, "rewards/format/mean": v, "kl": v,
                        "time/generate": v, "completion/mean_length": v})
    history.append(eval_row(8, math.inf))
    summary = {"before eval/accuracy": math.nan, "after eval/accuracy": math.inf, "steps": 8}
    page = write_report(tmp_path, history, summary).read_text()
    assert "nan → inf" in page and "panel-reward" in page
    assert "panel-heldout" not in page  # no finite held-out score to draw


def test_an_empty_history_still_writes_a_valid_page(tmp_path):
    page = write_report(tmp_path, [], {}).read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert panel_ids(page) == [] and "no metrics were logged yet" in page
    assert "id='samples'" not in page and "id='alarms'" not in page


def test_an_empty_rollouts_file_gives_no_sample_table(tmp_path):
    (tmp_path / "rollouts.jsonl").write_text("")
    assert read_samples(tmp_path / "rollouts.jsonl") == []
    assert read_samples(tmp_path / "absent.jsonl") == []


def test_many_sampled_steps_are_thinned_to_an_even_spread(tmp_path):
    lines = [rollout(s, 0.5, "c") for s in range(1, 101)]
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    steps = [s["step"] for s in read_samples(tmp_path / "rollouts.jsonl")]
    assert len(steps) == report.MAX_SAMPLE_STEPS and steps[0] == 1 and steps[-1] == 100


def test_the_write_is_atomic(tmp_path, monkeypatch):
    path = write_report(tmp_path, synthetic_history()[:3], {"steps": 2})
    assert path == tmp_path / "report.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no tmp file left

    def broken(*a, **k):
        raise RuntimeError("rendering failed")

    before = path.read_text()
    monkeypatch.setattr(report, "render_page", broken)
    with pytest.raises(RuntimeError):
        write_report(tmp_path, [], {})
    assert path.read_text() == before  # a failed report leaves the last good one


@pytest.mark.parametrize("value, shown", [
    (0.375, "0.375"), (0.609375, "0.609"), (33.289566354000044, "33.290"), (1234.5678, "1234.6"),
    (7.0, "7"), (12, "12"), (0.00123456, "0.00123"), (1e300, "1e+300"), (-0.25, "-0.250"),
    (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (None, "-"), (True, "True"),
    ("lora", "lora"), (np.float32(0.5), "0.500"), (np.int64(3), "3"),
])
def test_fmt_value(value, shown):
    assert fmt_value(value) == shown


def test_moving_average_is_centred_and_skips_nan():
    y = np.array([1.0, 2.0, 3.0, math.nan, 5.0])
    assert np.allclose(moving_average(y, 3), [1.5, 2.0, 2.5, 4.0, 5.0])
    assert np.allclose(moving_average(y[:3], 1), y[:3])
    assert np.isnan(moving_average(np.array([math.nan, math.nan]), 1)).all()


def test_rows_sharing_a_step_are_merged():
    rows = merge_by_step([{"step": 2, "loss": 1.0}, {"step": 0, "eval/accuracy": 0.1},
                          {"step": 2, "eval/accuracy": 0.2}, {"no": "step"}])
    assert rows == [{"step": 0, "eval/accuracy": 0.1}, {"step": 2, "loss": 1.0, "eval/accuracy": 0.2}]


def test_render_page_needs_no_run_folder():
    page = render_page([eval_row(0, 0.5)], {}, [])
    assert panel_ids(page) == ["heldout"] and "0.500 →" in page
