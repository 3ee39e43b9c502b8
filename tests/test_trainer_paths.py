"""Trainer paths beyond the plain LoRA run: the built-in task with its own rewards (tiny model, and
the real default model), the KL reference (LoRA adapters off, full fine-tuning's copy), several
optimisation passes per batch, periodic evaluation, DoRA and QLoRA, the linear LR schedule, the
TensorBoard and W&B reporters, and health alarms raised by a real run."""

import json
import math
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rft import GRPOConfig, GRPOTrainer
from mlx_rft.errors import MlxRftError
from mlx_rft.models import load_model

from test_trainer import ROWS, _final_state, digit_share, initial_state, make_cfg


def steps_of(res):
    return [h for h in res.history if "loss" in h]


def metrics_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The built-in task and its rewards


def check_task_run(trainer, res, cfg):
    """The run used the default task's rows and its own rewards: every logged completion's scores
    are what the task's reward functions give it with its row's columns, and the total is their
    weighted sum."""
    from mlx_rft.data import PromptDataset
    from mlx_rft.data.tasks import load_task

    task = load_task("default", size=cfg.task_size, seed=cfg.seed, eval_size=cfg.eval_size)
    names, weights = task.reward_names, list(task.reward_weights)
    assert names and "accuracy" in names[0]
    for h in steps_of(res):
        for name in names:
            assert f"rewards/{name}/mean" in h, (name, sorted(h))
    columns = {e.prompt: e.columns for e in
               PromptDataset.from_rows(task.rows, trainer.tokenizer, system_prompt=task.system_prompt)}
    rows = [json.loads(x) for x in (res.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) >= cfg.prompts_per_step * cfg.group_size
    for r in rows:
        cols = {k: [v] for k, v in columns[r["prompt"]].items()}
        assert "answer" in cols
        for name, f in zip(names, task.reward_funcs):
            (score,) = f([r["prompt"]], [r["completion"]], **cols)
            assert r[f"reward/{name}"] == pytest.approx(score, abs=1e-9), (name, r["completion"])
        parts = [r[f"reward/{n}"] for n in names]
        assert r["reward"] == pytest.approx(sum(w * p for w, p in zip(weights, parts)), abs=1e-6)
    for ev in (res.eval_before, res.eval_after):
        assert 0.0 <= ev["eval/accuracy"] <= 1.0
    return rows


def test_default_task_with_its_own_rewards_on_a_tiny_model(tiny_qwen3, tmp_path):
    cfg = GRPOConfig(model=str(tiny_qwen3), output_dir=str(tmp_path), num_steps=2, task_size=40,
                     eval_size=4, prompts_per_step=2, group_size=2, max_new_tokens=8, save_every=100)
    t = GRPOTrainer(cfg)
    res = t.train()
    assert res.steps == 2 and len(steps_of(res)) == 2
    check_task_run(t, res, cfg)


@pytest.mark.slow
def test_default_task_on_the_default_model(tmp_path):
    """`mlx-rft train`'s own path (no model, no task, no rewards given), kept short."""
    cfg = GRPOConfig(output_dir=str(tmp_path), num_steps=2, task_size=40, eval_size=2,
                     prompts_per_step=2, group_size=2, max_new_tokens=24, save_every=100)
    t = GRPOTrainer(cfg)
    res = t.train()
    assert res.steps == 2
    rows = check_task_run(t, res, cfg)
    # The default model solves some of these sums, so the check above saw real scores.
    assert any(r["reward"] > 0 for r in rows) or res.eval_before["eval/accuracy"] > 0
    assert (tmp_path / "checkpoints" / "step-0000002" / "adapters.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# The KL reference, several passes per batch, periodic evaluation


@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_kl_to_the_reference_starts_at_zero_and_grows(tiny_qwen3, tmp_path, finetune_type):
    """beta > 0: the reference is the model before training (LoRA: adapters off; full: a frozen
    copy). At step 1 the policy still equals it, so KL = 0; after updates it is > 0. A reference
    that followed the policy would keep KL at 0."""
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=3, beta=0.1, finetune_type=finetune_type,
                   learning_rate=1e-2)
    res = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS).train()
    kl = [h["kl"] for h in steps_of(res)]
    assert abs(kl[0]) < 1e-6 and kl[1] > 1e-5 and kl[2] > 1e-5, kl
    charts = (tmp_path / "report.html").read_text()
    assert "id='panel-kl'" in charts


def test_several_passes_per_batch_use_the_behaviour_log_probs(tiny_qwen3, tmp_path):
    """num_iterations = 2: the second pass sees a moved policy, so its importance ratio leaves 1,
    and the step moves the weights further than one pass does."""
    runs = {}
    for mu in (1, 2):
        cfg = make_cfg(tiny_qwen3, tmp_path / str(mu), num_steps=2, num_iterations=mu, optimizer="sgd",
                       learning_rate=0.5)
        runs[mu] = steps_of(GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS).train())
    for h in runs[1]:
        assert h["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(runs[2][1]["ratio/mean"] - 1.0) > 1e-4, runs[2][1]["ratio/mean"]
    assert runs[2][0]["update_norm"] > runs[1][0]["update_norm"] * 1.2
    assert runs[2][0]["reward/mean"] == runs[1][0]["reward/mean"]  # same rollouts at step 1


def test_eval_every(tiny_qwen3, tmp_path):
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=4, eval_every=2, eval_size=4)
    res = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS).train()
    evals = [x["step"] for x in metrics_lines(tmp_path) if "eval/accuracy" in x]
    assert evals == [0, 2, 4]
    assert "eval/accuracy" in next(h for h in res.history if h["step"] == 2)


# ---------------------------------------------------------------------------------------------
# DoRA and QLoRA


def logits(model, ids):
    return np.array(model(mx.array([ids])).astype(mx.float32))


@pytest.mark.parametrize("kind", ["dora", "qlora"])
def test_dora_and_qlora_train_and_their_checkpoints_load(tiny_qwen3, tmp_path, kind):
    kw = dict(finetune_type="dora") if kind == "dora" else dict(quantize_bits=4)
    init = initial_state(tiny_qwen3, tmp_path / "init", **kw)
    cfg = make_cfg(tiny_qwen3, tmp_path / "run", num_steps=2, learning_rate=1e-2, **kw)
    t = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
    t.train()
    state = _final_state(t)
    assert set(state) == set(init) and state
    for k, v in state.items():
        assert not np.array_equal(v, init[k]), f"{k} did not move"
    if kind == "dora":
        assert any(k.endswith(".m") for k in state)  # DoRA's magnitude vectors train
    else:
        quantized = [k for k, _ in tree_flatten(t.model.parameters()) if k.endswith(".scales")]
        assert quantized and not any(k.endswith(".scales") for k in state)
    if kind == "dora":
        assert_checkpoint_reloads(t, tiny_qwen3, tmp_path / "run" / "checkpoints" / "step-0000002")


def assert_checkpoint_reloads(trainer, base, ckpt):
    """The checkpoint's adapter folder on the base model is the trained policy."""
    loaded, tok = load_model(base, adapter_path=ckpt)
    ids = tok.encode("Question 3: say something")
    np.testing.assert_allclose(logits(loaded, ids), logits(trainer.model, ids), atol=1e-4)


def test_qlora_checkpoint_reloads_the_quantized_policy(tiny_qwen3, tmp_path):
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=1, learning_rate=1e-2, quantize_bits=4)
    t = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
    t.train()
    assert_checkpoint_reloads(t, tiny_qwen3, tmp_path / "checkpoints" / "step-0000001")


# ---------------------------------------------------------------------------------------------
# The linear LR schedule


def test_linear_schedule_with_warmup_drives_the_update(tiny_qwen3, tmp_path):
    """SGD without clipping or decay: the update's norm is lr x the gradient's norm, so the
    lr each update used is visible; warmup rises to the peak, then it falls linearly to 0."""
    peak, warmup, n = 0.2, 2, 6
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=n, optimizer="sgd", learning_rate=peak,
                   lr_schedule="linear", warmup_steps=warmup, max_grad_norm=0.0)
    hist = steps_of(GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS).train())

    def expected(i):  # lr of update i (0-based)
        if i < warmup:
            return peak / warmup + (peak - peak / warmup) * i / (warmup - 1)
        return peak * (1 - (i - warmup) / (n - warmup))

    used = [h["update_norm"] / h["grad_norm"] if h["grad_norm"] > 0 else None for h in hist]
    assert sum(u is not None for u in used) >= 4
    for i, u in enumerate(used):
        if u is not None:
            assert u == pytest.approx(expected(i), rel=1e-3), (i, used)


# ---------------------------------------------------------------------------------------------
# TensorBoard and W&B


def tfrecords(path):
    """The records of a TFRecord file (TensorBoard's event files)."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        yield data[pos + 12 : pos + 12 + n]
        pos += 12 + n + 4


def tensorboard_scalars(logdir):
    from tensorboardX.proto import event_pb2

    out = {}
    for f in logdir.glob("events.out.tfevents.*"):
        for rec in tfrecords(f):
            ev = event_pb2.Event()
            ev.ParseFromString(rec)
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def wandb_history(run_root):
    """step -> {key: value} from an offline W&B run file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_root.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                out.setdefault(rec.history.step.num, {}).update(items)
    return out


def test_tensorboard_and_wandb_get_the_metrics(tiny_qwen3, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=2, eval_size=4, report_to=["jsonl", "tensorboard", "wandb"])
    GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS).train()
    steps = {x["step"]: x for x in metrics_lines(tmp_path) if "loss" in x}
    tb = tensorboard_scalars(tmp_path / "tensorboard")
    wb = wandb_history(tmp_path)
    for key in ("reward/mean", "loss", "completion/mean_length"):
        for step, m in steps.items():
            assert tb[key][step] == pytest.approx(m[key], rel=1e-5, abs=1e-7), key
            assert wb[step][key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), key
    assert 0 in tb["eval/accuracy"] and 0 in wb  # the eval before training, at step 0


# ---------------------------------------------------------------------------------------------
# Health alarms from a real run


def test_health_alarms_fire_inside_a_run(tiny_qwen3, tmp_path, capsys):
    """A reward that never varies: every group has zero std (zero_variance after 5 steps) and
    nothing moves (frozen_params after 3)."""
    def constant(prompts, completions, **columns):
        return [0.5] * len(completions)

    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=5, eval_size=4, max_new_tokens=4)
    GRPOTrainer(cfg, reward_funcs=[constant], train_dataset=ROWS).train()
    out = capsys.readouterr().out
    assert "health alarm" in out and "zero_variance" in out and "frozen_params" in out
    steps = {x["step"]: x for x in metrics_lines(tmp_path) if "loss" in x}
    assert steps[5]["health/zero_variance"] == 1.0
    assert steps[3]["health/frozen_params"] == 1.0
    assert steps[1].get("health/frozen_params", 0.0) == 0.0
    assert all(math.isfinite(steps[s]["loss"]) for s in steps)


# ---------------------------------------------------------------------------------------------
# The README's loss families and its Python API example


@pytest.mark.parametrize("options", [
    dict(loss_type="grpo", scale_rewards="group"),
    dict(loss_type="bnpo", scale_rewards="batch"),
    dict(loss_type="dr_grpo", scale_rewards="none"),
    dict(loss_type="dapo", importance_sampling_level="sequence", epsilon_high=0.28),  # GSPO
    dict(loss_type="cispo", epsilon_high=0.5, delta=4.0),
    dict(loss_type="grpo", drop_zero_std_groups=True, mask_truncated_completions=False, top_entropy_quantile=0.5),
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_each_loss_family_trains(tiny_qwen3, tmp_path, options):
    """Two steps with a second pass per batch (so ratios leave 1 and the clipping rules act)."""
    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=2, num_iterations=2, learning_rate=1e-2, eval_size=2,
                   **options)
    t = GRPOTrainer(cfg, reward_funcs=[digit_share], train_dataset=ROWS)
    hist = steps_of(t.train())
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["update_norm"] > 0
    if options.get("top_entropy_quantile"):
        assert 0 < hist[-1]["tokens/in_loss"] < hist[-1]["tokens/completion"]


def test_the_readme_python_api_example(tiny_qwen3, tmp_path):
    """The README's example as written, on the tiny model (and short completions, two steps)."""
    def reward_len(prompts, completions, **columns):
        return [-abs(20 - len(c)) / 20 for c in completions]

    rows = [{"prompt": f"Say hi to {name}"} for name in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")]
    cfg = GRPOConfig(num_steps=2, output_dir=str(tmp_path / "short"), eval_size=2, model=str(tiny_qwen3),
                     max_new_tokens=8)
    res = GRPOTrainer(cfg, reward_funcs=[reward_len], train_dataset=rows).train()
    assert res.steps == 2 and (tmp_path / "short" / "report.html").exists()
    assert "rewards/reward_len/mean" in steps_of(res)[-1]


def test_identical_prompts_get_advice_that_works(tiny_qwen3, tmp_path):
    """32 copies of one prompt cannot be split; the advice (held-out rows of one's own) works."""
    def reward_len(prompts, completions, **columns):
        return [-abs(20 - len(c)) / 20 for c in completions]

    cfg = GRPOConfig(num_steps=1, output_dir=str(tmp_path / "a"), model=str(tiny_qwen3), max_new_tokens=4)
    with pytest.raises(MlxRftError, match="same prompt.*eval_dataset="):
        GRPOTrainer(cfg, reward_funcs=[reward_len], train_dataset=[{"prompt": "Say hi"}] * 32).train()
    cfg = GRPOConfig(num_steps=1, output_dir=str(tmp_path / "b"), model=str(tiny_qwen3), max_new_tokens=4)
    res = GRPOTrainer(cfg, reward_funcs=[reward_len], train_dataset=[{"prompt": "Say hi"}] * 32,
                      eval_dataset=[{"prompt": "Say hi"}]).train()
    assert res.steps == 1
