"""The live console: the per-step line fits 100 columns, alarms stand out, bars only on a terminal
(plain lines otherwise), the ETA, and evaluate_prompts' progress callback."""

import io
import re

import pytest
from rich.console import Console
from rich.progress import Progress

from mlx_rft.train.console import EtaColumn, RunConsole, format_step_line

REALISTIC = {
    "reward/mean": 0.4123, "reward/std": 0.3012, "loss": -0.01234, "clip/region_frac": 0.031,
    "entropy/sampled": 1.2345, "completion/mean_length": 48.2, "frac_zero_std_groups": 0.25,
    "time/step": 12.34, "time/generate": 9.12, "time/reward": 0.05, "time/update": 2.83,
    "tokens_per_sec/generate": 310.0, "lr": 1e-5, "memory/peak_gb": 1.2,
}
ANSI_CURSOR = ("\x1b[?25l", "\x1b[2K")  # what a live display writes: hide cursor, erase line


def rich_console(terminal: bool, width: int = 100) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=width, color_system="standard" if terminal else None), buf


# ---------------------------------------------------------------------------------------------
# The per-step line


def test_the_step_line_holds_the_essentials_in_100_columns():
    line = format_step_line(12, 60, REALISTIC)
    assert line == "[12/60] reward 0.41±0.30 loss -0.012 clip 3.1% ent 1.23 len 48 zero-std 25% " \
                   "12s (gen 9.1 upd 2.8)"
    assert len(line) <= 100
    # The step is padded to the total's width, so the columns of consecutive lines line up.
    assert format_step_line(3, 200, REALISTIC).index("reward") == format_step_line(123, 200, REALISTIC).index("reward")


@pytest.mark.parametrize("total", [4, 60, 1000, 100_000])
def test_with_every_field_the_line_still_fits_and_keeps_step_and_reward(total):
    m = {**REALISTIC, "kl": 0.00213, "reward/mean": -12.5, "completion/mean_length": 1024.0,
         "time/step": 1234.5, "time/generate": 999.0, "time/update": 200.0}
    line = format_step_line(total, total, m)
    assert len(line) <= 100, line
    assert line.startswith(f"[{total}/{total}] reward -12.50±0.30 loss -0.012 kl 0.0021")
    assert "1234s" in line  # the split is the first to go, the step time stays


@pytest.mark.parametrize("value", [1.234e300, -1.234e300, float("nan"), float("inf"), -float("inf"), 3e-12])
def test_extreme_values_stay_within_100_columns(value):
    m = {k: value for k in REALISTIC} | {"kl": value}
    line = format_step_line(999_999, 1_000_000, m)
    assert len(line) <= 100, line
    assert line.startswith("[ 999999/1000000] reward ")


def test_extreme_values_read_as_numbers():
    line = format_step_line(1, 4, {"reward/mean": float("nan"), "reward/std": float("inf"),
                                   "loss": 1.5e300, "kl": 3e-7, "time/step": float("nan")})
    assert line == "[1/4] reward nan±inf loss 1.5e+300 kl 3e-07 nan s"
    assert "loss 0.00034 " in format_step_line(1, 4, {"loss": 3.4e-4, "time/step": 1.0})


def test_missing_metrics_are_left_out_not_dashed():
    assert format_step_line(1, 4, {}) == "[1/4]"
    line = format_step_line(2, 4, {"reward/mean": 0.5, "loss": 0.25, "entropy": 0.7, "time/step": 3.0})
    assert line == "[2/4] reward 0.50 loss 0.250 ent 0.70 3.0s"  # no std, kl, clip, len or split
    assert "-" not in line
    # entropy/sampled (the sampled tokens' entropy) wins over the loss's entropy when both exist.
    assert "ent 1.50" in format_step_line(1, 4, {"entropy": 0.7, "entropy/sampled": 1.5})


# ---------------------------------------------------------------------------------------------
# Lines, alarms and bars


def test_alarms_and_warnings_stand_out_from_log_lines():
    con, buf = rich_console(terminal=False)
    out = RunConsole(con)
    out.log("eval before training: eval/accuracy 0.250")
    out.warn("warning: 3 eval samples could not be scored")
    out.alarm("health alarm zero_variance at step 5: every group had identical rewards")
    assert buf.getvalue().splitlines() == [
        "eval before training: eval/accuracy 0.250",
        "! warning: 3 eval samples could not be scored",
        "!! health alarm zero_variance at step 5: every group had identical rewards",
    ]
    con, buf = rich_console(terminal=True)
    RunConsole(con, progress=False).alarm("health alarm x")
    RunConsole(con, progress=False).warn("warning y")
    RunConsole(con, progress=False).log("plain z")
    text = buf.getvalue()
    assert "\x1b[1;31m!! health alarm x" in text  # bold red
    assert "\x1b[1;33m! warning y" in text  # bold yellow
    assert "plain z\n" in text and "\x1b[1;31mplain" not in text and "\x1b[1;33mplain" not in text


def use_every_output(out: RunConsole) -> None:
    with out.eval_progress(9, "eval before") as advance:
        advance(4), advance(5)
    out.log("eval before training: eval/accuracy 0.250")
    with out.train_progress(2) as advance:
        for step in (1, 2):
            out.step_line(step, 2, REALISTIC)
            advance(REALISTIC)
    out.alarm("health alarm frozen_params at step 2: nothing moves")


PLAIN = [
    "eval before training: eval/accuracy 0.250",
    format_step_line(1, 2, REALISTIC),
    format_step_line(2, 2, REALISTIC),
    "!! health alarm frozen_params at step 2: nothing moves",
]


def test_progress_off_gives_plain_lines_on_a_terminal():
    con, buf = rich_console(terminal=True)
    out = RunConsole(con, progress=False)
    assert not out.bars
    use_every_output(out)
    text = buf.getvalue()
    assert not any(code in text for code in ANSI_CURSOR) and "prompts" not in text
    assert [_strip_ansi(x) for x in text.splitlines()] == PLAIN


def test_not_a_terminal_turns_the_bars_off_and_keeps_long_lines_whole():
    con, buf = rich_console(terminal=False, width=80)
    out = RunConsole(con, progress=True)
    assert not out.bars
    use_every_output(out)
    out.log("x" * 150)  # a log file gets one line, not two wrapped at 80 columns
    assert buf.getvalue().splitlines() == PLAIN + ["x" * 150]
    assert "\x1b" not in buf.getvalue()


def test_no_console_prints_plain_lines(capsys):
    out = RunConsole(None, progress=True)
    assert not out.bars
    use_every_output(out)
    assert capsys.readouterr().out.splitlines() == PLAIN


def test_a_terminal_gets_bars_that_count_and_then_go():
    con, buf = rich_console(terminal=True)
    out = RunConsole(con, progress=True)
    assert out.bars
    with out.train_progress(5, done=2) as advance:  # a run resumed at step 2
        advance({"reward/mean": 0.75})
        assert out._progress.tasks[0].fields["done_at"] >= 0  # the ETA's pace is recorded
        with out.eval_progress(9, "eval step 3") as eval_advance:
            eval_advance(4), eval_advance(5)
        with out.eval_progress(3, "eval step 3") as eval_advance:
            pass
    text = buf.getvalue()
    assert "\x1b[?25l" in text  # a live display ran
    assert "3/5 steps" in text and "reward 0.75" in text and "9/9 prompts" in text
    assert "0/3 prompts" in text
    assert out._progress is None  # every bar gone, the live display stopped


def test_eta_uses_the_average_pace_since_the_bar_started_and_counts_down():
    now = [100.0]
    progress = Progress(EtaColumn(), get_time=lambda: now[0], auto_refresh=False)
    task = progress.add_task("train", total=10, completed=2, first=2)  # resumed at 2 of 10

    def eta():
        return progress.columns[0].render(progress.tasks[0]).plain

    assert eta() == "eta -:--:--"  # no pace yet
    now[0] += 40.0
    progress.update(task, advance=2, done_at=40.0)  # as RunConsole advances: 2 steps in 40 s
    assert eta() == "eta 0:02:00"  # 6 steps left at 20 s each
    now[0] += 30.0
    assert eta() == "eta 0:01:30"  # within a step the estimate runs down, not up
    now[0] += 600.0
    assert eta() == "eta 0:00:00"  # a slow step does not make it negative
    progress.update(task, completed=10)
    assert eta() == ""
    # Before its first advance, a bar given the pace of an earlier one (2 s a prompt) has an ETA.
    progress.add_task("eval", total=10, completed=0, first=0, pace=2.0)
    now[0] += 5.0
    assert progress.columns[0].render(progress.tasks[1]).plain == "eta 0:00:15"


def test_the_next_evaluation_starts_from_the_last_ones_pace():
    con, _ = rich_console(terminal=True)
    out = RunConsole(con, progress=True)
    with out.eval_progress(4, "eval before") as advance:
        assert out._progress.tasks[0].fields["pace"] is None  # nothing to go by yet
        advance(4)
    with out.eval_progress(4, "eval step 2"):
        pace = out._progress.tasks[0].fields["pace"]
    assert pace is not None and pace > 0


def _strip_ansi(s: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", s)


# ---------------------------------------------------------------------------------------------
# Evaluation progress, and the trainer's console


@pytest.mark.parametrize("k, batch_rows, calls", [(1, 4, [4, 4, 1]), (2, 4, [2, 2, 2, 2, 1])])
def test_evaluate_prompts_reports_the_prompts_each_batch_finished(tiny_qwen3, k, batch_rows, calls):
    from mlx_rft.data import PromptDataset
    from mlx_rft.evaluate import evaluate_prompts
    from mlx_rft.models import load_model
    from mlx_rft.rewards import RewardSet
    from mlx_rft.types import SamplingConfig

    model, tok = load_model(tiny_qwen3)
    data = list(PromptDataset.from_rows([{"prompt": f"Question {i}"} for i in range(9)], tok))
    seen = []
    out = evaluate_prompts(
        model, tok, data, RewardSet([lambda prompts, completions, **c: [1.0] * len(completions)]),
        k=k, sampling=SamplingConfig(temperature=1.0 if k > 1 else 0.0, max_new_tokens=2),
        batch_rows=batch_rows, progress=seen.append,
    )
    assert seen == calls and out["eval/accuracy"] == 1.0


def test_a_training_run_on_a_terminal_shows_bars_lines_and_results(tiny_qwen3, tmp_path):
    from mlx_rft import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(model=str(tiny_qwen3), num_steps=2, max_new_tokens=4, eval_size=3, group_size=2,
                     prompts_per_step=2, save_every=100, output_dir=str(tmp_path / "run"))
    con, buf = rich_console(terminal=True)
    rows = [{"prompt": f"say {i}"} for i in range(8)]
    GRPOTrainer(cfg, reward_funcs=[lambda prompts, completions, **c: [float(len(x)) for x in completions]],
                train_dataset=rows, console=con).train()
    text = buf.getvalue()
    assert "eval before" in text and "3/3 prompts" in text and "2/2 steps" in text
    assert "eval after" in text  # the closing evaluation has its bar too
    lines = [_strip_ansi(x).strip() for x in text.replace("\r", "\n").splitlines()]
    steps = [x for x in lines if x.startswith("[")]
    assert [x[:13] for x in steps] == ["[1/2] reward ", "[2/2] reward "]
    assert all(len(x) <= 100 for x in steps)
    assert any(x.startswith("eval after training:") for x in lines)
