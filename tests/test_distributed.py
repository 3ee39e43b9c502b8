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


def _run(cmd, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


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
    moved = max(float(mx.abs(a[k]).max()) for k in a if k.endswith("lora_b"))
    assert moved > 1e-4  # training did something
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
