"""Built-in verifiers: answer extraction and comparison (math-verify), format, length, overlong
(DAPO), repetition; numbers are hand-derived or checked against NumPy references."""

import time

import numpy as np
import pytest

from mlx_rft.errors import MlxRftError
from mlx_rft.rewards import RewardSet, resolve_reward
from mlx_rft.rewards.verifiers import (
    accuracy,
    answers_equal,
    as_number,
    extract_boxed,
    extract_final_answer,
    format_reward,
    make_accuracy,
    make_format,
    make_length_reward,
    make_overlong_penalty,
    make_repetition_penalty,
    repetition_fraction,
    think_format,
)


def test_extraction_variants():
    text = "Think: 2+2=4, then 5. <answer> \\boxed{\\frac{1}{2}} </answer> and later 9"
    assert extract_final_answer(text, "answer_tag") == "\\frac{1}{2}"  # box inside the tag unwrapped
    assert extract_final_answer(text, "boxed") == "\\frac{1}{2}"
    assert extract_final_answer(text, "last_number") == "9"
    assert extract_final_answer(text, "auto") == "\\frac{1}{2}"
    assert extract_boxed("x \\boxed{a{b}c} y \\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert extract_boxed("cut off \\boxed{12") is None
    assert extract_final_answer("costs $1,234.50 total", "last_number") == "1,234.50"
    assert extract_final_answer("first <answer>1</answer> then <answer>2</answer>", "answer_tag") == "2"
    # auto falls through tag -> boxed -> last number -> last line
    assert extract_final_answer("so \\boxed{7}, not 8", "auto") == "7"
    assert extract_final_answer("it is 12 or -3.5", "auto") == "-3.5"
    assert extract_final_answer("The city is\nParis.\n\n", "auto") == "Paris."
    with pytest.raises(MlxRftError, match="unknown answer extraction"):
        extract_final_answer("x", "first_word")


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("42", "42", True),
        ("1,000", "1000", True),
        ("1000.", "1,000", True),
        ("+2.50", "5/2", True),
        ("0.5", "1/2", True),
        ("50%", "50", True),
        ("5 dollars", "5", True),
        ("1,2", "12", False),
        ("41", "42", False),
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("2\\sqrt{2}", "2", False),
        ("x = 4", "4", True),
        ("x = 3", "4", False),
        ("(1, 2)", "(1,2)", True),
        ("(2, 1)", "(1,2)", False),
        ("x^2 + 2x + 1", "(x+1)^2", True),
        ("Paris", "paris", True),
        ("**Paris**.", "Paris", True),
        ("\\text{Paris}", "Paris", True),
        ("Pariss", "Paris", False),
        ("Lyon", "Paris", False),
        (None, "4", False),
        ("4", ["four", "4"], True),
    ],
)
def test_answers_equal(pred, gold, ok):
    assert answers_equal(pred, gold) is ok


def test_as_number_is_exact():
    assert as_number("1,234,567.25") == pytest.approx(1234567.25)
    assert as_number("0.1") + as_number("0.2") == as_number("0.3")  # exact rationals, no float error
    assert as_number("1e3") == 1000
    assert as_number("12,34") is None and as_number("abc") is None and as_number("") is None


def test_accuracy_reward_rows_and_columns():
    completions = ["<answer>12</answer>", "I think \\boxed{0.5}", "the result is 7", "no idea", "<answer>4</answer>"]
    answers = ["12", "1/2", "7", "3", None]
    assert accuracy(["p"] * 5, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, None]
    tag_only = make_accuracy("answer_tag")
    assert tag_only(["p"] * 5, completions, answer=answers) == [1.0, 0.0, 0.0, 0.0, None]
    last = make_accuracy("last_number", column="target", name="acc_last")
    assert last.__name__ == "acc_last"
    assert last(["p"], ["1 then 2"], target=["2"]) == [1.0]
    with pytest.raises(MlxRftError, match="column 'target'"):
        last(["p"], ["2"], answer=["2"])
    with pytest.raises(MlxRftError, match="unknown answer extraction"):
        make_accuracy("regex")


def test_accuracy_is_fast_on_numeric_answers():
    rng = np.random.default_rng(0)
    gold = [str(int(x)) for x in rng.integers(0, 10_000, 512)]
    completions = [f"Let me compute. The answer is <answer>{g}</answer>" for g in gold]
    accuracy(["p"], ["<answer>\\frac{1}{2}</answer>"], answer=["0.5"])  # warm math-verify/sympy import
    t0 = time.perf_counter()
    scores = accuracy(["p"] * 512, completions, answer=gold)
    elapsed = time.perf_counter() - t0
    assert scores == [1.0] * 512
    assert elapsed < 1.0, elapsed  # the exact-rational fast path, no sympy per row


def test_math_verify_works_off_the_main_thread():
    # RewardSet may run inside a helper thread; math-verify's signal timeouts must be off there.
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", answers_equal("\\frac{2}{4}", "0.5")))
    t.start()
    t.join()
    assert out["v"] is True


def test_format_rewards():
    comps = [
        "<answer>4</answer>",
        "<think>2+2</think>\n<answer>4</answer>",
        "<think>2+2</think> <answer> </answer>",
        "<answer>4</answer><think>late</think>",
        "preface <think>x</think><answer>4</answer>",
        "<think>x</think><answer>4</answer> trailing",
        "no tags",
    ]
    assert format_reward(["p"] * 7, comps) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert think_format(["p"] * 7, comps) == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    full = make_format(r"\d+", match="full", name="digits")
    assert full(["p"] * 3, ["123", " 42 ", "4 2"]) == [1.0, 1.0, 0.0]
    assert make_format(tags=["plan", "code"])(["p"], ["<plan>a</plan><code>b</code>"]) == [1.0]
    with pytest.raises(MlxRftError, match="exactly one"):
        make_format()
    with pytest.raises(MlxRftError, match="bad format regex"):
        make_format("(unclosed")


def test_length_band_hand_derived():
    f = make_length_reward(10, 20, falloff=5, unit="chars")
    comps = ["x" * n for n in (0, 5, 8, 10, 15, 20, 22, 25, 40)]
    np.testing.assert_allclose(f(["p"] * 9, comps), [0, 0, 0.6, 1, 1, 1, 0.6, 0, 0])
    words = make_length_reward(2, 3, unit="words")  # falloff = band width 1
    assert words(["p"] * 3, ["a", "a b", "a b c d"]) == [0.0, 1.0, 0.0]
    tokens = make_length_reward(2, 4)
    assert tokens(["p"] * 2, ["", ""], completion_ids=[[1, 2, 3], [1] * 6]) == [1.0, 0.0]
    with pytest.raises(MlxRftError, match="needs the completion_ids column"):
        tokens(["p"], ["abc"])
    with pytest.raises(MlxRftError, match="target_min <= target_max"):
        make_length_reward(5, 1)


def test_overlong_penalty_matches_dapo_formula():
    lmax, lcache = 100, 20
    f = make_overlong_penalty(lmax, lcache)
    lengths = np.arange(0, 131)
    got = np.array(f(["p"] * len(lengths), [""] * len(lengths), completion_ids=[int(n) for n in lengths]))
    # DAPO eq. 13: 0 if L <= Lmax - Lcache; ((Lmax - Lcache) - L) / Lcache if L <= Lmax; -1 otherwise.
    ref = np.where(
        lengths <= lmax - lcache, 0.0, np.where(lengths <= lmax, ((lmax - lcache) - lengths) / lcache, -1.0)
    )
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert got[90] == -0.5 and got[81] == pytest.approx(-0.05) and got[100] == -1.0
    with pytest.raises(MlxRftError, match="cache_length <= max_length"):
        make_overlong_penalty(10, 20)


def test_repetition_penalty_against_reference():
    assert repetition_fraction("a b c a b c".split(), 3) == pytest.approx(0.25)  # abc bca cab abc
    assert repetition_fraction(["a", "b"], 3) == 0.0
    rng = np.random.default_rng(1)
    for _ in range(20):
        seq = rng.integers(0, 4, rng.integers(1, 30)).tolist()
        n = int(rng.integers(1, 4))
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        ref = 0.0 if not grams else 1 - len(set(grams)) / len(grams)
        assert repetition_fraction(seq, n) == pytest.approx(ref)
    f = make_repetition_penalty(2, max_penalty=0.5)
    assert f(["p"] * 2, ["the cat the cat", "a b c d"]) == [pytest.approx(-0.5 / 3), 0.0]
    tok = make_repetition_penalty(1, unit="tokens")
    assert tok(["p"], [""], completion_ids=[[5, 5, 5, 5]]) == [-0.75]


def test_builtins_combine_in_a_reward_set():
    rs = RewardSet(["accuracy", "format", "repetition"], weights=[1.0, 0.5, 1.0])
    r = rs(["p"] * 2, ["<answer>7</answer>", "7 7 7 7 7"], {"answer": ["7", "7"]})
    # row 0: 1 + 0.5; row 1: accuracy via last number 1, no format, 3 of 3 trigrams... repeated 2/3
    np.testing.assert_allclose(r.total, [1.5, 1.0 - 2 / 3])
    assert resolve_reward("think_format")(["p"], ["<think>a</think><answer>b</answer>"]) == [1.0]
