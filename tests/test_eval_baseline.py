"""A fake gain shows as one: the constant-answer baseline and the count of distinct answers."""

import pytest

from mlx_rft.data import PromptDataset
from mlx_rft.evaluate import constant_answer_baseline, evaluate_prompts, final_answer
from mlx_rft.models import load_model
from mlx_rft.rewards import RewardSet, resolve_reward
from mlx_rft.types import PromptExample, SamplingConfig


def rows(answers):
    return [PromptExample(prompt=f"q{i}", prompt_ids=[1], columns={"answer": a}) for i, a in enumerate(answers)]


def test_the_baseline_is_the_most_common_answers_share():
    acc = RewardSet([resolve_reward("accuracy")], on_error="none")
    examples = rows(["yes"] * 7 + ["no"] * 3)
    assert constant_answer_baseline(acc, examples, []) == pytest.approx(0.7)
    # The model's own answers are candidates too, and a wrong one does not lower the best.
    assert constant_answer_baseline(acc, examples, ["maybe"] * 10) == pytest.approx(0.7)
    # Numbers compare by value: "4.0" answers the rows whose answer is 4.
    assert constant_answer_baseline(acc, rows(["4", "4", "5", "6"]), ["4.0"]) == pytest.approx(0.5)


def test_a_reward_that_ignores_the_answer_has_a_baseline_of_one():
    """A reward a constant output maximises (here: any tagged answer scores 1) is exposed."""
    fmt = RewardSet([resolve_reward("format")])
    assert constant_answer_baseline(fmt, rows(["1", "2", "3"]), []) == 1.0


def test_eval_reports_distinct_answers_and_the_baseline(tiny_qwen3):
    model, tok = load_model(tiny_qwen3)
    data = PromptDataset.from_rows([{"prompt": f"Question {i}", "answer": str(i % 3)} for i in range(9)], tok)
    acc = RewardSet([resolve_reward("accuracy")], on_error="none")
    out = evaluate_prompts(model, tok, list(data), acc, sampling=SamplingConfig(temperature=0.0, max_new_tokens=8))
    # The same greedy completions, counted here by hand.
    from mlx_rft.rollout import generate_rollouts

    texts = generate_rollouts(model, tok, [e.prompt_ids for e in data], 1,
                              SamplingConfig(temperature=0.0, max_new_tokens=8), seed=0).texts
    assert out["eval/distinct_answers"] == len({a for a in map(final_answer, texts) if a is not None})
    assert out["eval/constant_baseline"] == pytest.approx(1 / 3)  # each of 0, 1, 2 answers a third
    # No answer column (e.g. a code task): nothing to compare a constant answer with.
    plain = PromptDataset.from_rows([{"prompt": f"Question {i}"} for i in range(3)], tok)
    out = evaluate_prompts(model, tok, list(plain), RewardSet([resolve_reward("format")]),
                           sampling=SamplingConfig(temperature=0.0, max_new_tokens=4))
    assert "eval/constant_baseline" not in out
