"""Supervised losses on answer tokens only, and label ranking by log-likelihood.

Sequences are right-padded: row b holds its prompt (p_b positions, text and soft tokens) and
then its answer (a_b tokens). The logits at positions p_b - 1 .. p_b + a_b - 2 predict the answer
tokens, so the LM head runs only on those positions, never on the prompt or the padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..policy.head import split_model
from ..timeseries.model import PAD_ID, TimeSeriesLM
from .prefix import SharedPrefix


def answer_positions(
    prompt_lens: Sequence[int], answers: Sequence[np.ndarray], width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat positions into [B * width], target ids, row of each target) for the answers."""
    pos, tgt, row = [], [], []
    for b, (p, a) in enumerate(zip(prompt_lens, answers)):
        pos.extend(b * width + p - 1 + np.arange(len(a)))
        tgt.extend(a)
        row.extend([b] * len(a))
    return np.asarray(pos, np.int32), np.asarray(tgt, np.int32), np.asarray(row, np.int32)


def answer_logprobs(
    model: TimeSeriesLM, pieces: Sequence[Sequence], answers: Sequence[np.ndarray],
    prefix: SharedPrefix | None = None,
):
    """log p(answer token | prompt, earlier answer tokens) for every answer token, and its row.

    pieces: each row's prompt pieces (token ids / channels), after `prefix` when one is given
    (see prefix.py); answers: each row's answer ids."""
    rows = [list(p) + [np.asarray(a, np.int32)] for p, a in zip(pieces, answers)]
    emb, lengths = model.embed(rows)
    prompt_lens = [n - len(a) for n, a in zip(lengths, answers)]
    B, L, H = emb.shape
    pos, tgt, row = answer_positions(prompt_lens, answers, L)
    body, _, head = split_model(model.llm)
    cache = prefix.caches(B) if prefix is not None else None
    ids = mx.full((B, L), PAD_ID, mx.int32)
    if head is None:  # an architecture whose body returns logits
        logits = model.llm(ids, cache=cache, input_embeddings=emb).reshape(B * L, -1)[mx.array(pos)]
    else:
        hidden = body(ids, cache=cache, input_embeddings=emb)
        logits = head(hidden.reshape(B * L, H)[mx.array(pos)])
    logits = logits.astype(mx.float32)
    targets = mx.array(tgt)
    chosen = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return chosen - mx.logsumexp(logits, axis=-1), row


def sft_loss(model: TimeSeriesLM, pieces, answers, prefix=None) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over all answer tokens of the batch, and the token count."""
    logp, _ = answer_logprobs(model, pieces, answers, prefix)
    return -logp.mean(), mx.array(logp.shape[0])


def rank_labels(
    model: TimeSeriesLM, pieces, label_answers: Sequence[np.ndarray], prefix=None
) -> np.ndarray:
    """[B, K] summed log-likelihood of each label's answer tokens after each row's prompt."""
    K = len(label_answers)
    rows = [p for p in pieces for _ in range(K)]
    answers = [a for _ in pieces for a in label_answers]
    logp, row = answer_logprobs(model, rows, answers, prefix)
    sums = np.zeros(len(rows), np.float64)
    np.add.at(sums, row, np.asarray(logp, np.float64))
    return sums.reshape(len(pieces), K)


def rank_labels_cached(
    model: TimeSeriesLM, pieces, label_answers: Sequence[np.ndarray], prefix: SharedPrefix
) -> np.ndarray:
    """`rank_labels` with each prompt run once: [B, K] label log-likelihoods.

    The rows must share one prompt length (no padding, see evaluate.py). The prompt's KV cache
    is copied for each label, and only the labels' own tokens run again; with K labels this
    costs one prompt pass instead of K."""
    from mlx_lm.models.cache import KVCache

    B, K = len(pieces), len(label_answers)
    emb, _ = model.embed(pieces)
    cache = prefix.decode_caches(B)
    logits = model.llm(mx.full(emb.shape[:2], PAD_ID, mx.int32), cache=cache, input_embeddings=emb)
    first = _log_softmax(logits[:, -1, :])  # [B, V]: each label's first token
    firsts = mx.array([int(a[0]) for a in label_answers])
    scores = mx.take(first, firsts, axis=1)  # [B, K]
    A = max(len(a) for a in label_answers)
    if A > 1:
        # Label k feeds its tokens 0..n-2; output i predicts token i + 1 (token 0: `first`).
        feed = np.zeros((K, A - 1), np.int32)
        target = np.zeros((K, A - 1), np.int32)
        valid = np.zeros((K, A - 1), np.float32)
        for k, a in enumerate(label_answers):
            n = len(a) - 1
            feed[k, :n], target[k, :n], valid[k, :n] = a[:-1], a[1:], 1.0
        grown = []
        for c in cache:  # row b's cache copied K times: rows b*K .. b*K + K - 1
            g = KVCache()
            keys, values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            g.update_and_fetch(mx.repeat(keys, K, axis=0), mx.repeat(values, K, axis=0))
            grown.append(g)
        lp = _log_softmax(model.llm(mx.array(np.tile(feed, (B, 1))), cache=grown))
        tok = mx.take_along_axis(lp, mx.array(np.tile(target, (B, 1)))[..., None], axis=-1)[..., 0]
        scores = scores + (tok * mx.array(np.tile(valid, (B, 1)))).sum(axis=1).reshape(B, K)
    return np.asarray(scores, np.float64)


def _log_softmax(z: mx.array) -> mx.array:
    z = z.astype(mx.float32)
    return z - mx.logsumexp(z, axis=-1, keepdims=True)
