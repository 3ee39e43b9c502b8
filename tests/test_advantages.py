"""Group advantages: hand examples, TRL's formula, missing rewards, zero-variance groups, errors."""

import mlx_rft  # noqa: F401

import math

import numpy as np
import pytest

from mlx_rft.algo.advantages import RewardMoments, group_advantages
from mlx_rft.errors import MlxRftError


def trl_reference(rewards, g, scale, eps=1e-4):
    """TRL GRPOTrainer (sum_then_normalize) in float64 NumPy: nanmean, Bessel nanstd, nan -> 0."""
    r = np.asarray(rewards, dtype=np.float64)
    grouped = r.reshape(-1, g)
    mean = np.repeat(np.nanmean(grouped, axis=1), g)
    if scale == "batch":
        std = np.full_like(r, np.nanstd(r, ddof=1))
    else:
        std = np.repeat(np.nanstd(grouped, axis=1, ddof=1), g)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + eps)
    return np.nan_to_num(adv, nan=0.0)


def test_hand_example_group_scale():
    # Group 1: rewards 0, 1, 2, 3 -> mean 1.5, unbiased var = (2.25+0.25+0.25+2.25)/3 = 5/3.
    # Group 2: rewards 1, 1, 1, 1 -> zero variance, advantages 0.
    res = group_advantages([0, 1, 2, 3, 1, 1, 1, 1], group_size=4)
    std = math.sqrt(5 / 3)
    expected = np.array([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4)
    np.testing.assert_allclose(res.advantages[:4], expected, rtol=1e-6)
    np.testing.assert_array_equal(res.advantages[4:], 0.0)
    np.testing.assert_allclose(res.group_mean, [1.5, 1.0])
    np.testing.assert_allclose(res.group_std, [std, 0.0])
    assert res.num_zero_std_groups == 1
    np.testing.assert_array_equal(res.zero_std_mask, [False] * 4 + [True] * 4)
    assert res.advantages.dtype == np.float32


def test_hand_example_none_and_batch_scale():
    # Groups [1, 3] and [0, 0]: means 2 and 0; batch rewards 1, 3, 0, 0 -> mean 1,
    # unbiased var = (0 + 4 + 1 + 1) / 3 = 2.
    none = group_advantages([1, 3, 0, 0], 2, scale="none")
    np.testing.assert_allclose(none.advantages, [-1, 1, 0, 0])
    batch = group_advantages([1, 3, 0, 0], 2, scale="batch")
    np.testing.assert_allclose(batch.advantages, np.array([-1, 1, 0, 0]) / (math.sqrt(2) + 1e-4), rtol=1e-6)
    assert batch.batch_mean == pytest.approx(1.0)
    assert batch.batch_std == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_trl_formula_random(scale):
    rng = np.random.default_rng(0)
    g = 8
    rewards = rng.normal(size=6 * g) * 3 + 1
    rewards[rng.random(rewards.size) < 0.15] = np.nan
    res = group_advantages(rewards, g, scale=scale)
    np.testing.assert_allclose(res.advantages, trl_reference(rewards, g, scale), rtol=1e-6, atol=1e-7)


def test_missing_rewards_drop_out():
    # None in group 1: statistics over [1, 2, 4] only; the None row gets 0.
    res = group_advantages([1.0, None, 2.0, 4.0, 5.0, float("nan"), 5.0, 7.0], 4)
    mean, std = np.mean([1, 2, 4]), np.std([1, 2, 4], ddof=1)
    np.testing.assert_allclose(res.advantages[[0, 2, 3]], (np.array([1, 2, 4]) - mean) / (std + 1e-4), rtol=1e-6)
    assert res.advantages[1] == 0.0 and res.advantages[5] == 0.0
    np.testing.assert_array_equal(res.valid_mask, [1, 0, 1, 1, 1, 0, 1, 1])
    assert res.group_mean[0] == pytest.approx(mean)
    assert res.group_mean[1] == pytest.approx(17 / 3)


def test_groups_with_fewer_than_two_rewards_are_zero_variance():
    res = group_advantages([None, None, 3.0, None, 1.0, 2.0], 2)
    np.testing.assert_array_equal(res.advantages[:4], 0.0)
    assert res.num_zero_std_groups == 2
    assert math.isnan(res.group_mean[0]) and res.group_mean[1] == 3.0
    np.testing.assert_array_equal(res.group_std[:2], [0.0, 0.0])
    assert res.advantages[4] < 0 < res.advantages[5]


def test_all_equal_groups_and_row_mask():
    res = group_advantages([0.5, 0.5, 0.5, 1.0, 0.0, 1.0], 3)
    np.testing.assert_array_equal(res.advantages[:3], 0.0)
    np.testing.assert_array_equal(res.row_mask(drop_zero_std=True), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(res.row_mask(), [1] * 6)
    # Rounding noise (0.1 + 0.2 != 0.3) still counts as equal, and its advantages are exactly 0.
    noisy = group_advantages([0.1 + 0.2, 0.3, 0.3, 0.3], 4)
    assert noisy.num_zero_std_groups == 1
    np.testing.assert_array_equal(noisy.advantages, 0.0)


def test_batch_stats_from_all_reduced_moments():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=24)
    rewards[3] = np.nan
    local = [rewards[:8], rewards[8:16], rewards[16:]]  # three "processes", whole groups each
    total = sum((RewardMoments.of(part) for part in local), RewardMoments(0, 0, 0))
    summed = RewardMoments.from_array(sum(RewardMoments.of(p).as_array() for p in local))
    assert summed == total
    mean, std = total.mean_std()
    assert mean == pytest.approx(np.nanmean(rewards))
    assert std == pytest.approx(np.nanstd(rewards, ddof=1))
    full = group_advantages(rewards, 4, scale="batch")
    parts = [group_advantages(p, 4, scale="batch", batch_stats=(mean, std)) for p in local]
    np.testing.assert_allclose(np.concatenate([p.advantages for p in parts]), full.advantages, rtol=1e-6)
    assert parts[0].batch_std == pytest.approx(std)


def test_errors_name_the_fix():
    with pytest.raises(MlxRftError, match="group_size must be an integer >= 2"):
        group_advantages([1.0, 2.0], 1)
    with pytest.raises(MlxRftError, match="not a whole number of groups"):
        group_advantages([1.0, 2.0, 3.0], 2)
    with pytest.raises(MlxRftError, match="unknown advantage scale"):
        group_advantages([1.0, 2.0], 2, scale="global")
    with pytest.raises(MlxRftError, match="finite"):
        group_advantages([1.0, float("inf")], 2)
    with pytest.raises(MlxRftError, match="numbers or None"):
        group_advantages([1.0, "good"], 2)
    with pytest.raises(MlxRftError, match=r"shape \[N\]"):
        group_advantages(np.ones((2, 2)), 2)
