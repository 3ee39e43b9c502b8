"""Group-relative judging: the completions of one prompt compared in pairs, then ranked.

A judge that gives every response the same absolute score can still say which of two is
better. For a pair (i, j) it is asked twice, with i shown as "Response A" and then as
"Response B", since small judges prefer a position:

    q_ij = P(A | i first) / (P(A | i first) + P(B | i first))     (or 1 / 0 from a text answer)
    pref(i over j) = (q_ij + 1 - q_ji) / 2

so a judge that always answers "A" gives pref = 0.5 for every pair: no order, not a false one.

Rewards: a Bradley-Terry model, P(i beats j) = s_i / (s_i + s_j), fitted to the soft wins by
Hunter's MM iterations, with every completion also tied `prior` times against a virtual
completion of strength 1 (this keeps strengths finite for a completion that wins every
comparison, and defined for one that was compared with few others). The reward of i is its
fitted win probability against the other members of its group, mean_j s_i / (s_i + s_j), in
[0, 1]: a strict order gives strictly ordered rewards, equal preferences equal rewards.

Cost: all pairs of G distinct completions are G(G-1) requests. `opponents` caps it: each
completion meets its neighbours on a seeded random cycle (opponents rounded up to even), so
the comparison graph stays connected; 0 (or >= G-1) compares all pairs. With a cap the order
is the one the comparisons support: every compared pair keeps the judge's verdict, while two
completions that never met rank by their records against the others.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .rubric import Rubric

CHOICES = ("A", "B")
BT_PRIOR = 0.5
BT_ITERS = 500


def system_prompt(rubric: Rubric) -> str:
    lines = [rubric.instructions.strip(), "", "Compare two responses to the same question on these criteria:"]
    for c in rubric.criteria:
        lines.append(f"- {c.name}: {c.description.strip()}")
    lines += ["", "Reply with only the letter of the better response: A or B."]
    return "\n".join(lines)


def user_prompt(question: str, first: str, second: str, reference: str | None = None) -> str:
    parts = [f"[Question]\n{question.strip()}"]
    if reference is not None:
        parts.append(f"[Reference answer]\n{str(reference).strip()}")
    parts.append(f"[Response A]\n{first.strip()}")
    parts.append(f"[Response B]\n{second.strip()}")
    return "\n\n".join(parts)


def pair_messages(
    rubric: Rubric, question: str, first: str, second: str, reference: str | None = None
) -> list[dict[str, str]]:
    """The judge's chat: criteria, few-shot pairs from the rubric's examples, then A vs B."""
    msgs = [{"role": "system", "content": system_prompt(rubric)}]
    for ex_q, better, worse, ref in _example_pairs(rubric):
        # Both orders, so the examples themselves teach no position.
        for a, b, answer in ((better, worse, "A"), (worse, better, "B")):
            msgs.append({"role": "user", "content": user_prompt(ex_q, a, b, ref)})
            msgs.append({"role": "assistant", "content": answer})
    msgs.append({"role": "user", "content": user_prompt(question, first, second, reference)})
    return msgs


def _example_pairs(rubric: Rubric) -> list[tuple[str, str, str, str | None]]:
    """(prompt, better, worse, reference) from few-shot examples of the same prompt that differ."""
    def overall(ex):
        return rubric.combine({c.name: rubric.normalize(ex.scores[c.name]) or 0.0 for c in rubric.criteria})

    pairs = []
    for i, a in enumerate(rubric.examples):
        for b in rubric.examples[i + 1 :]:
            if a.prompt == b.prompt and overall(a) != overall(b):
                better, worse = (a, b) if overall(a) > overall(b) else (b, a)
                pairs.append((a.prompt, better.completion, worse.completion, a.reference))
    return pairs


_CHOICE_RE = re.compile(r"\b(?:response\s*)?([AB])\b", re.IGNORECASE)


def parse_choice(text: str | None) -> float | None:
    """P(A is better) from a text answer: 1.0 for A, 0.0 for B, None when neither is named."""
    if not text:
        return None
    m = _CHOICE_RE.search(text.replace("<think>", " ").split("</think>")[-1])
    if m is None:
        return None
    return 1.0 if m.group(1).upper() == "A" else 0.0


def choice_probability(logprobs: Mapping[str, float]) -> float | None:
    """P(A) renormalised over {A, B} from their log-probs, or None when neither has mass."""
    a, b = (float(np.exp(logprobs[c])) if c in logprobs else 0.0 for c in CHOICES)
    return a / (a + b) if a + b > 0 else None


def pair_preference(first_shown: float | None, second_shown: float | None) -> float | None:
    """P(i better than j) from P(A) with i shown first and P(A) with j shown first.

    Averaging the two orders cancels a constant position bias; with one order missing the
    other is used alone (biased, but better than no comparison)."""
    votes = [v for v in (first_shown, None if second_shown is None else 1.0 - second_shown) if v is not None]
    return sum(votes) / len(votes) if votes else None


def pair_schedule(n: int, opponents: int, seed_text: str) -> list[tuple[int, int]]:
    """Pairs (i < j) of n items to compare: all pairs, or neighbours on a seeded random cycle.

    opponents <= 0 or >= n - 1: all n(n-1)/2 pairs. Else each item meets the items 1..ceil(k/2)
    steps away on a random cycle (k rounded up to even), seeded by `seed_text`, so the same
    group (e.g. on resume) is compared the same way.
    """
    if n < 2:
        return []
    if opponents <= 0 or opponents >= n - 1:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    digest = hashlib.sha256(seed_text.encode("utf-8", "replace")).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    pairs = set()
    for step in range(1, (opponents + 1) // 2 + 1):
        for k in range(n):
            a, b = order[k], order[(k + step) % n]
            pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def bradley_terry(wins: np.ndarray, prior: float = BT_PRIOR, iters: int = BT_ITERS, tol: float = 1e-12) -> np.ndarray:
    """Bradley-Terry strengths from soft wins (wins[i, j]: how often i beat j), by MM updates.

    Each item also draws `prior` wins and `prior` losses against a virtual item of strength 1:
        s_i <- (W_i + prior) / (sum_j n_ij / (s_i + s_j) + 2 prior / (s_i + 1)),
    with W_i = sum_j wins[i, j] and n_ij = wins[i, j] + wins[j, i] (Hunter 2004, MM)."""
    wins = np.asarray(wins, dtype=np.float64)
    n = wins.shape[0]
    games = wins + wins.T
    won = wins.sum(axis=1)
    s = np.ones(n)
    for _ in range(iters):
        denom = (games / (s[:, None] + s[None, :])).sum(axis=1) + 2.0 * prior / (s + 1.0)
        new = (won + prior) / denom
        done = np.max(np.abs(np.log(new) - np.log(s))) < tol
        s = new
        if done:
            break
    return s


def pairwise_rewards(n: int, preferences: Mapping[tuple[int, int], float]) -> list[float | None]:
    """Per-item rewards in [0, 1] from preferences {(i, j): P(i better than j)} (see module).

    Items in no comparison get None; with fewer than two items every item gets 0.5."""
    if n < 2:
        return [0.5] * n
    wins = np.zeros((n, n))
    seen = np.zeros(n, dtype=bool)
    for (i, j), p in preferences.items():
        wins[i, j] += p
        wins[j, i] += 1.0 - p
        seen[i] = seen[j] = True
    s = bradley_terry(wins)
    win_prob = s[:, None] / (s[:, None] + s[None, :])
    np.fill_diagonal(win_prob, 0.0)
    rewards = win_prob.sum(axis=1) / (n - 1)
    return [float(r) if seen[i] else None for i, r in enumerate(rewards)]


def distinct(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct texts in first-seen order, and each input's index among them."""
    index: dict[str, int] = {}
    where = [index.setdefault(t, len(index)) for t in texts]
    return list(index), where
