"""RewardSet: weighted NaN-skipping totals, async concurrency, errors naming function and row,
columns by name, rich outputs (details/metrics), and resolve_reward specs."""

import asyncio
import time

import numpy as np
import pytest

from mlx_rft.errors import MlxRftError
from mlx_rft.rewards import RewardOutput, RewardSet, resolve_reward


def fixed(name, values):
    def f(prompts, completions, **columns):
        return list(values)

    f.__name__ = name
    return f


def test_weighted_nansum_matches_float64_reference():
    rng = np.random.default_rng(0)
    n, k = 64, 3
    raw = rng.normal(size=(k, n))
    holes = rng.random((k, n)) < 0.3
    holes[:, :4] = True  # rows 0..3: no function scores them
    weights = np.array([1.0, 0.5, -2.0])
    funcs = [
        fixed(f"r{j}", [None if holes[j, i] else float(raw[j, i]) for i in range(n)]) for j in range(k)
    ]
    result = RewardSet(funcs, weights=list(weights))(["p"] * n, ["c"] * n, {})
    masked = np.where(holes, np.nan, raw)
    expected = np.nansum(weights[:, None] * masked, axis=0)
    expected[np.all(holes, axis=0)] = np.nan
    assert result.total.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(result.total), np.isnan(expected))
    np.testing.assert_allclose(result.total[4:], expected[4:], rtol=0, atol=1e-12)
    for j in range(k):
        np.testing.assert_array_equal(result.per_func[f"r{j}"], masked[j])
        s = result.stats[f"r{j}"]
        assert s["failures"] == holes[j].sum()
        assert s["mean"] == pytest.approx(np.nanmean(masked[j]))
        assert s["std"] == pytest.approx(np.nanstd(masked[j]))
    summary = result.summary()
    assert summary["reward/mean"] == pytest.approx(np.nanmean(expected))
    assert summary["reward/unscored_frac"] == pytest.approx(np.mean(np.all(holes, axis=0)))


def test_nan_counts_as_none_and_default_weights_are_one():
    rs = RewardSet([fixed("a", [1.0, float("nan"), None]), fixed("b", [2.0, 3.0, None])])
    r = rs(["p"] * 3, ["x", "y", "z"])
    assert r.total[0] == 3.0 and r.total[1] == 3.0 and np.isnan(r.total[2])
    assert r.stats["a"]["failures"] == 2


def test_async_rewards_run_concurrently_and_each_function_runs_once():
    calls = {"a": 0, "b": 0, "s": 0}

    async def slow_a(prompts, completions, **kw):
        calls["a"] += 1
        await asyncio.sleep(0.4)
        return [1.0] * len(completions)

    async def slow_b(prompts, completions, **kw):
        calls["b"] += 1
        await asyncio.sleep(0.4)
        return [2.0] * len(completions)

    def sync_s(prompts, completions, **kw):
        calls["s"] += 1
        time.sleep(0.3)  # async rewards progress meanwhile (their sleeps overlap this)
        return [0.5] * len(completions)

    rs = RewardSet([slow_a, slow_b, sync_s])
    t0 = time.perf_counter()
    r = rs(["p"] * 5, ["c"] * 5)
    elapsed = time.perf_counter() - t0
    assert calls == {"a": 1, "b": 1, "s": 1}
    np.testing.assert_allclose(r.total, 3.5)
    # Sequential would take 1.1 s; concurrent about max(0.4, 0.3).
    assert elapsed < 0.8, elapsed
    assert r.stats["slow_a"]["seconds"] >= 0.39


def test_works_when_called_inside_a_running_event_loop():
    async def main():
        return RewardSet([fixed("a", [1.0, 0.0])])(["p", "p"], ["x", "y"])

    r = asyncio.run(main())
    np.testing.assert_array_equal(r.total, [1.0, 0.0])


def test_error_names_function_and_row_and_chains_original():
    def fragile(prompts, completions, **kw):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on the empty completion

    with pytest.raises(MlxRftError, match=r"reward 'fragile' raised ZeroDivisionError.*row 2") as info:
        RewardSet([fragile])(["p"] * 4, ["ab", "a", "", "abcd"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)

    r = RewardSet([fragile, fixed("other", [1, 1, 1, 1])], on_error="none")(["p"] * 4, ["ab", "a", "", "abcd"])
    np.testing.assert_allclose(r.per_func["fragile"], [0.5, 1.0, np.nan, 0.25])
    assert r.stats["fragile"]["errors"] == 1 and r.stats["fragile"]["failures"] == 1
    np.testing.assert_allclose(r.total, [1.5, 2.0, 1.0, 1.25])


def test_async_error_is_reported_too():
    async def broken(prompts, completions, **kw):
        raise RuntimeError("judge exploded")

    with pytest.raises(MlxRftError, match=r"'broken' raised RuntimeError: judge exploded at row 0"):
        RewardSet([broken])(["p"], ["c"])
    r = RewardSet([broken, fixed("ok", [1.0])], on_error="none")(["p"], ["c"])
    assert np.isnan(r.per_func["broken"][0]) and r.total[0] == 1.0 and r.stats["broken"]["errors"] == 1


def test_configuration_errors_always_propagate():
    def needs_setup(prompts, completions, **kw):
        raise MlxRftError("set JUDGE_KEY")

    with pytest.raises(MlxRftError, match="set JUDGE_KEY"):
        RewardSet([needs_setup], on_error="none")(["p"], ["c"])


@pytest.mark.parametrize(
    "values, pattern",
    [
        ([1.0, 2.0], r"returned 2 scores for 3 completions"),
        ([1.0, "high", 0.0], r"row 1 is 'high'"),
        ([1.0, float("inf"), 0.0], r"row 1 is inf"),
        (0.5, r"returned float"),
        ({"value": [1, 2, 3]}, r"without a 'score' key"),
    ],
)
def test_bad_return_values_are_clear_errors(values, pattern):
    with pytest.raises(MlxRftError, match=pattern):
        RewardSet([fixed("bad", values) if not isinstance(values, (float, dict)) else (lambda p, c, **k: values)])(
            ["p"] * 3, ["a", "b", "c"]
        )


def test_columns_passed_by_name_and_checked():
    seen = {}

    def wants_answer(prompts, completions, answer):
        seen["answer"] = answer
        return [float(c == a) for c, a in zip(completions, answer)]

    def takes_all(prompts, completions, **columns):
        seen["all"] = sorted(columns)
        return [0.0] * len(completions)

    rs = RewardSet([wants_answer, takes_all])
    r = rs(["p", "p"], ["4", "5"], {"answer": ["4", "4"], "level": [1, 1]})
    assert seen == {"answer": ["4", "4"], "all": ["answer", "level"]}
    np.testing.assert_array_equal(r.per_func["wants_answer"], [1.0, 0.0])

    with pytest.raises(MlxRftError, match=r"needs dataset column\(s\) 'answer'.*level"):
        rs(["p"], ["4"], {"level": [1]})
    with pytest.raises(MlxRftError, match=r"column 'answer' has 1 values for 2 completions"):
        rs(["p", "p"], ["4", "5"], {"answer": ["4"]})
    with pytest.raises(MlxRftError, match=r"must accept \(prompts, completions"):
        RewardSet([lambda texts: [0.0]])


def test_trl_style_keyword_functions():
    def trl_style(completions, **kwargs):  # TRL passes everything by keyword
        return [float(len(c) == len(kwargs["prompts"][0])) for c in completions]

    def no_prompts(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    r = RewardSet([trl_style, no_prompts])(["abc", "abc"], ["xyz", "4"], {"answer": ["xyz", "5"]})
    np.testing.assert_array_equal(r.per_func["trl_style"], [1.0, 0.0])
    np.testing.assert_array_equal(r.per_func["no_prompts"], [1.0, 0.0])


def test_rich_outputs_reach_details_metrics_and_judge_summary():
    async def judge(prompts, completions, **kw):
        return RewardOutput(
            scores=[0.2, None, 0.8],
            details={"clarity": [0.0, None, 1.0]},
            metrics={"parse_failures": 1.0},
        )

    judge.is_judge = True

    def as_mapping(prompts, completions, **kw):
        return {"score": [1, 0, 1], "exact": [1, 0, 1]}

    r = RewardSet([judge, as_mapping], weights=[2.0, 1.0])(["p"] * 3, ["a", "b", "c"])
    np.testing.assert_allclose(r.total, [1.4, 0.0, 2.6])
    np.testing.assert_array_equal(r.details["judge/clarity"], [0.0, np.nan, 1.0])
    assert r.metrics["judge/parse_failures"] == 1.0
    s = r.summary()
    assert s["judge/mean"] == pytest.approx(0.5) and s["judge/std"] == pytest.approx(0.3)
    assert s["judge/failures"] == 1.0
    assert s["rewards/judge/clarity/mean"] == pytest.approx(0.5)
    assert s["rewards/as_mapping/exact/mean"] == pytest.approx(2 / 3)


def test_duplicate_names_and_weight_validation():
    f = fixed("acc", [1.0])
    rs = RewardSet([f, f], weights=[1.0, 0.5])
    assert rs.names == ["acc", "acc_2"]
    assert rs(["p"], ["c"]).total[0] == 1.5
    with pytest.raises(MlxRftError, match="2 reward weights for 1 reward functions"):
        RewardSet([f], weights=[1.0, 2.0])
    with pytest.raises(MlxRftError, match="on_error"):
        RewardSet([f], on_error="ignore")


def test_resolve_builtins_with_arguments_and_unknown_names():
    acc = resolve_reward("accuracy")
    assert acc.__name__ == "accuracy"
    text = "<answer>3</answer> so \\boxed{4}"
    assert acc(["p"], [text], answer=["3"]) == [1.0]  # auto: the tag comes first
    boxed = resolve_reward("accuracy(extract=boxed)")
    assert boxed(["p"], [text], answer=["3"]) == [0.0]
    assert boxed(["p"], [text], answer=["4"]) == [1.0]
    over = resolve_reward("overlong(max_length=10, cache_length=4, unit='chars')")
    assert over(["p"] * 3, ["x" * 6, "x" * 8, "x" * 11]) == [0.0, -0.5, -1.0]
    with pytest.raises(MlxRftError, match=r"unknown reward 'acuracy'.*accuracy.*code.*format"):
        resolve_reward("acuracy")
    with pytest.raises(MlxRftError, match="bad arguments"):
        resolve_reward("length(nonsense=1)")
    with pytest.raises(MlxRftError, match="by name"):
        resolve_reward("length(3)")


def test_resolve_user_module_and_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def shout(prompts, completions, **kw):\n    return [float(c.isupper()) for c in completions]\n")
    func = resolve_reward(f"{f}:shout")
    r = RewardSet([func, "mlx_rft.rewards.verifiers:format_reward"])(["p", "p"], ["<ANSWER>", "<answer>1</answer>"])
    assert list(r.per_func["shout"]) == [1.0, 0.0]
    assert list(r.per_func["format"]) == [0.0, 1.0]
    with pytest.raises(MlxRftError, match="has no attribute 'nope'"):
        resolve_reward(f"{f}:nope")
    with pytest.raises(MlxRftError, match="does not exist"):
        resolve_reward(f"{tmp_path}/missing.py:fn")
    with pytest.raises(MlxRftError, match="cannot import module"):
        resolve_reward("no_such_module_xyz:fn")
