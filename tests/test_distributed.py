"""Two processes on 127.0.0.1 (MLX ring backend) reach the same weights as one process with the
same global batch and seed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import shutil

import mlx.core as mx
import pytest

JOB = Path(__file__).with_name("dist_job.py")


def launcher() -> list[str]:
    """MLX's launcher: the `mlx.launch` script next to this interpreter, else on PATH, else the
    module behind it in this environment (it ships with every mlx wheel, so it never goes missing)."""
    beside = Path(sys.executable).with_name("mlx.launch")
    if beside.exists():
        return [str(beside)]
    if shutil.which("mlx.launch"):
        return [shutil.which("mlx.launch")]
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def _spawn(cmd, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def _run(cmd, cwd):
    r = _spawn(cmd, cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _moved(weights) -> float:
    """How far training moved the adapters: LoRA's B matrices start at zero."""
    return max(float(mx.abs(weights[k]).max()) for k in weights if k.endswith("lora_b"))


@pytest.mark.parametrize("loss_type, scale, extra", [
    ("dapo", "batch", []), ("grpo", "group", []),
    ("dapo", "batch", ["dynamic"]),  # dynamic sampling: the same refills and kept groups
    ("dapo", "batch", ["episodes"]),  # two-turn episodes: each rank runs its rows' environments
])
def test_two_processes_match_one(tiny_qwen3, tmp_path, loss_type, scale, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [str(tiny_qwen3), loss_type, scale, "2", *extra]
    _run([sys.executable, str(JOB), args[0], str(one), *args[1:]], tmp_path)
    out = _run([*launcher(), "-n", "2", "--backend", "ring", "--", sys.executable, str(JOB),
                args[0], str(two), *args[1:]], tmp_path)
    assert "over 2 processes" in out
    a = mx.load(str(one / "checkpoints" / "step-0000002" / "adapters.safetensors"))
    b = mx.load(str(two / "checkpoints" / "step-0000002" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    assert _moved(a) > 1e-4  # training did something
    # SGD keeps the comparison linear (Adam divides float noise in near-zero gradients by itself).
    assert diff < 1e-5, diff
    # Same samples and rewards, same gradient (global norm) at every step; rank 0 wrote the logs.
    def steps(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [x for x in rows if "loss" in x]

    s1, s2 = steps(one), steps(two)
    assert len(s1) == len(s2) == 2
    for x, y in zip(s1, s2):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], rel=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
        if extra == ["episodes"]:
            assert x["episode/turns"] == y["episode/turns"] == 2.0
        elif extra:
            assert x["sampling/prompts"] == y["sampling/prompts"] and x["sampling/rounds"] >= 1
            assert x["sampling/kept_groups"] == y["sampling/kept_groups"]


# ------------------------------------------------------------------ separate rollout workers
def _weights(run_dir, step):
    return mx.load(str(run_dir / "checkpoints" / f"step-{step:07d}" / "adapters.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(mx.abs(a[k] - b[k]).max()) for k in a)


def _steps(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in rows if "loss" in x]


def _launch(n, model, out, steps, *options, cwd, check=True):
    cmd = [*launcher(), "-n", str(n), "--backend", "ring", "--", sys.executable, str(JOB), str(model),
           str(out), "dapo", "batch", str(steps), *options]
    return _run(cmd, cwd) if check else _spawn(cmd, cwd)


@pytest.mark.parametrize("optimizer, extra", [
    ("sgd", []), ("adamw", []),
    ("sgd", ["episodes"]),  # two-turn episodes: the environments run on the worker
])
def test_rollout_worker_with_staleness_zero_is_the_synchronous_run(tiny_qwen3, tmp_path, optimizer, extra):
    """1 trainer + 1 rollout worker, max_staleness 0: the single-process run's weights."""
    opts = [f"optimizer={optimizer}", *(["learning_rate=0.01"] if optimizer == "adamw" else []), *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(JOB), str(tiny_qwen3), str(one), "dapo", "batch", "3", *opts], tmp_path)
    out = _launch(2, tiny_qwen3, two, 3, "rollout_workers=1", "max_staleness=0", *opts, cwd=tmp_path)
    assert "rollouts from 1 worker process(es), max staleness 0" in out
    a, b = _weights(one, 3), _weights(two, 3)
    assert _moved(a) > 1e-3  # it trained
    assert _max_diff(a, b) == 0.0  # the same samples, rewards and updates, bit for bit
    s1, s2 = _steps(one), _steps(two)
    assert [x["grad_norm"] for x in s1] == [x["grad_norm"] for x in s2]
    assert [x["async/staleness"] for x in s2] == [0.0, 0.0, 0.0]
    assert [x["async/weights_version"] for x in s2] == [0.0, 1.0, 2.0]
    if extra:
        assert [x["episode/turns"] for x in s2] == [x["episode/turns"] for x in s1] == [2.0] * 3
        r1 = (one / "rollouts.jsonl").read_text().splitlines()
        assert r1 == (two / "rollouts.jsonl").read_text().splitlines()  # whole episodes logged


def test_two_rollout_workers_with_staleness_one(tiny_qwen3, tmp_path):
    """Rank 0 trains step s while ranks 1 and 2 make steps s+1 and s+2; the off-policy weights
    correct for the one-update lag, and the metrics say what lag was seen."""
    out = _launch(3, tiny_qwen3, tmp_path / "run", 5, "rollout_workers=2", "max_staleness=1",
                  "off_policy_correction=tis", cwd=tmp_path)
    assert "rollouts from 2 worker process(es), max staleness 1" in out
    s = _steps(tmp_path / "run")
    assert [x["async/staleness"] for x in s] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert [x["async/weights_version"] for x in s] == [0.0, 0.0, 1.0, 2.0, 3.0]
    assert [x["async/worker"] for x in s] == [1.0, 2.0, 1.0, 2.0, 1.0]
    assert s[0]["off_policy/is_weight_mean"] == pytest.approx(1.0, abs=1e-6)  # fresh: w = 1
    assert s[0]["off_policy/capped_frac"] == 0.0
    stale = [x["off_policy/is_weight_mean"] for x in s[1:]]
    assert all(abs(w - 1.0) > 1e-4 for w in stale)  # older weights made those tokens
    assert _moved(_weights(tmp_path / "run", 5)) > 1e-3  # it trained


def test_rollout_workers_stop_on_sigterm_and_resume_at_the_checkpoint(tiny_qwen3, tmp_path):
    """SIGTERM to the trainer after step 2 of 4: it saves, stops the worker and exits 143; the
    resumed run reaches the uninterrupted single-process run's weights (max_staleness 0), the
    worker starting again from the checkpoint's."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(JOB), str(tiny_qwen3), str(one), "dapo", "batch", "4"], tmp_path)
    r = _launch(2, tiny_qwen3, two, 4, "rollout_workers=1", "max_staleness=0", "sigterm_after=2",
                cwd=tmp_path, check=False)
    text = r.stdout + r.stderr
    assert "SIGTERM: finishing this step, saving a checkpoint" in text
    assert "Node with rank 0 exited with code 143" in text and "rank 1 exited" not in text
    assert sorted(p.name for p in (two / "checkpoints").glob("step-*")) == ["step-0000002"]
    out = _launch(2, tiny_qwen3, two, 4, "rollout_workers=1", "max_staleness=0", "resume=latest", cwd=tmp_path)
    assert "resumed from" in out and "step 2" in out
    assert _max_diff(_weights(one, 4), _weights(two, 4)) == 0.0


def test_a_failed_rollout_worker_is_reported_and_the_others_carry_on(tiny_qwen3, tmp_path):
    r = _launch(3, tiny_qwen3, tmp_path / "run", 4, "rollout_workers=2", "max_staleness=1",
                "fail_rank=2", cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "rollout worker rank 2 stopped (reward 'digit_share' raised RuntimeError: reward broke on rank 2" in text
    assert "its 1 pending job(s) go to rank(s) [1]" in text
    s = _steps(tmp_path / "run")
    assert len(s) == 4 and [x["async/worker"] for x in s[2:]] == [1.0, 1.0]
    assert (tmp_path / "run" / "checkpoints" / "step-0000004").is_dir()


def test_when_every_rollout_worker_fails_the_run_stops_with_its_steps_saved(tiny_qwen3, tmp_path):
    r = _launch(2, tiny_qwen3, tmp_path / "run", 4, "rollout_workers=1", "max_staleness=0",
                "fail_rank=1", cwd=tmp_path, check=False)
    text = r.stdout + r.stderr
    assert "Node with rank 0 exited with code 1" in text  # (mlx.launch itself exits 0 regardless)
    assert "every rollout worker has stopped (rank 1: reward 'digit_share' raised RuntimeError: reward broke on rank 1" in text
    assert "resume the run with --resume latest" in text
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir()  # the finished step is kept
