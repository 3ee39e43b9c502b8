"""The step's pure stages (train/step.py) on hand-made records, and the loss/batching seams."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_rft import GRPOConfig, GRPOTrainer
from mlx_rft.algo.advantages import group_advantages
from mlx_rft.rewards import RewardSet
from mlx_rft.train.step import (
    Trajectory, combine_loss_stats, grpo_loss, live_rows, micro_slices, row_keep, train_batches,
)
from mlx_rft.types import PromptExample, RolloutBatch


@pytest.mark.parametrize("n, g, m, expected", [
    (8, 2, 2, [(0, 4), (4, 8)]),  # whole groups
    (8, 2, 3, [(0, 2), (2, 4), (4, 8)]),  # 4 groups in 3 slices, still on group boundaries
    (4, 4, 2, [(0, 2), (2, 4)]),  # fewer groups than slices: rows split inside the group
    (0, 2, 2, []),
])
def test_micro_slices(n, g, m, expected):
    assert [(s.start, s.stop) for s in micro_slices(n, g, m)] == expected


def trajectory(rewards, finish, g=2, t=3):
    n = len(rewards)
    adv = group_advantages(np.array(rewards, dtype=np.float64), g)
    rollouts = RolloutBatch(
        prompt_ids=[[1, 2 + b] for b in range(n // g)],
        completion_ids=mx.arange(n * t).reshape(n, t),
        completion_mask=mx.ones((n, t)),
        logprobs=mx.full((n, t), -1.0),
        truncated_logprobs=None,
        texts=["x"] * n, finish_reasons=finish, group_index=[i // g for i in range(n)], group_size=g,
    )
    examples = [PromptExample(prompt=f"p{b}", prompt_ids=[1, 2 + b], columns={}) for b in range(n // g)]
    scored = RewardSet([lambda p, c: list(rewards)])(["p"] * n, ["x"] * n)
    return rollouts, examples, adv, scored


def make_traj(cfg, rewards, finish):
    rollouts, examples, adv, scored = trajectory(rewards, finish)
    keep = row_keep(adv, rollouts, cfg)
    return Trajectory(examples, rollouts, scored, adv, keep, rollouts.completion_mask * mx.array(keep)[:, None])


def test_rows_that_cannot_move_the_gradient_stay_out():
    cfg = GRPOConfig(group_size=2, prompts_per_step=3, mask_truncated_completions=True)
    # group 0 has variance, group 1 none (advantage 0), group 2 varies but both rows are truncated
    traj = make_traj(cfg, [1.0, 0.0, 0.5, 0.5, 1.0, 0.0], ["stop", "stop", "stop", "stop", "length", "length"])
    assert traj.row_keep.tolist() == [1, 1, 1, 1, 0, 0]
    assert live_rows(traj, cfg).tolist() == [0, 1]
    # With a KL term every kept row counts, advantage 0 or not.
    kl = GRPOConfig(group_size=2, prompts_per_step=3, mask_truncated_completions=True, beta=0.1)
    assert live_rows(make_traj(kl, [1.0, 0.0, 0.5, 0.5, 1.0, 0.0], ["stop"] * 4 + ["length"] * 2), kl).tolist() == [0, 1, 2, 3]


def test_train_batches_slice_every_record_alike():
    cfg = GRPOConfig(group_size=2, prompts_per_step=3, gradient_accumulation_steps=2, beta=0.1)
    traj = make_traj(cfg, [1.0, 0.0, 0.0, 1.0, 0.3, 0.1], ["stop"] * 6)
    traj.ref_logprobs = mx.full((6, 3), -2.0)
    batches, rows = train_batches(traj, cfg)
    assert rows.tolist() == list(range(6))
    assert [b.num_rows for b in batches] == [2, 4] and [b.group_size for b in batches] == [2, 2]
    assert batches[1].prompts == [[1, 3], [1, 4]]  # one prompt per group
    np.testing.assert_array_equal(np.array(batches[1].completion_ids), np.arange(6, 18).reshape(4, 3))
    np.testing.assert_allclose(
        np.concatenate([np.array(b.advantages) for b in batches]), traj.advantages.advantages
    )
    assert all(b.ref_logprobs.shape == b.mask.shape for b in batches)


def test_combine_loss_stats_sums_counts_and_weights_the_rest():
    out = combine_loss_stats([({"num_tokens": 3.0, "clip_region": 0.5}, 3.0),
                              ({"num_tokens": 1.0, "clip_region": 1.0}, 1.0)])
    assert out == {"tokens/completion": 4.0, "clip/region_frac": pytest.approx(0.625)}


def test_a_custom_loss_and_batching_replace_only_their_stage(tiny_qwen3, tmp_path):
    """The seams: a loss that wraps the configured one and a batching that keeps every row are
    used by the step (the update sees every row), and training still works."""
    rows = [{"prompt": f"Question {i}: say something"} for i in range(40)]

    def digits(prompts, completions, **kw):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    cfg = GRPOConfig(model=str(tiny_qwen3), output_dir=str(tmp_path), num_steps=2, group_size=2,
                     prompts_per_step=2, max_new_tokens=6, eval_size=4, lora_rank=4)
    inner, seen = grpo_loss(cfg), []

    def loss(model, batch, totals):
        seen.append(batch.num_rows)
        return inner(model, batch, totals)

    def every_row(traj, cfg):
        batches, _ = train_batches(traj, cfg.__class__(**{**cfg.to_dict(), "skip_zero_advantage": False}))
        return batches, np.arange(traj.rollouts.num_rows)

    res = GRPOTrainer(cfg, reward_funcs=[digits], train_dataset=rows, loss=loss, batches=every_row).train()
    assert res.steps == 2 and seen == [4, 4]
    assert [h["update/rows"] for h in res.history if "loss" in h] == [4, 4]
