"""Samplers, penalties and log-prob maths of mlx_rft.rollout.sampling on hand-made distributions.

Sampling tests draw many rows in one call (every row is an independent draw) and compare the
empirical frequencies with the expected truncated distribution, computed in float64 NumPy.
"""

import math

import mlx_rft  # noqa: F401  (fast BLAS before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors

from mlx_rft.errors import MlxRftError
from mlx_rft.rollout.sampling import (
    TokenSampler,
    apply_penalties,
    exp_nonpositive,
    log_normalizer,
    penalty_counts,
    sample_inverse_cdf,
    step_uniforms,
    top_p_thresholds,
    validate_sampling,
)
from mlx_rft.types import SamplingConfig

DRAWS = 40_000


def uniforms(n, seed=0):
    return mx.random.uniform(shape=(2, n), key=mx.random.key(seed))


def softmax64(x, t=1.0):
    z = np.asarray(x, np.float64) / t
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def draw(logits_row, cfg, n=DRAWS, seed=0, protected=()):
    """Sample n tokens from one logits row (repeated over n rows); returns (tokens, output)."""
    x = mx.broadcast_to(mx.array(logits_row, mx.float32)[None], (n, len(logits_row)))
    sampler = TokenSampler(cfg, len(logits_row), protected_ids=protected)
    out = sampler(x, uniforms(n, seed))
    mx.eval(out.tokens, out.logprobs, out.truncated_logprobs)
    return np.array(out.tokens), out


def assert_frequencies(tokens, expected, n=DRAWS):
    """Frequencies within 5 standard errors of `expected`; zero-probability tokens never drawn."""
    freq = np.bincount(tokens, minlength=len(expected)) / n
    expected = np.asarray(expected, np.float64)
    se = np.sqrt(expected * (1 - expected) / n) + 1e-12
    assert np.all(freq[expected == 0] == 0), (freq, expected)
    assert np.all(np.abs(freq - expected) <= 5 * se + 1e-9), (freq, expected)


LOGITS = [2.0, 1.5, 0.3, -0.4, 0.9, -2.0, 1.1, 0.0]


# ---------------------------------------------------------------- numerics


def test_exp_nonpositive_matches_float64_exp():
    x = np.concatenate([-np.geomspace(1e-8, 86.9, 200_001), [0.0, -1e-30]]).astype(np.float32)
    got = np.array(exp_nonpositive(mx.array(x))).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(got / ref - 1)
    assert rel.max() < 1e-6, rel.max()
    # Underflow and -inf give exactly 0; exp(0) is exactly 1.
    edge = np.array(exp_nonpositive(mx.array([-88.0, -1e4, -np.inf, 0.0], mx.float32)))
    assert edge.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_log_normalizer_matches_float64_logsumexp():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((7, 5000)) * 6).astype(np.float32)
    z[3, :4000] = -np.inf  # masked entries are allowed
    m, e, lse = log_normalizer(mx.array(z))
    z64 = z.astype(np.float64)
    ref = np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1)) + z64.max(1)
    assert np.abs(np.array(lse)[:, 0] - ref).max() < 1e-5
    assert np.array_equal(np.array(m)[:, 0], z.max(1))


# ---------------------------------------------------------------- penalties


def test_penalty_counts_per_row_with_padding():
    context = mx.array([[3, 3, 1, 0], [0, 0, 2, 2]], mx.int32)
    valid = mx.array([[1, 1, 1, 1], [0, 0, 1, 1]], mx.float32)
    counts = np.array(penalty_counts(context, valid, 5))
    assert counts.tolist() == [[1, 1, 0, 2, 0], [0, 0, 2, 0, 0]]


def test_penalties_against_hand_computed_logits():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0, -2.0]])
    counts = mx.array([[2.0, 1.0, 0.0, 1.0, 0.0]])  # token 0 twice, tokens 1 and 3 once
    rep = np.array(apply_penalties(logits, counts, repetition_penalty=2.0))
    assert rep.tolist() == [[1.0, -2.0, 0.5, 1.5, -2.0]]
    pres = np.array(apply_penalties(logits, counts, presence_penalty=0.5))
    assert pres.tolist() == [[1.5, -1.5, 0.5, 2.5, -2.0]]
    freq = np.array(apply_penalties(logits, counts, frequency_penalty=0.25))
    assert freq.tolist() == [[1.5, -1.25, 0.5, 2.75, -2.0]]
    # All three, in mlx-lm's order (repetition, presence, frequency):
    allp = np.array(
        apply_penalties(
            logits, counts, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25
        )
    )
    assert np.allclose(allp, [[1.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 0.5, 1.5 - 0.5 - 0.25, -2.0]])


def test_penalties_are_per_row_and_match_mlx_lm_processors():
    rng = np.random.default_rng(1)
    V, C = 50, 6
    logits = rng.standard_normal((3, V)).astype(np.float32) * 3
    contexts = [[1, 2, 2, 7, 9, 1], [4, 4, 4, 4, 0, 49], [10, 11, 12, 13, 14, 15]]
    kw = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
    counts = penalty_counts(mx.array(contexts, mx.int32), mx.ones((3, C)), V)
    got = np.array(apply_penalties(mx.array(logits), counts, **kw))
    procs = make_logits_processors(
        repetition_penalty=kw["repetition_penalty"], repetition_context_size=C,
        presence_penalty=kw["presence_penalty"], presence_context_size=C,
        frequency_penalty=kw["frequency_penalty"], frequency_context_size=C,
    )  # fmt: skip
    for r in range(3):
        row = mx.array(logits[r : r + 1])
        for p in procs:
            row = p(mx.array(contexts[r]), row)
        assert np.allclose(got[r], np.array(row)[0], atol=1e-6)


# ---------------------------------------------------------------- inverse-CDF sampling


@pytest.mark.parametrize("v,block", [(8, 256), (1000, 256), (37, 4)])
def test_inverse_cdf_frequencies(v, block):
    rng = np.random.default_rng(v)
    w = rng.random(v) ** 3
    w[rng.random(v) < 0.3] = 0.0  # zero weights must never be drawn
    u = mx.random.uniform(shape=(DRAWS,), key=mx.random.key(3))
    tokens = np.array(
        sample_inverse_cdf(mx.broadcast_to(mx.array(w, mx.float32), (DRAWS, v)), u, block)
    )
    assert_frequencies(tokens, w / w.sum())


def test_inverse_cdf_extreme_uniforms_hit_positive_weights():
    w = mx.array([[0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0]] * 3)
    u = mx.array([0.0, 0.9999999, 1.0 / 3.0 - 1e-7])
    assert np.array(sample_inverse_cdf(w, u, block=2)).tolist() == [4, 2, 4]


# ---------------------------------------------------------------- samplers


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_frequencies_and_logprobs(temperature):
    tokens, out = draw(LOGITS, SamplingConfig(temperature=temperature))
    expected = softmax64(LOGITS, temperature)
    assert_frequencies(tokens, expected)
    ref = np.log(expected)[tokens]
    assert np.abs(np.array(out.logprobs) - ref).max() < 1e-5
    # No truncation: the distribution sampled from is the behaviour distribution.
    assert np.array_equal(np.array(out.truncated_logprobs), np.array(out.logprobs))


def test_greedy_is_argmax_with_untempered_logprobs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 300)).astype(np.float32) * 4
    out = TokenSampler(SamplingConfig(temperature=0.0, top_k=3, top_p=0.5), 300)(
        mx.array(x), uniforms(64)
    )
    tokens = np.array(out.tokens)
    assert np.array_equal(tokens, x.argmax(1))
    ref = np.log(softmax64(x[0]))  # T = 1 at greedy
    assert abs(float(out.logprobs[0]) - ref[tokens[0]]) < 1e-5
    assert np.all(np.array(out.truncated_logprobs) == 0.0)  # greedy: a point mass


def truncated_expected(p, keep):
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def test_top_k():
    p = softmax64(LOGITS, 0.8)
    tokens, out = draw(LOGITS, SamplingConfig(temperature=0.8, top_k=3))
    keep = np.zeros(len(p), bool)
    keep[np.argsort(-p)[:3]] = True
    q = truncated_expected(p, keep)
    assert_frequencies(tokens, q)
    assert np.abs(np.array(out.truncated_logprobs) - np.log(q[tokens])).max() < 1e-5
    assert np.abs(np.array(out.logprobs) - np.log(p[tokens])).max() < 1e-5


def test_top_p_keeps_the_smallest_nucleus():
    p = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = np.log(p)
    # Mass above token 2 is 0.8 < 0.85 (kept); above token 3 it is 0.9 >= 0.85 (dropped).
    tokens, out = draw(logits, SamplingConfig(temperature=1.0, top_p=0.85))
    q = truncated_expected(p, np.array([1, 1, 1, 0, 0], bool))
    assert_frequencies(tokens, q)
    assert np.abs(np.array(out.truncated_logprobs) - np.log(q[tokens])).max() < 1e-5


def test_top_p_thresholds_match_a_float64_reference_on_a_large_vocab():
    rng = np.random.default_rng(5)
    z = (rng.standard_normal((12, 20_000)) * 4).astype(np.float32)
    z[0, :] = z[0, 0]  # all tied: everything is kept
    z[1, 100:] = -np.inf  # already truncated entries are ignored
    for top_p in (0.5, 0.9, 0.99):
        kept = (z >= top_p_thresholds(z, top_p)[:, None]).sum(1)
        p = np.exp(z.astype(np.float64) - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ps = -np.sort(-p, axis=1)
        ref = ((np.cumsum(ps, 1) - ps) < top_p).sum(1)
        ref[0] = z.shape[1]
        assert np.array_equal(kept, ref)


def test_min_p():
    p = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    tokens, _ = draw(np.log(p), SamplingConfig(temperature=1.0, min_p=0.3))  # keep p >= 0.12
    assert_frequencies(tokens, truncated_expected(p, p >= 0.3 * 0.4))


def test_top_k_top_p_min_p_chain_applies_after_temperature():
    cfg = SamplingConfig(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05)
    p = softmax64(LOGITS, 0.7)
    keep = np.zeros(len(p), bool)
    keep[np.argsort(-p)[:6]] = True
    q = truncated_expected(p, keep)  # top-k
    order = np.argsort(-q)
    mass_above = np.concatenate([[0.0], np.cumsum(q[order])[:-1]])
    nucleus = np.zeros(len(p), bool)
    nucleus[order[mass_above < 0.9]] = True
    q = truncated_expected(q, nucleus)  # top-p
    q = truncated_expected(q, q >= 0.05 * q.max())  # min-p
    tokens, out = draw(LOGITS, cfg)
    assert_frequencies(tokens, q)
    assert np.abs(np.array(out.truncated_logprobs) - np.log(q[tokens])).max() < 1e-5


def test_xtc_removes_top_choices_except_the_least_likely_per_row():
    p = np.array([0.45, 0.3, 0.12, 0.08, 0.05])
    # Above 0.1: tokens 0, 1, 2 -> 0 and 1 are removed, 2 (the least likely of them) stays.
    always, _ = draw(np.log(p), SamplingConfig(temperature=1.0, xtc_probability=1.0))
    assert_frequencies(always, truncated_expected(p, np.array([0, 0, 1, 1, 1], bool)))
    # Probability 0.5: each row flips its own coin, so the result is the 50/50 mixture.
    half, _ = draw(np.log(p), SamplingConfig(temperature=1.0, xtc_probability=0.5), seed=4)
    mix = 0.5 * p + 0.5 * truncated_expected(p, np.array([0, 0, 1, 1, 1], bool))
    assert_frequencies(half, mix)
    # Protected tokens (EOS, newline) are never removed.
    prot, _ = draw(np.log(p), SamplingConfig(temperature=1.0, xtc_probability=1.0), protected=[0])
    assert_frequencies(prot, truncated_expected(p, np.array([1, 0, 1, 1, 1], bool)))


def test_penalised_sampling_distribution_and_both_logprobs():
    logits = np.array([1.0, 0.5, -0.5, 2.0, 0.0], np.float32)
    cfg = SamplingConfig(temperature=0.9, repetition_penalty=1.5, frequency_penalty=0.3)
    n = DRAWS
    x = mx.broadcast_to(mx.array(logits)[None], (n, 5))
    counts = mx.broadcast_to(mx.array([[0.0, 0.0, 1.0, 2.0, 0.0]]), (n, 5))
    out = TokenSampler(cfg, 5)(x, uniforms(n, 9), counts)
    tokens = np.array(out.tokens)
    pen = logits.astype(np.float64).copy()
    pen[2] = -0.5 * 1.5 - 0.3
    pen[3] = 2.0 / 1.5 - 0.6
    q = softmax64(pen, 0.9)
    assert_frequencies(tokens, q)
    assert np.abs(np.array(out.truncated_logprobs) - np.log(q[tokens])).max() < 1e-5
    # The behaviour log-prob ignores penalties: log_softmax(logits / T).
    assert np.abs(np.array(out.logprobs) - np.log(softmax64(logits, 0.9))[tokens]).max() < 1e-5


def test_step_uniforms_depend_only_on_key_and_row():
    key = mx.random.key(1)
    full = np.array(step_uniforms(key, mx.arange(6), 6))
    part = np.array(step_uniforms(key, mx.array([1, 4, 5]), 6))
    assert full.shape == (2, 6) and np.array_equal(part, full[:, [1, 4, 5]])
    assert not np.array_equal(np.array(step_uniforms(mx.random.key(2), mx.arange(6), 6)), full)
    x = mx.array(np.random.default_rng(0).standard_normal((256, 100)).astype(np.float32))
    s = TokenSampler(SamplingConfig(temperature=1.0, top_k=20), 100)
    a = np.array(s(x, step_uniforms(key, mx.arange(256), 256)).tokens)
    b = np.array(s(x, step_uniforms(key, mx.arange(256), 256)).tokens)
    c = np.array(s(x, step_uniforms(mx.random.key(2), mx.arange(256), 256)).tokens)
    assert np.array_equal(a, b)
    assert (a != c).mean() > 0.5


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 1.0),
        ("xtc_probability", 1.2),
        ("xtc_threshold", 0.7),
        ("repetition_penalty", 0.0),
        ("repetition_context_size", 0),
        ("presence_penalty", math.nan),
        ("max_new_tokens", 0),
        ("stop", "</answer>"),
        ("stop", [""]),
    ],
)
def test_invalid_sampling_config_names_the_field(field, value):
    with pytest.raises(MlxRftError, match=field):
        validate_sampling(SamplingConfig(**{field: value}))


def test_top_k_at_or_above_vocab_is_off():
    tokens, out = draw(LOGITS, SamplingConfig(temperature=1.0, top_k=len(LOGITS)))
    assert_frequencies(tokens, softmax64(LOGITS))
