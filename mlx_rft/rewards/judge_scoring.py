"""Judge scores from next-token probabilities (G-Eval style): pure maths, no model, no network.

A judge asked for one integer on a rubric's scale has a distribution over its first answer
token. Sampling it (the text method) gives a small judge's favourite number for every response;
its expectation, restricted to the score tokens and renormalised, differs between responses that
the judge tells apart even slightly:

    E[score] = sum_v v * p(v) / sum_v p(v),   v over the integer points of the scale.

Numbers that are several tokens. Many tokenizers (Qwen, SmolLM, Mistral) split "10" into "1",
"0"; then "1" is both the score 1 and the start of 10. Options are scored by chaining log-probs
along their tokens, and an option that is a prefix of another ("1" of "10") keeps only the mass
that does not continue into the longer one:

    p(10) = p("1") * p("0" | "1"),   p(1) = p("1") * (1 - p("0" | "1")).

`OptionTrie` does this on token ids (the local judge, exact: the continuation position is one
more token of the same forward pass). `option_logprobs_from_top` does it on the top-K token
strings an OpenAI-compatible server returns, where the continuation is known only along the
token the server actually sampled: when the sampled first token is not the shared prefix, the
prefix's whole mass stays with the shorter option (a small bias toward it; whole-number
tokenizers such as Llama 3's and scales up to 9 points have none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import MlxRftError

# Byte-level BPE and SentencePiece mark spaces and newlines inside token strings.
_TOKEN_MARKERS = ("Ġ", "▁", "Ċ", "ĉ")
MAX_POINTS = 11  # 0..10: beyond it top-K windows miss options and numbers share many prefixes


def token_text(token: str) -> str:
    """A token string without surrounding whitespace or BPE space markers ("Ġ7" -> "7")."""
    text = str(token)
    for marker in _TOKEN_MARKERS:
        text = text.replace(marker, " ")
    return text.strip()


def scale_points(lo: float, hi: float) -> list[int]:
    """The integer scores lo..hi of a rubric scale, for probability scoring."""
    if not (float(lo).is_integer() and float(hi).is_integer()):
        raise MlxRftError(
            f"probability scoring needs an integer scale, got {lo:g}..{hi:g}; use integer scale "
            "min and max in the rubric, or method='text'"
        )
    points = list(range(int(lo), int(hi) + 1))
    if len(points) > MAX_POINTS or int(lo) < 0:
        raise MlxRftError(
            f"probability scoring supports scales of at most {MAX_POINTS} non-negative points "
            f"(e.g. 1..5, 0..10), got {lo:g}..{hi:g}; shrink the rubric's scale or use method='text'"
        )
    return points


def _probabilities(logprobs: Mapping[str, float]) -> dict[str, float]:
    """{key: p} from {key: log p}, summed over keys that read the same (e.g. "7" and "Ġ7")."""
    finite = {k: float(v) for k, v in logprobs.items() if v is not None and math.isfinite(float(v))}
    if not finite:
        return {}
    top = max(finite.values())  # probabilities relative to the largest, so tiny ones do not underflow
    out: dict[str, float] = {}
    for k, v in finite.items():
        key = token_text(k)
        out[key] = out.get(key, 0.0) + math.exp(v - top)
    return out


def expected_score(logprobs_by_token: Mapping[str, float], scale: Sequence[int] | tuple[int, int]) -> float | None:
    """The expected score under the judge's distribution restricted to the scale's points.

    logprobs_by_token: token (or option) string -> log-prob; tokens that are no point of the
        scale are ignored, and tokens reading the same number add up. A multi-token number must
        already be combined into one key (see `option_logprobs_from_top`, `OptionTrie`).
    scale: (lo, hi) or the list of points.
    Returns the renormalised expectation on the scale, or None when no point has any mass.
    """
    points = set(range(int(scale[0]), int(scale[1]) + 1)) if len(scale) == 2 else {int(v) for v in scale}
    mass = total = 0.0
    for key, p in _probabilities(logprobs_by_token).items():
        if key.isdigit() and int(key) in points:
            mass += p
            total += p * int(key)
    if not mass > 0:
        return None
    return total / mass


def option_mass(logprobs_by_option: Mapping[str, float]) -> float:
    """Total probability on the options (how much of the judge's answer was a valid one)."""
    return float(sum(math.exp(v) for v in logprobs_by_option.values() if math.isfinite(v)))


def option_logprobs_from_top(
    top: Sequence[Mapping[str, float]], sampled: Sequence[str], options: Sequence[str]
) -> dict[str, float]:
    """{option: log-prob} from an OpenAI-style reply's per-position top-K log-probs.

    top[k]: token string -> log-prob at generated position k; sampled[k]: the token generated
    there. The answer position is the first whose top-K holds the start of an option (leading
    whitespace tokens are skipped). An option that is a prefix of others ("1" of "10") is split
    with the next position when the server sampled that prefix, else keeps the prefix's mass.
    Options absent from the top-K get no entry (probability taken as 0).
    """
    options = [str(o) for o in options]
    starts = {o[:i] for o in options for i in range(1, len(o) + 1)}
    for k, dist in enumerate(top):
        if not any(token_text(t) in starts for t in dist):
            continue
        mass: dict[str, float] = {}
        for tok, lp in dist.items():
            s = token_text(tok)
            if s not in starts or lp is None or not math.isfinite(lp):
                continue
            p = math.exp(lp)
            longer = [o for o in options if o != s and o.startswith(s)]
            if longer and k + 1 < len(top) and k < len(sampled) and token_text(sampled[k]) == s:
                went_on = 0.0
                for tok2, lp2 in top[k + 1].items():
                    s2 = s + token_text(tok2)
                    if s2 in longer and lp2 is not None and math.isfinite(lp2):
                        mass[s2] = mass.get(s2, 0.0) + p * math.exp(lp2)
                        went_on += math.exp(lp2)
                p *= max(0.0, 1.0 - went_on)
            if s in options and p > 0:
                mass[s] = mass.get(s, 0.0) + p
        return {o: math.log(m) for o, m in mass.items() if m > 0}
    return {}


@dataclass
class OptionTrie:
    """Options (e.g. "1".."10", or "A", "B") as token-id paths, scored from one forward pass.

    `chain` holds the tokens to append after the judge prompt: the longest path shared by
    several options ([] when every option is one token; ["1"] for 1..10 when "10" is "1", "0").
    Position k of the forward (k = 0: the prompt's last token) gives the next-token distribution
    after chain[:k]; `needed[k]` are the token ids whose log-probs are read there.
    """

    paths: dict[str, tuple[int, ...]]
    chain: list[int]
    needed: list[list[int]]

    @classmethod
    def build(cls, option_ids: Mapping[str, Sequence[int]]) -> OptionTrie:
        paths = {str(o): tuple(int(t) for t in ids) for o, ids in option_ids.items()}
        if not paths or any(len(p) == 0 for p in paths.values()):
            raise MlxRftError(f"judge options {sorted(paths)} must each encode to at least one token")
        if len(set(paths.values())) < len(paths):
            raise MlxRftError(f"two judge options encode to the same tokens: {paths}")
        inner = {p[:k] for p in paths.values() for k in range(1, len(p))}
        chain = max(inner, key=len, default=())
        if any(chain[: len(node)] != node for node in inner):
            raise MlxRftError(
                f"the options {sorted(paths)} share more than one multi-token prefix in this "
                "tokenizer, which one forward pass cannot score; use a scale of at most 0..10 "
                "or method='text'"
            )
        needed = []
        for k in range(len(chain) + 1):
            node = chain[:k]
            needed.append(sorted({p[k] for p in paths.values() if len(p) > k and p[:k] == node}))
        return cls(paths, list(chain), needed)

    def logprobs(self, position_logprobs: Sequence[Mapping[int, float]]) -> dict[str, float]:
        """{option: log-prob} from the log-probs of `needed[k]` at each chain position k."""
        out = {}
        for option, path in self.paths.items():
            lp = sum(position_logprobs[k][t] for k, t in enumerate(path))
            m = len(path)
            if m <= len(self.chain) and tuple(self.chain[:m]) == path:
                # A prefix of longer options: only the mass that stops here is this option's.
                going_on = sum(math.exp(position_logprobs[m][t]) for t in self.needed[m])
                stop = 1.0 - going_on
                lp = lp + math.log(stop) if stop > 0 else -math.inf
            out[option] = lp
        return out
