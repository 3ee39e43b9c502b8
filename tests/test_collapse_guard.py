"""The collapse guard: when every group's completions got equal rewards for guard_patience steps
while prompts scored differently (each prompt answered one fixed way), it restores the weights and
optimizer state of the last healthy step, lowers the learning rate and continues; after
guard_max_rollbacks rollbacks it ends the run with those weights. Resume stays exact."""

import json

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rft import GRPOConfig, GRPOTrainer
from mlx_rft.errors import MlxRftError
from mlx_rft.train.collapse_guard import CollapseGuard

from test_trainer import ROWS, digit_share, make_cfg

# The steps in which the reward looks like a collapsed policy's: each group's completions all get
# one reward, and the first prompt of the step scores 1 while the others score 0.
PHASE = {"step": 0, "stuck": set()}


def phase_reward(prompts, completions, **columns):
    if PHASE["step"] in PHASE["stuck"]:
        return [1.0 if p == prompts[0] else 0.0 for p in prompts]
    return digit_share(prompts, completions)


class Recording(GRPOTrainer):
    """Tells phase_reward the step, and keeps a copy of the trainable weights and the optimizer's
    moments after each step (taken once the guard has acted)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.weights: dict[int, dict[str, np.ndarray]] = {}
        self.moments: dict[int, dict[str, np.ndarray]] = {}

    def train_step(self, step, *args, **kw):
        PHASE["step"] = step
        return super().train_step(step, *args, **kw)

    def _report(self, step, *args, **kw):
        self.weights[step] = {k: np.array(v) for k, v in tree_flatten(self.model.trainable_parameters())}
        self.moments[step] = {k: np.array(v) for k, v in tree_flatten(self.optimizer.state)
                              if k.endswith((".m", ".v"))}
        return super()._report(step, *args, **kw)


def run(model_dir, out, stuck=(), **kw):
    PHASE.update(step=0, stuck=set(stuck))
    cfg = make_cfg(model_dir, out, eval_size=4, **kw)
    t = Recording(cfg, reward_funcs=[phase_reward], train_dataset=ROWS)
    return t, t.train()


def steps_of(res):
    return [h for h in res.history if "loss" in h]


def assert_same(a: dict, b: dict):
    assert set(a) == set(b) and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_guard_rolls_back_to_the_last_healthy_step_and_lowers_the_lr(tiny_qwen3, tmp_path):
    t, res = run(tiny_qwen3, tmp_path, stuck=(3, 4, 5), num_steps=6, guard_patience=3)
    steps = steps_of(res)
    assert [s["frac_zero_std_groups"] for s in steps[2:5]] == [1.0, 1.0, 1.0]
    # Step 5 ended the third stuck step: the weights are step 2's again, bit for bit.
    assert_same(t.weights[5], t.weights[2])
    assert not all(np.array_equal(t.weights[4][k], t.weights[2][k]) for k in t.weights[2])
    # AdamW's second moments are step 2's; its momentum (pointing into the collapse) is zero.
    second = {k: v for k, v in t.moments[5].items() if k.endswith(".v")}
    assert_same(second, {k: v for k, v in t.moments[2].items() if k.endswith(".v")})
    momentum = [v for k, v in t.moments[5].items() if k.endswith(".m")]
    assert momentum and not any(v.any() for v in momentum) and any(v.any() for v in t.moments[2].values())
    assert [s["guard/rollbacks"] for s in steps] == [0, 0, 0, 0, 1, 1]
    assert [s["guard/lr_scale"] for s in steps] == [1, 1, 1, 1, 0.5, 0.5]
    assert steps[5]["lr"] == pytest.approx(0.5 * steps[0]["lr"], rel=1e-6)  # the update after it
    assert res.exit_code == 0 and res.steps == 6
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["collapse_guard"]["rollbacks"] == 1 and summary["collapse_guard"]["lr_scale"] == 0.5
    event = summary["collapse_guard"]["events"][0]
    assert event["step"] == 5 and event["restored_step"] == 2 and "steps 3-5" in event["message"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["guard/rollbacks"] for x in lines if "loss" in x] == [0, 0, 0, 0, 1, 1]


def test_the_guard_never_fires_on_a_healthy_run_and_changes_nothing(tiny_qwen3, tmp_path):
    on, res_on = run(tiny_qwen3, tmp_path / "on", num_steps=4)
    off, res_off = run(tiny_qwen3, tmp_path / "off", num_steps=4, collapse_guard=False)
    assert_same(on.weights[4], off.weights[4])
    a, b = steps_of(res_on), steps_of(res_off)
    assert all(s["guard/rollbacks"] == 0 for s in a) and "guard/rollbacks" not in b[0]
    for k in ("loss", "reward/mean", "grad_norm", "update_norm", "lr"):
        assert [s[k] for s in a] == [s[k] for s in b], k


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-streak (snapshot from step 2) / after the rollback
def test_resume_around_a_rollback_is_exact(tiny_qwen3, tmp_path, stop_at):
    kw = dict(stuck=(3, 4, 5), guard_patience=3, save_every=2)
    full, full_res = run(tiny_qwen3, tmp_path / "a", num_steps=8, **kw)
    run(tiny_qwen3, tmp_path / "b", num_steps=stop_at, **kw)
    resumed, resumed_res = run(tiny_qwen3, tmp_path / "b", num_steps=8, resume="latest", **kw)
    assert_same(full.weights[8], resumed.weights[8])
    a, b = steps_of(full_res), steps_of(resumed_res)
    for k in ("loss", "reward/mean", "lr", "guard/rollbacks", "guard/lr_scale"):
        assert [s[k] for s in a] == pytest.approx([s[k] for s in b], abs=1e-7), k
    assert a[4]["guard/rollbacks"] == 1
    # The guard's settings change what the run trains, so a resume must keep them.
    with pytest.raises(MlxRftError, match="guard_lr_factor"):
        run(tiny_qwen3, tmp_path / "b", num_steps=10, resume="latest", guard_lr_factor=0.25, **kw)


def test_after_its_last_rollback_the_guard_ends_the_run_with_the_healthy_weights(tiny_qwen3, tmp_path):
    t, res = run(tiny_qwen3, tmp_path, stuck=range(3, 20), num_steps=20, guard_patience=2,
                 guard_max_rollbacks=1)
    # Rollback at step 4 (steps 3-4 stuck), stuck again at 5-6: the run ends at step 6.
    assert res.steps == 6 and res.exit_code == 3
    assert "collapse guard" in res.stop_reason and "rolled back 1" in res.stop_reason
    assert "--learning-rate" in res.stop_reason
    assert_same(t.weights[4], t.weights[2])
    # The final checkpoint holds the last healthy weights (step 2's), not the collapsed ones.
    final = _load(tmp_path / "checkpoints" / "step-0000006" / "adapters.safetensors")
    assert_same(final, t.weights[2])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == res.stop_reason and summary["collapse_guard"]["rollbacks"] == 1


def _load(path):
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_a_streak_where_every_prompt_scores_the_same_stops_as_before(tiny_qwen3, tmp_path):
    """Equal rewards everywhere (a constant reward, or a task out of reach): going back cannot
    help, so the guard leaves it to max_uninformative_steps, whose message is unchanged."""
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=10, max_uninformative_steps=3, eval_size=4)
    res = GRPOTrainer(cfg, reward_funcs=[constant], train_dataset=ROWS).train()
    assert res.steps == 3 and res.exit_code == 3 and "same reward" in res.stop_reason
    assert all(h["guard/rollbacks"] == 0 for h in steps_of(res))


# ---------------------------------------------------------------------------------------------
# The decisions alone, without a model


def decide(guard, step, informative, groups=4, reward_std=0.5):
    return guard.observe(step, informative, groups, {"reward/mean": 0.5, "reward/std": reward_std,
                                                      "completion/distinct_per_group": 1.0})


def test_guard_decisions():
    cfg = GRPOConfig(guard_patience=2, guard_max_rollbacks=1, max_uninformative_steps=5)
    g = CollapseGuard(cfg)
    g.snapshot_step = 0  # as if the starting weights were kept
    assert decide(g, 1, 4).healthy and decide(g, 2, 1).action == "continue"
    assert not decide(g, 3, 0).healthy
    v = decide(g, 4, 0)
    assert v.action == "rollback" and "steps 3-4" in v.message and g.lr_scale == 0.5
    assert decide(g, 5, 0).action == "continue"
    v = decide(g, 6, 0)
    assert v.action == "stop" and "rolled back 1" in v.message
    # A step with less signal than the run's average so far starts a decline: not kept.
    g = CollapseGuard(cfg)
    assert decide(g, 1, 4).healthy and not decide(g, 2, 3).healthy and decide(g, 3, 4).healthy
    # On a task where half the groups carry signal in a good step, such steps are kept.
    g = CollapseGuard(cfg)
    assert decide(g, 1, 2).healthy and decide(g, 2, 2).healthy and not decide(g, 3, 1).healthy
    # Equal rewards in every group and across prompts: not a collapse the guard can undo.
    g = CollapseGuard(cfg)
    g.snapshot_step = 0
    assert [decide(g, s, 0, reward_std=0.0).action for s in range(1, 6)] == ["continue"] * 4 + ["stop"]
    # Off: only the stop, with the old message.
    g = CollapseGuard(GRPOConfig(collapse_guard=False, max_uninformative_steps=2))
    assert [decide(g, s, 0).action for s in (1, 2)] == ["continue", "stop"]
    state = g.state_dict()
    h = CollapseGuard(GRPOConfig(collapse_guard=False, max_uninformative_steps=2))
    h.load_state_dict(json.loads(json.dumps(state)))
    assert h.state_dict() == state


def test_the_guard_is_on_for_adapters_and_off_for_full_fine_tuning_unless_asked():
    assert CollapseGuard(GRPOConfig()).enabled and CollapseGuard(GRPOConfig(finetune_type="dora")).enabled
    assert not CollapseGuard(GRPOConfig(finetune_type="full")).enabled  # a second copy of the model
    assert CollapseGuard(GRPOConfig(finetune_type="full", collapse_guard=True)).enabled
    assert not CollapseGuard(GRPOConfig(collapse_guard=False)).enabled
    GRPOConfig(finetune_type="full", guard_patience=9).validate()  # off: its patience is moot


@pytest.mark.parametrize("kw, words", [
    (dict(guard_patience=0), "guard_patience"),
    (dict(guard_patience=9, max_uninformative_steps=8), "--guard-patience"),
    (dict(guard_lr_factor=0.0), "guard_lr_factor"),
    (dict(guard_lr_factor=1.5), "guard_lr_factor"),
    (dict(guard_max_rollbacks=-1), "guard_max_rollbacks"),
])
def test_guard_settings_are_checked(kw, words):
    with pytest.raises(MlxRftError, match=words):
        GRPOConfig(**kw).validate()
