"""Trainable-parameter setup, the reference policy, schedules and atomic checkpoints."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rft.config import GRPOConfig
from mlx_rft.errors import MlxRftError
from mlx_rft.models import load_model
from mlx_rft.policy.adapters import adapters_disabled, adapters_fused
from mlx_rft.train import checkpoint as ckpt
from mlx_rft.train.optim import build_optimizer, build_schedule
from mlx_rft.train.policy import adapter_config, count_parameters, setup_trainable


def _train_one_step(model, optimizer, seed=0):
    x = mx.array([[5, 6, 7, 8, 9]])

    def loss_fn(m):
        return m(x).astype(mx.float32).square().mean()

    _, grads = mx.value_and_grad(lambda p: (model.update(p), loss_fn(model))[1])(model.trainable_parameters())
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)


def test_lora_setup_only_adapters_train_and_reference_is_base(tiny_qwen3):
    model, _ = load_model(tiny_qwen3)
    x = mx.array([[1, 2, 3, 4]])
    base_out = model(x)
    cfg = GRPOConfig(lora_rank=4, lora_layers=1)
    setup_trainable(model, cfg)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.split(".")[-1] in ("lora_a", "lora_b") for k in names)
    assert all(k.startswith("model.layers.1.") for k in names)  # only the last block
    counts = count_parameters(model)
    assert 0 < counts.trainable < counts.frozen
    # Train the adapters away from zero, then check that disabling them restores the base output.
    opt = optim.SGD(learning_rate=1.0)
    _train_one_step(model, opt)
    assert not mx.allclose(model(x), base_out, atol=1e-6)
    with adapters_disabled(model):
        np.testing.assert_allclose(np.array(model(x)), np.array(base_out), atol=1e-5)
    assert not mx.allclose(model(x), base_out, atol=1e-6)  # scales restored afterwards


def test_fused_adapters_sample_the_same_policy_and_are_restored(tiny_qwen3):
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_rft.rollout import generate_rollouts
    from mlx_rft.types import SamplingConfig

    model, tok = load_model(tiny_qwen3)
    setup_trainable(model, GRPOConfig(lora_rank=4))
    _train_one_step(model, optim.SGD(learning_rate=1.0))  # adapters away from zero
    before = dict(tree_flatten(model.trainable_parameters()))
    x = mx.array([[1, 2, 3, 4, 5]])
    out = model(x)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    plain = generate_rollouts(model, tok, [[1, 2, 3], [4, 5]], 2, sampling, seed=3)
    with adapters_fused(model):
        assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
        np.testing.assert_allclose(np.array(model(x)), np.array(out), atol=1e-5)
        fused = generate_rollouts(model, tok, [[1, 2, 3], [4, 5]], 2, sampling, seed=3)
    assert fused.texts == plain.texts
    assert np.max(np.abs(np.array(fused.logprobs) - np.array(plain.logprobs))) < 1e-5
    # The adapters are back, the very same arrays, and still train.
    after = dict(tree_flatten(model.trainable_parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert sum(isinstance(m, LoRALinear) for _, m in model.named_modules()) > 0


def test_full_finetune_freeze_patterns(tiny_qwen3):
    model, _ = load_model(tiny_qwen3)
    setup_trainable(model, GRPOConfig(finetune_type="full", freeze=["embed_tokens"]))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and not any("embed_tokens" in k for k in names)
    with pytest.raises(MlxRftError, match="matched no module"):
        setup_trainable(load_model(tiny_qwen3)[0], GRPOConfig(finetune_type="full", freeze=["nope"]))
    with pytest.raises(MlxRftError, match="matched no layers"):
        setup_trainable(load_model(tiny_qwen3)[0], GRPOConfig(lora_keys=["self_attn.nope"]))


def test_schedule_warmup_then_cosine():
    cfg = GRPOConfig(learning_rate=1.0, warmup_steps=4, lr_schedule="cosine", num_steps=14)
    lr = build_schedule(cfg)
    vals = [float(lr(mx.array(s))) for s in range(15)]
    np.testing.assert_allclose(vals[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert vals[4] == pytest.approx(1.0)  # cosine starts at the peak
    assert vals[9] == pytest.approx(0.5 * (1 + np.cos(np.pi * 5 / 10)), rel=1e-5)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))
    assert build_schedule(GRPOConfig(learning_rate=0.1)) == 0.1


@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_checkpoint_round_trip_and_loadable_by_mlx_lm(tmp_path, tiny_qwen3, finetune_type):
    import mlx_lm

    cfg = GRPOConfig(finetune_type=finetune_type, lora_rank=4, keep_last=2, output_dir=str(tmp_path))
    model, tok = load_model(tiny_qwen3)
    n = setup_trainable(model, cfg)
    opt = build_optimizer(cfg)
    _train_one_step(model, opt)
    acfg = None if finetune_type == "full" else adapter_config(cfg, n)
    root = tmp_path / "checkpoints"
    path = ckpt.save_checkpoint(root, 3, model, opt, cfg, {"sampler": {"epoch": 1}}, adapter_cfg=acfg,
                                base_model_dir=tiny_qwen3)
    assert ckpt.find_checkpoint("latest", tmp_path) == path
    x = mx.array([[3, 4, 5]])
    expected = model(x)

    model2, _ = load_model(tiny_qwen3)
    setup_trainable(model2, cfg)
    opt2 = build_optimizer(cfg)
    state = ckpt.load_checkpoint(path, model2, opt2)
    assert state["step"] == 3 and state["sampler"] == {"epoch": 1}
    np.testing.assert_allclose(np.array(model2(x)), np.array(expected), atol=1e-6)
    for (k1, v1), (k2, v2) in zip(tree_flatten(opt.state), tree_flatten(opt2.state)):
        assert k1 == k2 and mx.array_equal(v1, v2), k1
    # The same checkpoint folder works with plain mlx-lm.
    if finetune_type == "full":
        m3, _ = mlx_lm.load(str(path))
    else:
        m3, _ = mlx_lm.load(str(tiny_qwen3), adapter_path=str(path))
    np.testing.assert_allclose(np.array(m3(x)), np.array(expected), atol=1e-5)


def test_checkpoint_failure_leaves_nothing_and_prunes(tmp_path, tiny_qwen3, monkeypatch):
    cfg = GRPOConfig(lora_rank=4, keep_last=2)
    model, _ = load_model(tiny_qwen3)
    n = setup_trainable(model, cfg)
    opt = build_optimizer(cfg)
    _train_one_step(model, opt)
    root = tmp_path / "checkpoints"
    kw = dict(adapter_cfg=adapter_config(cfg, n), base_model_dir=tiny_qwen3)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, model, opt, cfg, {}, **kw)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-0000002", "step-0000003"]

    real = mx.save_safetensors

    def failing(path, *a, **k):
        if "optimizer" in str(path):
            raise OSError("disk full")
        return real(path, *a, **k)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 4, model, opt, cfg, {}, **kw)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000003"]
    assert (root / "latest").read_text().strip() == "step-0000003"


def test_resume_errors(tmp_path):
    with pytest.raises(MlxRftError, match="no checkpoint"):
        ckpt.find_checkpoint("latest", tmp_path)
    with pytest.raises(MlxRftError, match="not a checkpoint folder"):
        ckpt.find_checkpoint(str(tmp_path), tmp_path)


@pytest.mark.parametrize("max_norm,streams", [(0.0, 2), (1e-3, 2), (1e-3, 1)])
def test_compiled_update_matches_the_plain_optimizer(tiny_model_factory, max_norm, streams):
    """CompiledApply = clip_grad_norm + AdamW.update (two steps), and its change is the squared
    distance between the weights before and after, in float64. Twelve blocks, so that parameter
    names do not sort in the order the model lists them (layers.10 before layers.2)."""
    from mlx_rft.train.optim import CompiledApply

    path = tiny_model_factory("qwen3", num_hidden_layers=12)
    models = [load_model(path, dtype="float32")[0] for _ in range(2)]
    opts = [optim.AdamW(learning_rate=1e-2, weight_decay=0.1) for _ in range(2)]
    compiled = CompiledApply(models[1], opts[1], max_norm, streams=streams)
    rng = np.random.default_rng(0)
    for _ in range(2):
        grads = {k: mx.array(rng.normal(size=v.shape).astype(np.float32))
                 for k, v in tree_flatten(models[0].trainable_parameters())}
        tree = tree_unflatten(list(grads.items()))
        before = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(models[1].trainable_parameters())}
        expected_norm = np.sqrt(sum((np.array(g, dtype=np.float64) ** 2).sum() for g in grads.values()))
        plain = optim.clip_grad_norm(tree, max_norm)[0] if max_norm > 0 else tree
        opts[0].update(models[0], plain)
        norm, change = compiled(tree)
        mx.eval(models[0].parameters(), models[1].parameters(), norm, change)
        assert abs(norm.item() - expected_norm) <= 1e-5 * expected_norm
        after = dict(tree_flatten(models[1].trainable_parameters()))
        distance = sum(((np.array(after[k], dtype=np.float64) - before[k]) ** 2).sum() for k in before)
        assert distance > 0
        assert abs(change.item() - distance) <= 1e-4 * distance
        for k, v in tree_flatten(models[0].trainable_parameters()):
            np.testing.assert_allclose(np.array(after[k]), np.array(v), atol=1e-6, err_msg=k)
