"""`mlx-rft train` on time-series rows: prompts with soft tokens are sampled and trained by the
GRPO trainer, the gradient reaches the encoder, an `mlx-rft sft` encoder is the starting point,
and resume stays exact."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rft import GRPOConfig, GRPOTrainer
from mlx_rft.errors import MlxRftError
from mlx_rft.models import resolve_model_path
from mlx_rft.sft.config import SFTConfig
from mlx_rft.sft.trainer import SFTTrainer
from mlx_rft.timeseries.model import TimeSeriesLM


def _series_file(path, n, seed, classes=("up", "down", "flat")):
    rng = np.random.default_rng(seed)
    slopes = {"up": 1.0, "down": -1.0, "flat": 0.0}
    with open(path, "w") as f:
        for i in range(n):
            label = classes[i % len(classes)]
            values = (slopes[label] * np.linspace(0, 1, 10) + 0.1 * rng.normal(size=10)).round(3)
            f.write(json.dumps({"prompt": ["Up, down or flat?",
                                           {"series": values.tolist(), "name": "sensor"}],
                                "answer": label}) + "\n")
    return path


def digit_share(prompts, completions, **columns):
    """A reward a tiny random model earns with spread (the answer tag it never writes)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _cfg(tmp_path, model, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(model=str(model), train_file=str(_series_file(tmp_path / "train.jsonl", 12, 0)),
                eval_file=str(_series_file(tmp_path / "test.jsonl", 4, 1)), max_new_tokens=6,
                output_dir=str(tmp_path / "run"), eval_size=4, save_every=2, learning_rate=3e-3,
                group_size=4, prompts_per_step=2, num_steps=4, seed=1, temperature=1.5)
    base.update(kw)
    return GRPOConfig(**base)


def _set_up(trainer):
    """The trainer's model and trainable setup, as train() builds them (no step taken)."""
    trainer.model_dir = resolve_model_path(trainer.cfg.model)
    trainer._setup_model()
    return trainer


def _trainable(trainer):
    return {k: np.asarray(v) for k, v in tree_flatten(trainer.policy.trainable_parameters())}


def test_grpo_on_series_rows_trains_the_encoder_and_the_adapters(tmp_path, tiny_qwen3):
    trainer = GRPOTrainer(_cfg(tmp_path, tiny_qwen3), [digit_share])
    result = trainer.train()
    assert isinstance(trainer.policy, TimeSeriesLM)
    ex = trainer.train_data[0]
    assert ex.pieces is not None and len(ex.prompt_ids) == sum(
        len(p) if p.dtype.kind == "i" else -(-len(p) // 4) for p in ex.pieces)
    assert "<series>" in ex.prompt
    names = {k.split(".")[0] for k in _trainable(trainer)}
    assert names == {"llm", "encoder", "projector"}
    start = _set_up(GRPOTrainer(_cfg(tmp_path / "fresh", tiny_qwen3, num_steps=1)))
    before = {k: np.asarray(v) for k, v in tree_flatten(start.policy.trainable_parameters())}
    after = _trainable(trainer)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    moved = [k for k in after if k.startswith("encoder") and not np.array_equal(after[k], before[k])]
    assert moved, "no encoder weight changed: the loss's gradient did not reach the encoder"
    assert "eval/accuracy" in result.eval_after
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000004" / "adapters.safetensors"
    assert any(k.startswith("encoder.") for k in mx.load(str(ckpt)))


def test_grpo_starts_from_the_sft_encoder_and_resumes_exactly(tmp_path, tiny_qwen3):
    sft = SFTConfig(model=str(tiny_qwen3), train_file=str(_series_file(tmp_path / "s.jsonl", 6, 2)),
                    num_steps=2, batch_size=3, warmup_steps=0, output_dir=str(tmp_path / "sft"),
                    encoder_dim=32, encoder_heads=2, log_every=1, controls=False)
    SFTTrainer(sft, log=lambda *_: None).train()
    folder = tmp_path / "sft" / "model"
    saved = mx.load(str(folder / "timeseries.safetensors"))
    trainer = _set_up(GRPOTrainer(_cfg(tmp_path / "a", tiny_qwen3, encoder=str(folder))))
    mine = dict(tree_flatten(trainer.policy.parameters()))
    for k, v in saved.items():
        assert np.array_equal(np.asarray(mine[k]), np.asarray(v)), k

    straight = GRPOTrainer(_cfg(tmp_path / "a", tiny_qwen3, encoder=str(folder)), [digit_share])
    straight.train()
    GRPOTrainer(_cfg(tmp_path / "b", tiny_qwen3, encoder=str(folder), num_steps=2),
                [digit_share]).train()
    resumed = GRPOTrainer(_cfg(tmp_path / "b", tiny_qwen3, encoder=str(folder), resume="latest"),
                          [digit_share])
    resumed.train()
    a, b = _trainable(straight), _trainable(resumed)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_series_rows_refuse_a_kl_reference(tmp_path, tiny_qwen3):
    with pytest.raises(MlxRftError, match="--beta above 0 is not supported with time-series rows"):
        GRPOTrainer(_cfg(tmp_path, tiny_qwen3, beta=0.1)).train()


def test_a_frozen_llm_trains_only_the_encoder(tmp_path, tiny_qwen3):
    trainer = GRPOTrainer(_cfg(tmp_path, tiny_qwen3, finetune_type="none", num_steps=2),
                          [digit_share])
    trainer.train()
    assert {k.split(".")[0] for k in _trainable(trainer)} == {"encoder", "projector"}
    before = dict(mx.load(str(tiny_qwen3 / "model.safetensors")))
    llm = dict(tree_flatten(trainer.model.parameters()))
    assert all(np.array_equal(np.asarray(llm[k]), np.asarray(v)) for k, v in before.items())
    with pytest.raises(MlxRftError, match="finetune_type none freezes the whole model"):
        GRPOTrainer(GRPOConfig(model=str(tiny_qwen3), finetune_type="none",
                               output_dir=str(tmp_path / "text")), [digit_share]).train()
