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


def digit_share(prompts, completions, **columns):
    """Share of digit characters: a reward a tiny random model can learn quickly."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


ROWS = [{"prompt": f"Question {i}: say something"} for i in range(80)]


def make_cfg(model_dir, out, **kw):
    base = dict(model=str(model_dir), max_new_tokens=10, output_dir=str(out), eval_size=8,
                save_every=100, learning_rate=3e-3, group_size=4, prompts_per_step=4, seed=3)
    base.update(kw)
    return GRPOConfig(**base)


def test_learns_on_held_out_prompts(tiny_qwen3, tmp_path):
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=30, group_size=8, max_new_tokens=12, eval_size=16,
                   eval_k=4, eval_temperature=1.0)
    res = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS).train()
    before, after = res.eval_before["eval/accuracy"], res.eval_after["eval/accuracy"]
    assert after > before + 0.3, (before, after)
    assert "eval/pass@4" in res.eval_after
    # Everything the run promises is on disk.
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 30
    for key in ("reward/mean", "rewards/digit_share/mean", "frac_zero_std_groups", "clip/region_frac",
                "completion/mean_length", "time/generate", "time/update", "memory/peak_gb", "update_norm"):
        assert key in steps[-1], key
    assert (tmp_path / "report.html").read_text().count("<svg") >= 4
    assert (tmp_path / "rollouts.jsonl").read_text().strip()
    assert (tmp_path / "checkpoints" / "step-0000030" / "adapters.safetensors").exists()


@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_every_trainable_parameter_moves_and_frozen_ones_do_not(tiny_model_factory, tmp_path, finetune_type):
    path = tiny_model_factory("llama")
    cfg = make_cfg(path, tmp_path, num_steps=2, finetune_type=finetune_type, learning_rate=1e-2,
                   freeze=["embed_tokens"] if finetune_type == "full" else [])
    trainer = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
    base, _ = load_model(path)
    base_params = dict(tree_flatten(base.parameters()))
    trainer.train()
    trainable = dict(tree_flatten(trainer.model.trainable_parameters()))
    assert trainable
    for name, value in tree_flatten(trainer.model.parameters()):
        if name in trainable:
            ref = base_params.get(name)
            if ref is None:  # a LoRA matrix: lora_b starts at zero, lora_a random
                assert name.endswith(("lora_a", "lora_b"))
                if name.endswith("lora_b"):
                    assert mx.abs(value).max().item() > 0, name
                continue
            assert not mx.array_equal(value, ref), f"{name} did not move"
        else:
            key = name.replace(".linear.", ".")
            assert mx.array_equal(value, base_params[key]), f"frozen {name} moved"


def _final_state(trainer):
    return {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}


def test_gradient_accumulation_is_exact(tiny_qwen3, tmp_path):
    results = []
    for ga in (1, 2):
        cfg = make_cfg(tiny_qwen3, tmp_path / f"ga{ga}", num_steps=1, gradient_accumulation_steps=ga,
                       optimizer="sgd", learning_rate=0.5)
        t = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
        t.train()
        results.append(_final_state(t))
    moved = 0
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], atol=2e-6, err_msg=k)
        moved += np.abs(results[0][k]).sum() > 0
    assert moved


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


def test_resume_reaches_the_same_weights_and_metrics(tiny_qwen3, tmp_path):
    def run(out, steps, resume=None):
        cfg = make_cfg(tiny_qwen3, out, num_steps=steps, save_every=2, resume=resume, lora_dropout=0.1)
        t = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
        return t, t.train()

    full, full_res = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, resumed_res = run(tmp_path / "b", 4, resume="latest")
    a, b = _final_state(full), _final_state(resumed)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    keys = ("reward/mean", "loss", "completion/mean_length")
    for k in keys:
        fa = [h[k] for h in full_res.history if "loss" in h]
        fb = [h[k] for h in resumed_res.history if "loss" in h]
        assert len(fa) == 4 and fa == pytest.approx(fb, abs=1e-6), k
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
