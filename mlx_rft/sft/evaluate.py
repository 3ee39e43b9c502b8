"""Held-out scores of an SFT model: label ranking, greedy generation, and the shuffle control.

* ranking: each class label's `<answer>label</answer>` log-likelihood after the prompt; the
  prediction is the most likely label (no parsing, no format failures);
* generation: greedy decoding, the answer parsed from `<answer>` tags as the RL rewards do;
  with the most common answer's share (the constant-answer baseline) and the count of
  distinct answers beside it, so a model that answers one word to everything shows as such;
* shuffle control: the same rows with their series moved to other rows; a model that reads the
  series falls to chance there, one that guesses from the text does not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import mlx.core as mx
import numpy as np

from ..rewards.verifiers import answers_equal, extract_answer_tag
from ..timeseries.model import PAD_ID, TimeSeriesLM
from ..timeseries.prompts import Encoded, answer_ids, encode_row
from ..timeseries.rows import SeriesPart, TSRow
from .loss import rank_labels_cached
from .prefix import SharedPrefix

RANK_ROWS = 256  # label sequences per scoring pass (rows x labels)
GENERATE_BATCH = 64


def rank_accuracy(model: TimeSeriesLM, tokenizer, examples: Sequence[Encoded],
                  classes: Sequence[str], prefix: SharedPrefix, on_batch=None) -> dict:
    labels = [answer_ids(tokenizer, c) for c in classes]
    rows = [prefix.strip(e.pieces) for e in examples]
    preds: list[str | None] = [None] * len(rows)
    per_batch = max(1, RANK_ROWS // len(classes))
    for idx in _same_length_batches(rows, model, per_batch):
        scores = rank_labels_cached(model, [rows[i] for i in idx], labels, prefix)
        for i, k in zip(idx, scores.argmax(axis=1)):
            preds[i] = classes[k]
        if on_batch:
            on_batch(len(idx))
    return _scores(preds, [e.answer for e in examples])


def generate_texts(model: TimeSeriesLM, tokenizer, examples: Sequence[Encoded],
                   prefix: SharedPrefix, max_new_tokens: int, on_batch=None) -> list[str]:
    """Greedy completions of the prompts."""
    rows = [prefix.strip(e.pieces) for e in examples]
    out: list[str | None] = [None] * len(rows)
    eos = set(int(t) for t in tokenizer.eos_token_ids)
    for idx in _same_length_batches(rows, model, GENERATE_BATCH):
        texts = _greedy(model, [rows[i] for i in idx], prefix, max_new_tokens, eos, tokenizer)
        for i, text in zip(idx, texts):
            out[i] = text
        if on_batch:
            on_batch(len(idx))
    return out


def _same_length_batches(rows, model: TimeSeriesLM, size: int):
    """Row indices in batches of equal prompt length: no row needs padding, so the plain KV
    cache (one offset for the whole batch) is exact."""
    lengths = [model.prompt_length(r) for r in rows]
    for length in sorted(set(lengths)):
        same = [i for i, m in enumerate(lengths) if m == length]
        for j in range(0, len(same), size):
            yield same[j : j + size]


def _greedy(model, rows, prefix, max_new, eos, tokenizer) -> list[str]:
    B = len(rows)
    emb, _ = model.embed(rows)
    cache = prefix.decode_caches(B)
    logits = model.llm(mx.full(emb.shape[:2], PAD_ID, mx.int32), cache=cache, input_embeddings=emb)
    tokens = mx.argmax(logits[:, -1, :], axis=-1)
    out = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new):
        step = tokens.tolist()
        for b, t in enumerate(step):
            if not done[b]:
                if t in eos:
                    done[b] = True
                else:
                    out[b].append(t)
        if all(done):
            break
        logits = model.llm(tokens[:, None], cache=cache)
        tokens = mx.argmax(logits[:, -1, :], axis=-1)
    return [tokenizer.decode(t) for t in out]


def generation_accuracy(texts: Sequence[str], golds: Sequence[str]) -> dict:
    answers = [extract_answer_tag(t) for t in texts]
    scores = _scores(answers, golds, equal=lambda a, g: a is not None and answers_equal(a, g))
    scores["unparsed"] = sum(a is None for a in answers)
    return scores


def _scores(preds, golds, equal=None) -> dict:
    equal = equal or (lambda a, g: a == g)
    correct = [bool(equal(p, g)) for p, g in zip(preds, golds)]
    counts = Counter(p for p in preds if p is not None)
    # The best a prompt-independent answer does on these rows (its share of the gold answers).
    constant = max(Counter(golds).values()) / len(golds) if golds else 0.0
    return {
        "accuracy": float(np.mean(correct)) if correct else 0.0,
        "n": len(golds),
        "distinct_answers": len(counts),
        "most_common_answer_share": counts.most_common(1)[0][1] / len(preds) if counts else 0.0,
        "constant_baseline": constant,
    }


def shuffled_rows(rows: Sequence[TSRow], seed: int = 0) -> list[TSRow]:
    """The rows with each row's series taken from another row (a random derangement), text and
    answers unchanged."""
    n = len(rows)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if n > 1:  # a cyclic shift of a random order moves every row
        perm = np.roll(perm, 1)[np.argsort(perm)]
    out = []
    for i, row in enumerate(rows):
        donor = [p for p in rows[int(perm[i])].parts if isinstance(p, SeriesPart)]
        it = iter(donor)
        parts = tuple(next(it, p) if isinstance(p, SeriesPart) else p for p in row.parts)
        out.append(replace(row, parts=parts))
    return out


def shuffle_control(model, tokenizer, rows, classes, prefix, as_text=False, on_batch=None) -> dict:
    encoded = [encode_row(tokenizer, r, as_text) for r in shuffled_rows(rows)]
    return rank_accuracy(model, tokenizer, encoded, classes, prefix, on_batch)


def describe(scores: dict) -> str:
    """The held-out scores as a few lines: each score beside the baselines it must beat."""
    if not scores:
        return "no held-out rows: nothing scored"
    lines = []
    for name in ("ranking", "generation", "shuffled_series"):
        if name in scores:
            s = scores[name]
            lines.append(
                f"{name:<16} accuracy {s['accuracy']:.3f} on {s['n']} rows  (constant answer "
                f"{s['constant_baseline']:.3f}; {s['distinct_answers']} distinct answers"
                + (f"; {s['unparsed']} unparsed" if "unparsed" in s else "") + ")"
            )
    for name, value in scores.get("baselines", {}).items():
        lines.append(f"{name:<16} accuracy {value:.3f}")
    return "\n".join(lines)
