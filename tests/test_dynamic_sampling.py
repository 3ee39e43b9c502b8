"""DAPO dynamic sampling (refill rounds, kept groups, exact normalisers, resume) and the stop after
steps with nothing to learn; the records' select/concat helpers it is built from."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_rft import GRPOTrainer
from mlx_rft.data import PromptSampler
from mlx_rft.rewards.base import RewardResult
from mlx_rft.train.dynamic_sampling import choose_groups, informative_groups, local_groups, sampling_metrics
from mlx_rft.train.step import grpo_loss
from mlx_rft.types import RolloutBatch

from test_trainer import ROWS, check_resume_is_exact, half_constant, make_cfg


# ---------------------------------------------------------------------------------------------
# The pure decisions


def test_informative_groups_use_the_advantages_zero_std_rule():
    total = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0.5, float("nan"), 0.5, 0.5, 2, float("nan"), 3, 3])
    # equal | mixed | equal with a NaN (only scored rows count) | mixed with a NaN
    assert informative_groups(total, 4).tolist() == [False, True, False, True]


def test_choose_groups_prefers_informative_then_fills_in_draw_order():
    assert choose_groups(np.array([False, True, False, True, True]), 2) == [1, 3]
    assert choose_groups(np.array([False, True, False, False]), 3) == [0, 1, 2]
    assert choose_groups(np.array([False, False]), 2) == [0, 1]


def test_local_groups_and_metrics():
    # 2 ranks, 4 prompts a round: rank 0 drew global 0, 1 (round 0) and 4, 5 (round 1)
    chosen = [1, 2, 4, 7]
    assert local_groups(chosen, 4, 2, 0) == [1, 2] and local_groups(chosen, 4, 2, 1) == [0, 3]
    assert local_groups(chosen, 4, 1, 0) == chosen
    m = sampling_metrics(np.array([True, False, False, True, True, False, False, False]), 4)
    assert m == {"sampling/rounds": 2.0, "sampling/prompts": 8.0, "sampling/informative_groups": 3.0,
                 "sampling/kept_groups": 3.0, "frac_zero_std_groups": 0.625}


def test_sampler_take_continues_the_same_order():
    a, b = PromptSampler(10, 4, seed=1), PromptSampler(10, 4, seed=1)
    drawn = next(a) + a.take(2) + next(a)
    assert drawn == b.next_global(10)
    assert a.state_dict()["steps"] == 2  # refills are not steps
    r0, r1 = (PromptSampler(10, 4, seed=1, rank=r, world_size=2) for r in (0, 1))
    assert r0.take(4) + r1.take(4) == PromptSampler(10, 4, seed=1).next_global(4)[:2] + \
        PromptSampler(10, 4, seed=1).next_global(4)[2:]


def _rollouts(lengths, G, offset=0):
    n, t = len(lengths), max(lengths)
    mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.float32)
    ids = (np.arange(n * t).reshape(n, t) + offset) * mask
    return RolloutBatch(
        prompt_ids=[[offset + b] for b in range(n // G)], completion_ids=mx.array(ids.astype(np.int32)),
        completion_mask=mx.array(mask), logprobs=mx.array(-mask), truncated_logprobs=None,
        texts=[f"{offset}-{i}" for i in range(n)], finish_reasons=["stop"] * n,
        group_index=[i // G for i in range(n)], group_size=G,
    )


def test_rollout_concat_pads_and_select_keeps_whole_groups():
    a, b = _rollouts([2, 1, 3, 3], 2), _rollouts([5, 4], 2, offset=100)
    both = RolloutBatch.concat([a, b])
    assert both.completion_ids.shape == (6, 5) and both.prompt_ids == [[0], [1], [100]]
    np.testing.assert_array_equal(np.array(both.completion_mask).sum(1), [2, 1, 3, 3, 5, 4])
    np.testing.assert_array_equal(np.array(both.completion_ids)[4], np.array(b.completion_ids)[0])
    picked = both.select_groups([2, 0])
    assert picked.texts == ["100-0", "100-1", "0-0", "0-1"] and picked.prompt_ids == [[100], [0]]
    assert picked.group_index == [0, 0, 1, 1]
    np.testing.assert_array_equal(np.array(picked.logprobs)[2], np.array(a.logprobs)[0].tolist() + [0, 0])


def _result(total, seconds):
    total = np.asarray(total, dtype=np.float64)
    return RewardResult(
        total=total, per_func={"f": total.copy()}, details={}, weights={"f": 1.0},
        stats={"f": {"mean": 0.0, "std": 0.0, "failures": 0.0, "errors": 0.0, "timeouts": 0.0,
                     "seconds": seconds}},
        metrics={"f/calls": 1.0},
    )


def test_reward_concat_and_select_recompute_row_statistics():
    both = RewardResult.concat([_result([0.0, 1.0], 0.5), _result([float("nan"), 3.0], 0.25)])
    s = both.stats["f"]
    assert s["mean"] == pytest.approx(4 / 3) and s["failures"] == 1.0 and s["seconds"] == 0.75
    assert both.metrics == {"f/calls": 2.0}
    sub = both.select([3, 1])
    assert sub.total.tolist() == [3.0, 1.0] and sub.stats["f"]["mean"] == 2.0
    assert sub.stats["f"]["std"] == 1.0 and sub.stats["f"]["failures"] == 0.0


# ---------------------------------------------------------------------------------------------
# In the trainer


def rollout_groups(run_dir, G):
    rows = [json.loads(x) for x in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    return {s: [rs[i : i + G] for i in range(0, len(rs), G)] for s, rs in by_step.items()}


def test_dynamic_sampling_trains_on_informative_groups_with_their_normalisers(tiny_qwen3, tmp_path):
    """Odd-numbered questions get a constant reward: their groups are filtered out, refills find
    even ones, and the loss sees only the kept groups' tokens."""
    seen = []
    plain = None

    def loss(model, batch, totals):
        seen.append((totals, float(batch.mask.sum().item()), batch.num_rows))
        return plain(model, batch, totals)

    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=3, dynamic_sampling=True, max_sampling_rounds=4,
                   sample_every=1)
    plain = grpo_loss(cfg.validate())
    res = GRPOTrainer(cfg, reward_funcs=[half_constant], train_dataset=ROWS, loss=loss).train()
    steps = [h for h in res.history if "loss" in h]
    G, B = cfg.group_size, cfg.prompts_per_step
    assert any(h["sampling/rounds"] >= 2 for h in steps)  # half the draws are constant
    for h in steps:
        assert h["sampling/prompts"] == B * h["sampling/rounds"]  # each refill is B prompts
        assert h["sampling/kept_groups"] == B
        assert h["frac_zero_std_groups"] == pytest.approx(1 - h["sampling/informative_groups"] / h["sampling/prompts"])
    for step, groups in rollout_groups(tmp_path, G).items():
        assert len(groups) == B
        for g in groups:
            assert int(g[0]["prompt"].split("Question ")[1].split(":")[0]) % 2 == 0
            assert len({r["reward"] for r in g}) > 1  # every kept group is informative
    # One micro-batch per step: the normaliser is that batch's own token count (the kept rows').
    for totals, tokens, rows in seen:
        assert rows == B * G and totals["num_sequences"] == B * G
        assert totals["global_token_count"] == tokens
    # The reward curve describes every drawn completion, filtered ones included.
    first = steps[0]
    assert first["reward/mean"] != pytest.approx(first["rewards/half_constant/mean"])


def test_dynamic_sampling_resumes_exactly(tiny_qwen3, tmp_path):
    check_resume_is_exact(tiny_qwen3, tmp_path, half_constant, ("sampling/prompts", "loss", "reward/mean"),
                          dynamic_sampling=True)


def test_a_run_with_nothing_to_learn_ends_early_with_a_clear_reason(tiny_qwen3, tmp_path):
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=10, max_uninformative_steps=3, eval_size=4)
    res = GRPOTrainer(cfg, reward_funcs=[constant], train_dataset=ROWS).train()
    assert res.steps == 3 and res.exit_code == 3 and not res.interrupted
    assert "steps 1-3" in res.stop_reason and "same reward" in res.stop_reason
    assert "--learning-rate" in res.stop_reason and "max_uninformative_steps 0" in res.stop_reason
    # Nothing is lost: a checkpoint at the last step, the after-training eval and the report.
    assert (tmp_path / "checkpoints" / "step-0000003").is_dir()
    assert "eval/accuracy" in res.eval_after and (tmp_path / "report.html").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stop_reason"] == res.stop_reason
    assert "ended early" in (tmp_path / "report.html").read_text()
    # 0 turns the stop off; an informative step resets the count (a varying reward never stops).
    cfg = make_cfg(tiny_qwen3, tmp_path / "off", num_steps=4, max_uninformative_steps=0, eval_size=4)
    assert GRPOTrainer(cfg, reward_funcs=[constant], train_dataset=ROWS).train().steps == 4


def test_entropy_metrics_and_bonus_in_a_run(tiny_qwen3, tmp_path):
    """entropy/sampled (from the behaviour log-probs) is logged every step; the entropy bonus
    trains zero-advantage groups too (its gradient is not zero there)."""
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    cfg = make_cfg(tiny_qwen3, tmp_path, num_steps=1, entropy_coef=0.01, optimizer="sgd",
                   learning_rate=0.5, eval_size=4)
    t = GRPOTrainer(cfg, reward_funcs=[constant], train_dataset=ROWS)
    step = [h for h in t.train().history if "loss" in h][0]
    assert step["entropy/sampled"] > 0 and math.isfinite(step["entropy"])
    assert step["update/rows"] == 16 and step["grad_norm"] > 0  # no signal from rewards, still a gradient
    assert 1 <= step["completion/distinct_per_group"] <= 4


def test_a_process_that_kept_no_group_gives_an_empty_but_valid_step(tiny_qwen3, tmp_path):
    """With several processes the kept groups can all sit on other ranks: this rank's trajectory
    is empty, its batches are none, and its metrics are NaN rather than an exception."""
    from mlx_rft.algo.advantages import group_advantages
    from mlx_rft.train.step import Trajectory, UpdateStats, step_metrics, train_batches

    cfg = make_cfg(tiny_qwen3, tmp_path, dynamic_sampling=True).validate()
    empty = _rollouts([1, 1], 2).select_groups([])
    rewards = _result([0.0, 1.0], 0.1).select([])
    adv = group_advantages(rewards.total, 2)
    traj = Trajectory(examples=[], rollouts=empty, rewards=rewards, advantages=adv,
                      row_keep=np.zeros(0, dtype=np.float32), loss_mask=empty.completion_mask,
                      drawn_rewards=np.array([0.0, 1.0]), sampling={"sampling/kept_groups": 4.0})
    batches, rows = train_batches(traj, cfg)
    assert batches == [] and rows.size == 0
    m = step_metrics(traj, rows, UpdateStats(0.0, 0.0, 0.0), cfg, update_seconds=0.0,
                     step_seconds=1.0, lr=1e-3)
    assert math.isnan(m["completion/mean_length"]) and math.isnan(m["entropy/sampled"])
    assert m["reward/mean"] == 0.5 and m["sampling/kept_groups"] == 4.0
