"""The judge's pure maths on hand cases: expected scores from log-probs (single- and multi-token
numbers), option log-probs from a server's top-K, pair debiasing, Bradley-Terry rewards, the pair
schedule, and the check for groups a judge left unordered."""

import math

import numpy as np
import pytest

from mlx_rft.errors import MlxRftError
from mlx_rft.rewards import judge_pairwise as pw
from mlx_rft.rewards.judge import order_check
from mlx_rft.rewards.judge_scoring import (
    OptionTrie,
    expected_score,
    option_logprobs_from_top,
    scale_points,
    token_text,
)

log = math.log


# ---------------------------------------------------------------------------------------------
# Expected scores


def test_two_equal_top_tokens_give_their_mean():
    assert expected_score({"3": log(0.4), "4": log(0.4)}, (1, 5)) == pytest.approx(3.5)


def test_non_score_tokens_are_ignored_and_the_rest_renormalised():
    lp = {"3": log(0.2), "5": log(0.2), "The": log(0.5), "11": log(0.05), "-1": log(0.05)}
    assert expected_score(lp, (1, 10)) == pytest.approx(4.0)  # "11" is off the scale, "-1" no number


def test_spellings_of_one_number_add_up():
    # "7" and "Ġ7" (byte-level BPE's space marker) are one score: p(7) = 0.5, p(9) = 0.5.
    lp = {"7": log(0.25), "Ġ7": log(0.25), "▁9": log(0.5)}
    assert expected_score(lp, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == pytest.approx(8.0)


def test_nothing_on_the_scale_is_none():
    assert expected_score({"The": log(0.9), "11": log(0.1)}, (1, 10)) is None
    assert expected_score({}, (1, 5)) is None
    assert expected_score({"3": -math.inf}, (1, 5)) is None


def test_tiny_probabilities_do_not_underflow():
    assert expected_score({"2": -2000.0, "4": -2000.0}, (1, 5)) == pytest.approx(3.0)


def test_token_text_strips_markers():
    assert [token_text(t) for t in ("Ġ7", "▁A", " 10\n", "Ċ")] == ["7", "A", "10", ""]


@pytest.mark.parametrize("lo, hi, pattern", [(0.5, 4.5, "integer scale"), (0, 100, "at most 11"), (-2, 2, "non-negative")])
def test_scales_probability_scoring_cannot_read(lo, hi, pattern):
    with pytest.raises(MlxRftError, match=pattern):
        scale_points(lo, hi)
    assert scale_points(0, 10) == list(range(11))


# ---------------------------------------------------------------------------------------------
# Multi-token numbers: chained log-probs


OPTIONS_1_10 = [str(v) for v in range(1, 11)]


def test_server_top_k_splits_1_and_10_along_the_sampled_token():
    # p("1") = 0.5 then p("0" | "1") = 0.8: p(10) = 0.4, p(1) = 0.1; p(9) = 0.5.
    top = [{"1": log(0.5), "9": log(0.5)}, {"0": log(0.8), "<|im_end|>": log(0.2)}]
    got = option_logprobs_from_top(top, ["1", "0"], OPTIONS_1_10)
    assert {k: math.exp(v) for k, v in got.items()} == pytest.approx({"10": 0.4, "1": 0.1, "9": 0.5})
    assert expected_score(got, (1, 10)) == pytest.approx(10 * 0.4 + 0.1 + 9 * 0.5)


def test_without_the_continuation_the_prefix_stays_the_short_number():
    top = [{"1": log(0.2), "9": log(0.8)}, {"<|im_end|>": 0.0}]  # the server generated "9"
    got = option_logprobs_from_top(top, ["9", "<|im_end|>"], OPTIONS_1_10)
    assert {k: math.exp(v) for k, v in got.items()} == pytest.approx({"1": 0.2, "9": 0.8})


def test_a_leading_space_token_is_skipped_and_whole_number_tokens_count():
    top = [{"Ġ": log(0.9), "Hello": log(0.1)}, {"10": log(0.5), "8": log(0.5)}]
    got = option_logprobs_from_top(top, ["Ġ", "10"], OPTIONS_1_10)
    assert expected_score(got, (1, 10)) == pytest.approx(9.0)
    assert option_logprobs_from_top([{"Yes": 0.0}], ["Yes"], OPTIONS_1_10) == {}


def test_option_trie_chains_a_shared_prefix():
    # Token ids: "1".."9" -> 1..9, "0" -> 0; "10" is "1", "0".
    trie = OptionTrie.build({**{str(v): [v] for v in range(1, 10)}, "10": [1, 0]})
    assert trie.chain == [1] and trie.needed == [list(range(1, 10)), [0]]
    root = {t: log(0.1) for t in range(1, 10)}
    root[1] = log(0.2)  # p("1") = 0.2, the other eight 0.1 each
    after_one = {0: log(0.25)}  # p("0" | "1")
    got = {k: math.exp(v) for k, v in trie.logprobs([root, after_one]).items()}
    assert got["10"] == pytest.approx(0.05) and got["1"] == pytest.approx(0.15) and got["5"] == pytest.approx(0.1)
    assert sum(got.values()) == pytest.approx(1.0)


def test_option_trie_single_tokens_need_no_chain():
    trie = OptionTrie.build({"A": [5], "B": [6]})
    assert trie.chain == [] and trie.needed == [[5, 6]]
    assert trie.logprobs([{5: log(0.3), 6: log(0.6)}]) == pytest.approx({"A": log(0.3), "B": log(0.6)})


def test_option_trie_refuses_what_one_pass_cannot_score():
    with pytest.raises(MlxRftError, match="more than one multi-token prefix"):
        OptionTrie.build({"1": [1], "2": [2], "10": [1, 0], "20": [2, 0]})
    with pytest.raises(MlxRftError, match="same tokens"):
        OptionTrie.build({"A": [5], "a": [5]})


# ---------------------------------------------------------------------------------------------
# Pairwise


def test_debiasing_cancels_a_judge_that_always_says_a():
    assert pw.pair_preference(1.0, 1.0) == 0.5  # "A" in both orders: no preference
    assert pw.pair_preference(0.9, 0.7) == pytest.approx(0.6)  # biased toward A, still prefers i
    assert pw.pair_preference(1.0, 0.0) == 1.0
    assert pw.pair_preference(None, 0.25) == 0.75 and pw.pair_preference(None, None) is None


def test_a_strict_order_gives_strictly_ordered_rewards():
    n = 5  # item 0 best ... item 4 worst; every comparison agrees
    prefs = {(i, j): 1.0 for i in range(n) for j in range(i + 1, n)}
    rewards = pw.pairwise_rewards(n, prefs)
    assert all(a > b for a, b in zip(rewards, rewards[1:]))
    assert all(0.0 < r < 1.0 for r in rewards)
    assert np.mean(rewards) == pytest.approx(0.5)  # win probabilities of all pairs sum to n(n-1)/2


def test_ties_and_position_bias_give_equal_rewards():
    n = 4
    ties = pw.pairwise_rewards(n, {(i, j): 0.5 for i in range(n) for j in range(i + 1, n)})
    assert ties == pytest.approx([0.5] * n)
    biased = {(i, j): pw.pair_preference(1.0, 1.0) for i in range(n) for j in range(i + 1, n)}
    assert pw.pairwise_rewards(n, biased) == pytest.approx([0.5] * n)
    # Soft preferences: two items the judge cannot tell apart get the same reward.
    soft = {(0, 1): 0.5, (0, 2): 0.9, (1, 2): 0.9}
    r = pw.pairwise_rewards(3, soft)
    assert r[0] == pytest.approx(r[1]) and r[0] > r[2]


def test_bradley_terry_accounts_for_opponent_strength():
    # 0 beat 1 and 1 beat 2 (no 0-2 game): 0 > 1 > 2 all the same.
    r = pw.pairwise_rewards(3, {(0, 1): 1.0, (1, 2): 1.0})
    assert r[0] > r[1] > r[2]
    one_game = pw.pairwise_rewards(3, {(0, 1): 1.0})
    assert one_game[0] > one_game[1] and one_game[2] is None  # never compared: no reward
    assert pw.pairwise_rewards(1, {}) == [0.5]


def test_pair_schedule_caps_pairs_and_stays_connected():
    assert pw.pair_schedule(4, 0, "s") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pw.pair_schedule(4, 3, "s") == pw.pair_schedule(4, 0, "s")
    assert pw.pair_schedule(1, 4, "s") == []
    pairs = pw.pair_schedule(8, 4, "group text")
    assert len(pairs) == 16 and all(i < j for i, j in pairs)
    degree = np.bincount(np.array(pairs).ravel(), minlength=8)
    assert (degree == 4).all()
    reach, frontier = {0}, [0]  # connected: every completion is ranked against the others
    while frontier:
        k = frontier.pop()
        for i, j in pairs:
            for a, b in ((i, j), (j, i)):
                if a == k and b not in reach:
                    reach.add(b)
                    frontier.append(b)
    assert reach == set(range(8))
    assert pw.pair_schedule(8, 4, "group text") == pairs  # seeded by the group: replays the same
    assert pw.pair_schedule(8, 4, "another group") != pairs
    # A strict order seen through the capped schedule: every compared pair keeps its order, and
    # the best and worst completions are found (uncompared ones rank by their records).
    rewards = pw.pairwise_rewards(8, {(i, j): 1.0 for i, j in pairs})
    assert all(rewards[i] > rewards[j] for i, j in pairs)
    assert np.argmax(rewards) == 0 and np.argmin(rewards) == 7


@pytest.mark.parametrize(
    "text, p",
    [("A", 1.0), (" B\n", 0.0), ("Response B is better.", 0.0), ("a", 1.0), ("<think>A</think>B", 0.0),
     ("Neither.", None), ("", None), (None, None)],
)
def test_parse_choice(text, p):
    assert pw.parse_choice(text) == p


def test_choice_probability_renormalises_over_a_and_b():
    assert pw.choice_probability({"A": log(0.3), "B": log(0.1)}) == pytest.approx(0.75)
    assert pw.choice_probability({"B": log(0.2)}) == 0.0
    assert pw.choice_probability({}) is None


# ---------------------------------------------------------------------------------------------
# Groups a judge left unordered


def test_order_check_counts_groups_with_one_score():
    groups = [0, 0, 1, 1, 2, 2]
    completions = ["a", "b", "c", "d", "same", "same"]
    # Group 0 ordered, group 1 tied, group 2 identical completions (not the judge's fault).
    eligible, unordered, seen = order_check(groups, completions, [0.2, 0.8, 0.5, 0.5, 0.1, 0.1])
    assert (eligible, unordered) == (2, 1) and seen == "all 2 completions scored 0.5"
    eligible, unordered, seen = order_check(groups, completions, [0.25, 0.25, 0.5, 0.5, None, None])
    assert (eligible, unordered) == (2, 2) and "0.25, 0.5" in seen
    assert order_check([0, 0], ["a", "b"], [None, 0.3])[:2] == (0, 0)  # one scored row: no verdict
