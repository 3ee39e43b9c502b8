"""End-to-end training on tiny models: it learns, only trainable weights move, accumulation is
exact, resume reproduces an uninterrupted run, Ctrl-C saves a checkpoint."""

import json
import os
import re
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rft import GRPOConfig, GRPOTrainer
from mlx_rft.models import load_model
from mlx_rft.train.report import build_panels, merge_by_step


def digit_share(prompts, completions, **columns):
    """Share of digit characters: a reward a tiny random model can learn quickly."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


ROWS = [{"prompt": f"Question {i}: say something"} for i in range(80)]


def make_cfg(model_dir, out, **kw):
    base = dict(model=str(model_dir), max_new_tokens=10, output_dir=str(out), eval_size=8,
                save_every=100, learning_rate=3e-3, group_size=4, prompts_per_step=4, seed=3)
    base.update(kw)
    return GRPOConfig(**base)


def copy_target(prompt: str) -> str:
    return re.search(r"copy (\d)", prompt).group(1)


DIGITS = "37"


def copy_score(prompts, completions, **columns):
    """Share of the completion's characters that are the digit the prompt asks to copy, minus the
    share that are the other digit (so a wrong copy costs what a right one earns)."""
    out = []
    for p, c in zip(prompts, completions):
        want = copy_target(p)
        right = sum(ch == want for ch in c)
        wrong = sum(ch in DIGITS and ch != want for ch in c)
        out.append((right - wrong) / max(len(c), 1))
    return out


def copy_rows(numbers):
    return [{"prompt": f"Question {i}: copy {' '.join([d] * 6)}"} for i in numbers for d in DIGITS]


def best_constant_score(rows) -> float:
    """The best mean copy_score one fixed completion gets on `rows`. With digit shares s_d summing
    to S <= 1 and target frequencies p_d it is sum_d p_d (2 s_d - S) <= S (2 max p - 1), so
    max(0, 2 max p - 1): 0 on a balanced set (e.g. an empty answer)."""
    targets = [copy_target(r["prompt"]) for r in rows]
    return max(0.0, 2 * max(targets.count(d) for d in DIGITS) / len(targets) - 1)


def test_learns_to_copy_on_held_out_prompts(tiny_qwen3, tmp_path):
    """The reward depends on the prompt, so the held-out score beats every constant answer only
    when the policy reads the prompt."""
    held_out = copy_rows(range(100, 108))
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=60, finetune_type="full", learning_rate=3e-4,
                   group_size=8, prompts_per_step=8, max_new_tokens=8)
    res = GRPOTrainer(cfg, reward_funcs=[copy_score], train_dataset=copy_rows(range(60)),
                      eval_dataset=held_out).train()
    before, after = res.eval_before["eval/accuracy"], res.eval_after["eval/accuracy"]
    best = best_constant_score(held_out)
    assert best == 0.0 and before <= best
    assert after > best + 0.4, (before, after)


def test_a_run_writes_what_it_promises(tiny_qwen3, tmp_path):
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=3, eval_k=4, eval_temperature=1.0, sample_every=2)
    res = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS).train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    for key in ("reward/mean", "rewards/digit_share/mean", "frac_zero_std_groups", "clip/region_frac",
                "completion/mean_length", "time/generate", "time/update", "memory/peak_gb", "update_norm"):
        assert key in steps[-1], key
    # The eval lines of metrics.jsonl carry the same numbers as the result.
    evals = [x for x in lines if "eval/accuracy" in x]
    assert [x["step"] for x in evals] == [0, 3]
    assert evals[0]["eval/pass@4"] == res.eval_before["eval/pass@4"]
    assert evals[1]["eval/accuracy"] == res.eval_after["eval/accuracy"]
    assert 0.0 <= res.eval_after["eval/accuracy"] <= 1.0 and 0.0 <= res.eval_after["eval/pass@4"] <= 1.0
    # Rollouts at step 1 and every sample_every steps: one line per completion, its reward recomputed.
    rollouts = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rollouts}) == [1, 2] and len(rollouts) == 2 * 16
    for r in rollouts:
        assert r["reward"] == pytest.approx(digit_share([r["prompt"]], [r["completion"]])[0], abs=1e-6)
    assert (tmp_path / "checkpoints" / "step-0000003" / "adapters.safetensors").exists()
    page = (tmp_path / "report.html").read_text()
    for panel in ("reward", "heldout", "length", "loss", "zero_std", "time"):
        assert f"id='panel-{panel}'" in page, panel
    reward = report_panels(res.history)["reward"].figure.axes[0]
    assert [list(line.get_xdata()) for line in reward.lines] == [[1, 2, 3]]  # digit_share alone


def report_panels(history) -> dict:
    """Panel id -> the report's panel (its matplotlib figure holds the plotted data)."""
    return {p.id: p for p in build_panels(merge_by_step(history))}


def test_report_eval_panel_has_the_before_and_after_points(tiny_qwen3, tmp_path):
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=2, eval_size=4)
    res = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS).train()
    assert "id='panel-heldout'" in (tmp_path / "report.html").read_text()
    score = report_panels(res.history)["heldout"].figure.axes[0].lines[0]
    assert list(score.get_xdata()) == [0, 2]
    assert list(score.get_ydata()) == [res.eval_before["eval/accuracy"], res.eval_after["eval/accuracy"]]


def initial_state(model_dir, out, **kw):
    """The trainable weights as set up before any update: one SGD step with no signal (zero
    gradient) leaves them as initialised (the LoRA init depends on the seed only)."""
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    kw = {**kw, "num_steps": 1, "optimizer": "sgd", "learning_rate": 0.5}
    t = GRPOTrainer(make_cfg(model_dir, out, **kw), reward_funcs=[constant], train_dataset=ROWS)
    t.train()
    return _final_state(t)


@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_every_trainable_parameter_moves_and_frozen_ones_do_not(tiny_model_factory, tmp_path, finetune_type):
    path = tiny_model_factory("llama")
    kw = dict(finetune_type=finetune_type, freeze=["embed_tokens"] if finetune_type == "full" else [])
    init = initial_state(path, tmp_path / "init", **kw)
    cfg = make_cfg(path, tmp_path / "run", num_steps=2, learning_rate=1e-2, **kw)
    trainer = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
    base, _ = load_model(path)
    base_params = dict(tree_flatten(base.parameters()))
    trainer.train()
    trainable = dict(tree_flatten(trainer.model.trainable_parameters()))
    assert trainable and set(trainable) == set(init)
    names = set()
    for name, value in tree_flatten(trainer.model.parameters()):
        if name in trainable:
            names.add(name.rsplit(".", 1)[-1])
            if name.endswith("lora_b"):  # starts at zero
                assert not init[name].any(), name
            elif name in base_params:  # full fine-tuning starts from the base weights
                np.testing.assert_array_equal(init[name], np.array(base_params[name]), err_msg=name)
            assert not np.array_equal(np.array(value), init[name]), f"{name} did not move"
        else:
            key = name.replace(".linear.", ".")
            assert mx.array_equal(value, base_params[key]), f"frozen {name} moved"
    if finetune_type == "lora":
        assert names == {"lora_a", "lora_b"}


def _final_state(trainer):
    return {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}


def test_gradient_accumulation_is_exact(tiny_qwen3, tmp_path):
    """Two SGD steps (the second one moves lora_a too: its gradient is 0 while lora_b is 0)."""
    init = initial_state(tiny_qwen3, tmp_path / "init")
    results = []
    for ga in (1, 2):
        cfg = make_cfg(tiny_qwen3, tmp_path / f"ga{ga}", num_steps=2, gradient_accumulation_steps=ga,
                       optimizer="sgd", learning_rate=0.5)
        t = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
        t.train()
        results.append(_final_state(t))
    assert set(results[0]) == set(init)
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], atol=2e-6, err_msg=k)
        assert np.abs(results[0][k] - init[k]).max() > 1e-6, f"{k} did not move"


@pytest.mark.parametrize("finetune_type", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_training(tiny_qwen3, tmp_path, finetune_type):
    """Two SGD steps with recomputed blocks reach the plain run's weights and losses (SGD: Adam
    would divide float noise in near-zero gradients by itself and blur the comparison)."""
    results, losses = [], []
    for ckpt in (False, True):
        cfg = make_cfg(tiny_qwen3, tmp_path / f"ckpt{ckpt}", num_steps=2, finetune_type=finetune_type,
                       gradient_checkpointing=ckpt, optimizer="sgd", learning_rate=0.5)
        t = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
        res = t.train()
        results.append(_final_state(t))
        losses.append([h["loss"] for h in res.history if "loss" in h])
        assert all(h["update_norm"] > 1e-3 for h in res.history if "loss" in h)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], atol=1e-5, err_msg=k)
    with pytest.raises(Exception, match="lora_dropout"):
        make_cfg(tiny_qwen3, tmp_path, gradient_checkpointing=True, lora_dropout=0.1).validate()


def half_constant(prompts, completions, **columns):
    """digit_share for even-numbered questions, a constant for odd ones (zero-variance groups)."""
    return [s if int(re.search(r"Question (\d+)", p).group(1)) % 2 == 0 else 0.5
            for p, s in zip(prompts, digit_share(prompts, completions))]


# 4 micro-batches: fewer live groups than micro-batches, so the skipping run splits rows.
@pytest.mark.parametrize("accumulation", [2, 4])
def test_skipping_zero_advantage_groups_gives_the_same_update(tiny_qwen3, tmp_path, accumulation):
    runs = {}
    for skip in (True, False):
        cfg = make_cfg(tiny_qwen3, tmp_path / str(skip), num_steps=2, optimizer="sgd",
                       learning_rate=0.5, gradient_accumulation_steps=accumulation,
                       skip_zero_advantage=skip)
        t = GRPOTrainer(cfg, reward_funcs=[half_constant], train_dataset=ROWS)
        runs[skip] = (t, t.train())
    (skipped, res_s), (full, res_f) = runs[True], runs[False]
    rows_s = [h["update/rows"] for h in res_s.history if "loss" in h]
    rows_f = [h["update/rows"] for h in res_f.history if "loss" in h]
    assert rows_f == [16, 16] and all(r < 16 for r in rows_s), rows_s
    a, b = _final_state(skipped), _final_state(full)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6, err_msg=k)
    for k in ("loss", "grad_norm", "tokens/completion"):
        fa = [h[k] for h in res_s.history if "loss" in h]
        fb = [h[k] for h in res_f.history if "loss" in h]
        assert fa == pytest.approx(fb, rel=1e-5, abs=1e-7), k


def test_a_step_with_no_signal_skips_the_gradient_pass(tiny_qwen3, tmp_path):
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=1, optimizer="sgd", learning_rate=0.5)
    t = GRPOTrainer(cfg, reward_funcs=[constant], train_dataset=ROWS)
    res = t.train()
    step = [h for h in res.history if "loss" in h][0]
    assert step["update/rows"] == 0 and step["loss"] == 0.0 and step["grad_norm"] == 0.0
    # The optimizer still stepped, with a zero gradient: SGD leaves LoRA's zero-initialised B at 0.
    lora_b = [v for k, v in _final_state(t).items() if k.endswith("lora_b")]
    assert lora_b and all(not v.any() for v in lora_b)


def check_resume_is_exact(model_dir, tmp_path, reward, keys, **cfg_kw):
    """4 steps straight vs 2 steps then a resume to 4: the same weights and per-step metrics."""
    def run(out, steps, resume=None):
        cfg = make_cfg(model_dir, out, num_steps=steps, save_every=2, resume=resume, **cfg_kw)
        t = GRPOTrainer(cfg, reward_funcs=[reward], train_dataset=ROWS)
        return t, t.train()

    full, full_res = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, resumed_res = run(tmp_path / "b", 4, resume="latest")
    a, b = _final_state(full), _final_state(resumed)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    for k in keys:
        fa = [h[k] for h in full_res.history if "loss" in h]
        fb = [h[k] for h in resumed_res.history if "loss" in h]
        assert len(fa) == 4 and fa == pytest.approx(fb, abs=1e-6), k
    return full_res, resumed_res


def test_resume_reaches_the_same_weights_and_metrics(tiny_qwen3, tmp_path):
    full_res, resumed_res = check_resume_is_exact(
        tiny_qwen3, tmp_path, digit_share, ("reward/mean", "loss", "completion/mean_length"),
        lora_dropout=0.1,
    )
    assert resumed_res.eval_before["eval/accuracy"] == full_res.eval_before["eval/accuracy"]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_qwen3, tmp_path):
    script = textwrap.dedent(f"""
        import mlx_rft, os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_trainer import ROWS, digit_share
        from mlx_rft import GRPOConfig, GRPOTrainer
        calls = []
        def reward(prompts, completions, **kw):
            calls.append(len(completions))
            if calls.count(16) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2
            return digit_share(prompts, completions)
        cfg = GRPOConfig(model={str(tiny_qwen3)!r}, num_steps=50, max_new_tokens=6, eval_size=4,
                         output_dir={str(tmp_path)!r}, save_every=100, prompts_per_step=4,
                         group_size=4)
        res = GRPOTrainer(cfg, reward_funcs=[reward], train_dataset=ROWS).train()
        print("STOPPED_AT", res.steps, res.interrupted)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "STOPPED_AT 2 True" in r.stdout
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-0000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
