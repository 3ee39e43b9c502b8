"""`mlx-rft sft` end to end on tiny models: the frozen LLM stays bit-identical while the encoder
trains, resume after Ctrl-C is exact, chat rows train LoRA, and run folders are never lost."""

import mlx_rft  # noqa: F401

import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rft.errors import MlxRftError
from mlx_rft.sft.config import SFTConfig
from mlx_rft.sft.trainer import SFTTrainer, batch_indices
from mlx_rft.timeseries.model import load_timeseries_lm


def _series_file(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = "up" if i % 2 else "down"
            slope = 1.0 if label == "up" else -1.0
            values = (slope * np.linspace(0, 1, 12) + 0.1 * rng.normal(size=12)).round(3).tolist()
            f.write(json.dumps({"prompt": ["Is the trend up or down?",
                                           {"series": values, "name": "sensor"}],
                                "answer": label}) + "\n")
    return path


def _chat_file(path):
    with open(path, "w") as f:
        for q, a in [("the cat", "sat on the mat"), ("a dog", "ran to the park")] * 2:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def _cfg(tmp_path, model, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(model=str(model), train_file=str(_series_file(tmp_path / "train.jsonl", 8, 0)),
                eval_file=str(_series_file(tmp_path / "test.jsonl", 6, 1)), num_steps=4,
                batch_size=4, warmup_steps=1, encoder_dim=16, encoder_heads=2, patch_size=4,
                output_dir=str(tmp_path / "run"), save_every=2, log_every=1, max_new_tokens=6)
    base.update(kw)
    return SFTConfig(**base)


def _trainable(trainer):
    return {k: np.asarray(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}


def test_batches_walk_seeded_epochs():
    steps = [batch_indices(5, 2, 7, s) for s in range(1, 6)]
    flat = np.concatenate(steps)
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    np.testing.assert_array_equal(batch_indices(5, 2, 7, 3), steps[2])
    assert not np.array_equal(batch_indices(5, 2, 8, 1), steps[0])


def test_sft_trains_the_encoder_and_leaves_the_frozen_llm_bit_identical(tmp_path, tiny_qwen3):
    before = dict(mx.load(str(tiny_qwen3 / "model.safetensors")))
    trainer = SFTTrainer(_cfg(tmp_path, tiny_qwen3), log=lambda *_: None).setup()
    assert trainer.finetune == "none" and trainer.prefix.length > 0
    start = _trainable(trainer)
    result = trainer.train()
    llm = dict(tree_flatten(trainer.model.llm.parameters()))
    assert set(llm) == set(before)
    for k, v in before.items():
        assert np.array_equal(np.asarray(llm[k]), np.asarray(v)), k
    after = _trainable(trainer)
    assert set(after) == set(start) and all(k.split(".")[0] in ("encoder", "projector") for k in after)
    assert any(not np.array_equal(after[k], start[k]) for k in after)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["params/trainable"] > 0 and rows[0]["params/frozen"] > rows[0]["params/trainable"]
    assert all(r["grad_norm/encoder"] > 0 and r["grad_norm/projector"] > 0 for r in rows)
    assert "grad_norm/llm" not in rows[0]
    assert all(r["tokens_per_second"] > 0 and r["peak_memory_gb"] > 0 for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for name in ("ranking", "generation", "shuffled_series"):
        assert summary["eval"][name]["n"] == 6
    assert summary["eval"]["baselines"]["majority"] == 0.5
    assert result.eval["ranking"]["constant_baseline"] == 0.5
    # The trained parts load on their own for inference, from their own folder.
    loaded, tok = load_timeseries_lm(tmp_path / "run" / "model")
    e = trainer.data.test[0]
    a, _ = loaded.embed([e.pieces])
    b, _ = trainer.model.embed([e.pieces])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sft_resume_after_ctrl_c_is_exact(tmp_path, tiny_qwen3):
    straight = SFTTrainer(_cfg(tmp_path / "a", tiny_qwen3, num_steps=5), log=lambda *_: None)
    straight.train()

    cfg = _cfg(tmp_path / "b", tiny_qwen3, num_steps=5)
    first = SFTTrainer(cfg, log=lambda *_: None).setup()
    step = first._step

    def interrupt_at_3(loss_and_grad, n):
        out = step(loss_and_grad, n)
        if n == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    first._step = interrupt_at_3
    result = first.train()
    assert result.interrupted and result.step == 3
    assert (tmp_path / "b" / "run" / "checkpoints" / "step-0000003").is_dir()
    assert not (tmp_path / "b" / "run" / "summary.json").exists()

    resumed = SFTTrainer(_cfg(tmp_path / "b", tiny_qwen3, num_steps=5, resume="latest"),
                         log=lambda *_: None)
    resumed.train()
    a, b = _trainable(straight), _trainable(resumed)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    la = [json.loads(x) for x in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]

    with pytest.raises(MlxRftError, match="batch_size 4 -> 2"):
        SFTTrainer(_cfg(tmp_path / "b", tiny_qwen3, num_steps=5, batch_size=2, resume="latest"),
                   log=lambda *_: None).setup()


def test_an_existing_run_is_never_overwritten_by_accident(tmp_path, tiny_qwen3):
    SFTTrainer(_cfg(tmp_path, tiny_qwen3, num_steps=2), log=lambda *_: None).train()
    with pytest.raises(MlxRftError, match="already holds a run.*--resume latest.*--overwrite true"):
        SFTTrainer(_cfg(tmp_path, tiny_qwen3, num_steps=2), log=lambda *_: None).setup()
    assert (tmp_path / "run" / "summary.json").exists()


def test_chat_rows_train_lora_on_the_assistant_turn(tmp_path, tiny_qwen3):
    chat = _chat_file(tmp_path / "chat.jsonl")
    cfg = SFTConfig(model=str(tiny_qwen3), train_file=str(chat), eval_file=str(chat), num_steps=30,
                    batch_size=4, warmup_steps=0, llm_learning_rate=1e-2, lr_schedule="constant",
                    output_dir=str(tmp_path / "run"), save_every=30, log_every=10)
    trainer = SFTTrainer(cfg, log=lambda *_: None).setup()
    assert trainer.finetune == "lora" and trainer.model.config is None
    trainer.train()
    losses = [json.loads(x)["loss"] for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < 0.5 * losses[0]
    assert all(k.startswith("llm.") and "lora" in k for k in _trainable(trainer))
    # mlx-lm loads the adapters as they are (no series parts in a text model).
    from mlx_lm import load

    model, _ = load(str(tiny_qwen3), adapter_path=str(tmp_path / "run" / "model"))
    assert not (tmp_path / "run" / "model" / "timeseries.safetensors").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval"]["generation"]["n"] == 4


def test_bad_sft_settings_are_refused_with_the_fix():
    with pytest.raises(MlxRftError, match="prompt_format='image'.*soft or text"):
        SFTConfig(prompt_format="image").validate()
    with pytest.raises(MlxRftError, match="either --task or --train-file"):
        SFTConfig(task="ucr:GunPoint", train_file="x.jsonl").validate()
    with pytest.raises(MlxRftError, match="encoder_dim=30 must be a multiple of encoder_heads=4"):
        SFTConfig(encoder_dim=30).validate()


def test_micro_batches_give_the_same_step(tmp_path, tiny_qwen3):
    from mlx_rft.sft.trainer import micro_batches

    assert micro_batches([3, 3, 5, 2], 10) == [[0, 1], [2, 3]]
    assert micro_batches([3, 3, 5, 6], 10) == [[0, 1], [2], [3]]
    assert micro_batches([20], 10) == [[0]]
    whole = SFTTrainer(_cfg(tmp_path / "w", tiny_qwen3, num_steps=2, controls=False),
                       log=lambda *_: None)
    whole.train()
    split = SFTTrainer(_cfg(tmp_path / "s", tiny_qwen3, num_steps=2, controls=False,
                            max_batch_tokens=8), log=lambda *_: None)
    split.train()
    a, b = _trainable(whole), _trainable(split)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-4)
