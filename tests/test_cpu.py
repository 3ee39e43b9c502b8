"""`mlx_rft.cpu`: the speed-ups are in force inside `speedups()` only, and the BLAS preload happens
only with MLX's Linux CPU wheel."""

import importlib
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_rft import cpu
from mlx_rft.cpu import allocator, blas, kernels


def _model_globals(module):
    return module.swiglu, module.scaled_dot_product_attention


def test_load_model_and_rollouts_leave_mlx_lm_as_it_was(tiny_qwen3):
    from mlx_rft.models import load_model
    from mlx_rft.rollout import generate_rollouts
    from mlx_rft.types import SamplingConfig

    stock = (kernels.mlx_lm_swiglu(), kernels.mlx_lm_attention())
    model, tok = load_model(tiny_qwen3)
    qwen3 = importlib.import_module("mlx_lm.models.qwen3")
    assert _model_globals(qwen3) == stock and not allocator.in_force()
    generate_rollouts(model, tok, [[1, 5, 9]], 2, SamplingConfig(max_new_tokens=4), seed=0)
    assert _model_globals(qwen3) == stock and not allocator.in_force()


def test_training_runs_inside_the_block_and_leaves_mlx_lm_as_it_was(tiny_qwen3, tmp_path):
    from mlx_rft import GRPOConfig, GRPOTrainer

    qwen3 = importlib.import_module("mlx_lm.models.qwen3")
    stock = (kernels.mlx_lm_swiglu(), kernels.mlx_lm_attention())
    seen = []

    def reward(prompts, completions, **columns):  # runs between the rollouts and the update
        seen.append((_model_globals(qwen3), allocator.in_force()))
        return [float(len(c)) for c in completions]

    cfg = GRPOConfig(model=str(tiny_qwen3), num_steps=1, max_new_tokens=4, eval_size=1, group_size=2,
                     prompts_per_step=2, save_every=100, output_dir=str(tmp_path / "run"))
    GRPOTrainer(cfg, reward_funcs=[reward], train_dataset=[{"prompt": f"say {i}"} for i in range(8)]).train()
    assert seen and all(g == (kernels.swiglu, kernels.scaled_dot_product_attention) for g, _ in seen)
    assert all(on == allocator.wanted() for _, on in seen)
    assert _model_globals(qwen3) == stock and not allocator.in_force()


def test_speedups_patch_the_model_modules_inside_the_block_only(tiny_qwen3, monkeypatch):
    from mlx_rft.models import load_model

    model, _ = load_model(tiny_qwen3)
    qwen3 = importlib.import_module("mlx_lm.models.qwen3")
    stock = (kernels.mlx_lm_swiglu(), kernels.mlx_lm_attention())
    tokens = mx.array([[1, 5, 9, 30, 2]])
    before = model(tokens)
    with cpu.speedups(model) as swapped:
        assert sorted(swapped) == [
            "mlx_lm.models.qwen3.scaled_dot_product_attention", "mlx_lm.models.qwen3.swiglu",
        ]
        assert _model_globals(qwen3) == (kernels.swiglu, kernels.scaled_dot_product_attention)
        assert allocator.in_force() == allocator.wanted()
        with cpu.speedups(model) as inner:  # nested: still in force after the inner block
            assert inner == swapped
        assert _model_globals(qwen3) == (kernels.swiglu, kernels.scaled_dot_product_attention)
        assert allocator.in_force() == allocator.wanted()
        after = model(tokens)
    assert _model_globals(qwen3) == stock and not allocator.in_force()
    assert mx.abs(after - before).max().item() < 1e-4

    # Overlapping (not nested) blocks: the globals stay ours until the last one exits.
    first, second = cpu.speedups(model), cpu.speedups(None)  # None: every loaded mlx-lm module
    first.__enter__()
    assert "mlx_lm.models.qwen3.swiglu" in second.__enter__()
    first.__exit__(None, None, None)
    assert qwen3.swiglu is kernels.swiglu
    second.__exit__(None, None, None)
    assert _model_globals(qwen3) == stock

    # A global someone else replaced is left alone, and the switch keeps mlx-lm's functions.
    mine = lambda gate, x: gate * x  # noqa: E731
    monkeypatch.setattr(qwen3, "swiglu", mine)
    with cpu.speedups(model) as swapped:
        assert swapped == ["mlx_lm.models.qwen3.scaled_dot_product_attention"]
    assert qwen3.swiglu is mine
    monkeypatch.undo()
    monkeypatch.setenv("MLX_RFT_FAST_KERNELS", "0")
    with cpu.speedups(model) as swapped:
        assert swapped == [] and _model_globals(qwen3) == stock


def test_speedups_do_nothing_off_the_cpu(tiny_qwen3, monkeypatch):
    from mlx_rft.models import load_model

    model, _ = load_model(tiny_qwen3)
    qwen3 = importlib.import_module("mlx_lm.models.qwen3")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    with cpu.speedups(model) as swapped:
        assert swapped == [] and qwen3.swiglu is kernels.mlx_lm_swiglu()
        assert not allocator.in_force()


def test_blas_is_chosen_from_the_installed_wheel(monkeypatch):
    installed = {"mlx-cpu"}
    monkeypatch.setattr(blas, "_installed", lambda dist: dist in installed)
    monkeypatch.setattr(blas.platform, "system", lambda: "Linux")
    assert blas.cpu_wheel_reason() is None
    installed.add("mlx-cuda-12")
    assert "CUDA" in blas.cpu_wheel_reason()
    installed.clear()
    assert "source build" in blas.cpu_wheel_reason()
    monkeypatch.setattr(blas.platform, "system", lambda: "Darwin")
    assert blas.cpu_wheel_reason() == "not needed on Darwin"


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS preload is Linux-only")
def test_a_cuda_wheel_loads_no_cpu_blas_and_import_loads_no_mlx(tmp_path):
    # A stand-in for mlx[cuda]'s backend distribution, found through the path like any other.
    info = tmp_path / "mlx_cuda_12-0.32.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-cuda-12\nVersion: 0.32.4\n")
    code = (
        "import sys, mlx_rft\n"
        "from mlx_rft.cpu import blas_status\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(blas_status().reason, '|', 'mlx.core' in sys.modules, 'libmkl' in maps or 'openblas' in maps)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLX_RFT_BLAS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    reason, flags = r.stdout.strip().split(" | ")
    assert "CUDA" in reason and flags == "False False"
