"""The README's commands run for real (subprocesses, tiny models): train from a YAML file with
flags over it, eval (pass@1 and pass@k, a task or a prompts file), generate, export (fused weights
give the adapters' replies), doctor; and the pass@k estimator itself."""

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mlx_rft.evaluate import evaluate_prompts, pass_at_k

GENERATION_PROMPT = "<|im_start|>assistant\n"


def cli(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "mlx_rft", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


# ---------------------------------------------------------------------------------------------
# pass@k


def brute_force_pass_at_k(n, c, k):
    """The share of k-subsets of n samples (c of them correct) holding at least one correct."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 3, 2), (6, 0, 6), (7, 6, 4), (8, 1, 8)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_evaluate_reports_mean_score_and_pass_at_k_of_its_samples(tiny_qwen3):
    from mlx_rft.data import PromptDataset
    from mlx_rft.models import load_model
    from mlx_rft.rewards import RewardSet
    from mlx_rft.types import SamplingConfig

    model, tok = load_model(tiny_qwen3)
    data = list(PromptDataset.from_rows([{"prompt": f"Question {i}: say something"} for i in range(6)], tok))
    seen = []

    def has_digit(prompts, completions, **columns):  # 1 or 0, so pass@k counts real successes
        scores = [float(any(ch.isdigit() for ch in c)) for c in completions]
        seen.extend(zip(prompts, scores))
        return scores

    k = 4
    out = evaluate_prompts(model, tok, data, RewardSet([has_digit]), k=k,
                           sampling=SamplingConfig(temperature=1.5, max_new_tokens=10), seed=1)
    assert len(seen) == k * len(data)
    per_prompt = {}
    for p, s in seen:
        per_prompt.setdefault(p, []).append(s)
    assert len(per_prompt) == len(data) and all(len(v) == k for v in per_prompt.values())
    scores = np.array(list(per_prompt.values()))
    assert out["eval/accuracy"] == pytest.approx(scores.mean())
    assert out[f"eval/pass@{k}"] == pytest.approx(np.mean([s.any() for s in scores]))
    assert 0 < scores.mean() < out[f"eval/pass@{k}"]  # the seed gives a mix: the check can fail


# ---------------------------------------------------------------------------------------------
# train -> eval -> export -> generate


@pytest.fixture(scope="module")
def trained(tiny_model_factory, tmp_path_factory):
    """`mlx-rft train --config run.yaml` (the README's fields) with flags overriding the file."""
    model = tiny_model_factory("qwen3")
    root = tmp_path_factory.mktemp("cli_train")
    (root / "rewards.py").write_text(textwrap.dedent("""
        def digits(prompts, completions, **columns):
            return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
    """))
    (root / "run.yaml").write_text(textwrap.dedent(f"""
        model: {model}
        task: chain_sum
        task_size: 40
        loss_type: dapo
        importance_sampling_level: token
        prompts_per_step: 4
        group_size: 8
        max_new_tokens: 128
        beta: 0.0
        stop: ["</answer>"]
        finetune_type: lora
        num_steps: 100
        save_every: 20
        eval_size: 4
    """))
    out = root / "run"
    r = cli("train", "--config", root / "run.yaml", "--num-steps", "2", "--group-size", "2",
            "--max-new-tokens", "8", "--learning-rate", "0.05", "--output-dir", out,
            "--reward-funcs", f"{root / 'rewards.py'}:digits", "accuracy(extract=boxed)", "--progress", "false")
    return model, out, r


def test_train_command_merges_yaml_and_flags(trained):
    model, out, r = trained
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["num_steps"] == 2 and cfg["group_size"] == 2 and cfg["max_new_tokens"] == 8  # flags
    assert cfg["task"] == "chain_sum" and cfg["stop"] == ["</answer>"] and cfg["save_every"] == 20  # YAML
    assert cfg["lr_schedule"] == "constant"  # default
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "loss" in x]
    assert len(steps) == 2 and "rewards/digits/mean" in steps[-1] and "rewards/accuracy/mean" in steps[-1]
    assert "eval before training" in r.stdout and "eval after training" in r.stdout
    assert (out / "checkpoints" / "step-0000002" / "adapters.safetensors").exists()


def test_eval_command_on_a_checkpoint(trained):
    model, out, _ = trained
    ckpt = out / "checkpoints" / "step-0000002"
    r = cli("eval", "--model", model, "--adapter-path", ckpt, "--task", "chain_sum", "--limit", 3,
            "--k", 2, "--temperature", 1.0, "--max-new-tokens", 8)
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["prompts"] == 3 and 0.0 <= res["eval/accuracy"] <= res["eval/pass@2"] <= 1.0
    bad = cli("eval", "--model", model, "--k", 2, check=False)
    assert bad.returncode == 2 and "--temperature" in bad.stderr


def test_eval_command_on_a_prompts_file(scripted_model_factory, tmp_path):
    """A model whose greedy reply is always "5": right on the first row, wrong on the second."""
    model = scripted_model_factory({GENERATION_PROMPT: "5"})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 2 + 4?", "answer": "6"}]))
    r = cli("eval", "--model", model, "--data", data, "--reward-funcs", "accuracy", "--max-new-tokens", 4)
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["prompts"] == 2 and res["eval/accuracy"] == 0.5


def test_generate_command_replies(scripted_model_factory):
    model = scripted_model_factory({GENERATION_PROMPT: "Paris is the capital"})
    r = cli("generate", "--model", model, "--prompt", "What is the capital of France?", "--max-tokens", 20)
    assert r.stdout == "Paris is the capital\n"
    # Sampling options: top-k 1 keeps only the greedy token whatever the temperature.
    r = cli("generate", "--model", model, "--prompt", "Hi", "--system", "Be brief.", "--temp", 0.8,
            "--top-k", 1, "--seed", 3, "--verbose")
    assert r.stdout == "Paris is the capital\n" and "tok/s" in r.stderr
    from transformers import AutoTokenizer

    first_two = AutoTokenizer.from_pretrained(str(model)).encode("Paris is the capital")[:2]
    r = cli("generate", "--model", model, "--prompt", "Hi", "--max-tokens", 2)
    assert r.stdout == AutoTokenizer.from_pretrained(str(model)).decode(first_two) + "\n"


def test_export_fuses_adapters_into_a_model_that_replies_the_same(trained, tmp_path):
    from mlx_lm import load

    from mlx_rft.models import load_model

    model, out, _ = trained
    ckpt = out / "checkpoints" / "step-0000002"
    fused_dir = tmp_path / "fused"
    r = cli("export", "--model", model, "--adapter-path", ckpt, "--out", fused_dir)
    assert "fused" in r.stdout
    fused, tok = load(str(fused_dir))
    adapted, _ = load_model(model, adapter_path=ckpt)
    plain, _ = load_model(model)
    import mlx.core as mx

    ids = mx.array([tok.encode("Question 1: what is 3 + 4?")])
    a, b, c = (np.array(m(ids)) for m in (fused, adapted, plain))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(b - c).max() > 1e-3  # the adapters changed the model, so the check means something
    prompt = ["--prompt", "Question 1: what is 3 + 4?", "--max-tokens", 12]
    assert cli("generate", "--model", fused_dir, *prompt).stdout == \
        cli("generate", "--model", model, "--adapter-path", ckpt, *prompt).stdout
    again = cli("export", "--model", model, "--adapter-path", ckpt, "--out", fused_dir, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_doctor_reports_the_machine_and_the_default_model(tmp_path):
    empty = tmp_path / "home"
    text = cli("doctor", "--gemm-size", 128, env={"MLX_RFT_HOME": str(empty)}).stdout
    lines = text.splitlines()
    for key in ("platform", "backend", "blas", "default dtype", "mlx ", "mlx-lm", "default model"):
        assert any(line.startswith(key) for line in lines), (key, text)
    gflops = float(text.split("float32 GEMM", 1)[1].split("GFLOP/s")[0].strip())
    assert gflops > 0
    assert "not imported yet" in text and not empty.exists()  # doctor only looks


def test_doctor_finds_the_imported_default_model(default_model_dir):
    text = cli("doctor", "--gemm-size", 64).stdout
    assert f"imported at {default_model_dir}" in text


def test_the_console_script_is_the_same_cli():
    from pathlib import Path

    script = Path(sys.executable).with_name("mlx-rft")
    assert script.exists(), "pip install -e . puts mlx-rft next to the interpreter"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == cli("--help").stdout
