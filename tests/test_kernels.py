"""The CPU fast paths in mlx_rft.cpu.kernels against float64 references and mlx-lm's own functions."""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from mlx_rft.cpu import kernels


def _silu_mul64(g, x):
    g, x = g.astype(np.float64), x.astype(np.float64)
    return g / (1.0 + np.exp(-g)) * x


def test_exp_nonpositive_wide_range_against_float64():
    x = -np.abs(np.random.default_rng(0).standard_normal(20000) * 30).astype(np.float32)
    x[:4] = [0.0, -1e-30, -86.9, -87.1]
    got = np.array(kernels.exp_nonpositive(mx.array(x))).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    keep = ref > 1e-37  # below float32's normal range both are ~0
    assert np.max(np.abs(got[keep] - ref[keep]) / ref[keep]) < 3e-7
    assert np.all(got[~keep] < 1e-36)


# The first two take the polynomial path, the last (over SMALL_INPUT elements) the NumPy one.
@pytest.mark.parametrize("shape", [(16, 1, 96), (3, 7, 40), (2, 300, 130)])
def test_swiglu_matches_float64_and_mlx_lm_values_and_gradients(shape):
    from mlx_lm.models.activations import swiglu as stock

    rng = np.random.default_rng(1)
    g = (rng.standard_normal(shape) * 6).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    g[0, 0, :4] = [0.0, -40.0, 40.0, -1e-8]
    ours = np.array(kernels.swiglu(mx.array(g), mx.array(x)))
    np.testing.assert_allclose(ours, _silu_mul64(g, x), rtol=2e-6, atol=1e-7)

    w = mx.array(rng.standard_normal(shape).astype(np.float32))

    def grads(fn):
        return mx.grad(lambda a, b: (fn(a, b) * w).sum(), argnums=(0, 1))(mx.array(g), mx.array(x))

    # float64 reference gradients: d/dg = x * sig * (1 + g (1 - sig)), d/dx = silu(g)
    g64, x64, w64 = g.astype(np.float64), x.astype(np.float64), np.array(w).astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-g64))
    ref = (w64 * x64 * sig * (1 + g64 * (1 - sig)), w64 * g64 * sig)
    for got, want, stock_grad in zip(grads(kernels.swiglu), ref, grads(stock)):
        np.testing.assert_allclose(np.array(got), want, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(got), np.array(stock_grad), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vocab_logsumexp_softmax_and_cotangent_against_float64(dtype):
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((5, 700)) * 7).astype(dtype)
    z[0, 3] = 90.0  # one dominant logit
    targets = np.array([3, 0, 699, 17, 17])
    g = rng.standard_normal(5).astype(np.float32)
    z64 = z.astype(np.float64)
    lse = np.log(np.exp(z64 - z64.max(-1, keepdims=True)).sum(-1)) + z64.max(-1)
    p = np.exp(z64 - lse[:, None])
    tol = 2e-6 if dtype == np.float32 else 1e-12
    mdt = mx.float32 if dtype == np.float32 else mx.float64

    np.testing.assert_allclose(np.array(kernels.logsumexp(mx.array(z, dtype=mdt))), lse, rtol=tol)
    onehot = np.eye(700)[targets]
    got = np.array(kernels.selective_logsoftmax_cotangent(
        mx.array(z, dtype=mdt), mx.array(targets), mx.array(g)
    ))
    np.testing.assert_allclose(got, g[:, None] * (onehot - p), rtol=tol * 5, atol=tol)
    # The gradient of logsumexp is the softmax, weighted by the cotangent.
    w = mx.array(g, dtype=mdt)
    grad = mx.grad(lambda a: (kernels.logsumexp(a) * w).sum())(mx.array(z, dtype=mdt))
    np.testing.assert_allclose(np.array(grad), g[:, None] * p, rtol=tol * 5, atol=tol)


def test_row_sum_is_accurate_over_a_vocabulary_row():
    # All-positive terms, as in a softmax normaliser: MLX's CPU float32 sum drifts by ~1e-4 here.
    rng = np.random.default_rng(3)
    e = np.exp(-np.abs(rng.standard_normal((4, 49152)) * 3)).astype(np.float32)
    got = np.array(kernels.row_sum(mx.array(e)))[:, 0].astype(np.float64)
    ref = e.astype(np.float64).sum(axis=-1)
    assert np.max(np.abs(got / ref - 1)) < 1e-6


def _attention_f64(q, k, v, scale, keep=None, additive=None):
    """Reference attention in float64 NumPy: q [B, H, L, D], k/v [B, Hkv, S, D]."""
    r = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, r, axis=1), np.repeat(v, r, axis=1)
    s = scale * q @ np.swapaxes(k, -1, -2)
    if additive is not None:
        s = s + additive
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v


@pytest.mark.parametrize("kind", ["causal", "bool", "additive", "none"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])  # grouped-query and plain multi-head
def test_attention_matches_float64_and_mlx_values_and_gradients(kind, heads):
    H, Hk = heads
    B, L, S, D, scale = 2, 5, 9, 8, 0.35  # L < S: queries continue a cached prefix
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=s) for s in ((B, H, L, D), (B, Hk, S, D), (B, Hk, S, D)))
    w = rng.normal(size=(B, H, L, D))
    causal = np.tri(L, S, S - L, dtype=bool)
    keep = additive = None
    if kind == "causal":
        mask, keep = "causal", causal
    elif kind == "bool":  # per-row masks, e.g. left padding, as [B, 1, L, S]
        keep = np.broadcast_to(causal, (B, 1, L, S)).copy()
        keep[1, :, :, :2] = False
        mask = mx.array(keep)
    elif kind == "additive":
        additive = np.where(causal, 0.0, -1e9) + rng.normal(size=(L, S))
        mask = mx.array(additive.astype(np.float32))
    else:
        mask = None

    def ref_loss(q, k, v):
        return (_attention_f64(q, k, v, scale, keep, additive) * w).sum()

    def numeric_grad(i, eps=1e-6):  # central differences in float64
        args, g = [q, k, v], np.zeros_like([q, k, v][i])
        for idx in np.ndindex(g.shape):
            for sign in (1, -1):
                a = [x.copy() for x in args]
                a[i][idx] += sign * eps
                g[idx] += sign * ref_loss(*a) / (2 * eps)
        return g

    mq, mk, mv = (mx.array(x.astype(np.float32)) for x in (q, k, v))
    mw = mx.array(w.astype(np.float32))

    def loss(attn):
        return lambda q, k, v: (attn(q, k, v, None, scale=scale, mask=mask) * mw).sum()

    ours = kernels.scaled_dot_product_attention(mq, mk, mv, None, scale=scale, mask=mask)
    np.testing.assert_allclose(np.array(ours), _attention_f64(q, k, v, scale, keep, additive), atol=2e-6)
    grads = mx.grad(loss(kernels.scaled_dot_product_attention), argnums=(0, 1, 2))(mq, mk, mv)
    stock = mx.grad(loss(kernels.mlx_lm_attention()), argnums=(0, 1, 2))(mq, mk, mv)
    for i, (g, s) in enumerate(zip(grads, stock)):
        np.testing.assert_allclose(np.array(g), numeric_grad(i), atol=2e-5)
        np.testing.assert_allclose(np.array(g), np.array(s), atol=2e-5)


def test_attention_keeps_mlx_for_decode_steps_and_other_dtypes():
    q = mx.random.normal((1, 4, 1, 8))
    k = mx.random.normal((1, 2, 6, 8))
    stock = kernels.mlx_lm_attention()(q, k, k, None, scale=0.3, mask=None)
    assert mx.array_equal(kernels.scaled_dot_product_attention(q, k, k, None, scale=0.3, mask=None), stock)
    q16, k16 = mx.random.normal((1, 4, 3, 8)).astype(mx.float16), k.astype(mx.float16)
    got = kernels.scaled_dot_product_attention(q16, k16, k16, None, scale=0.3, mask="causal")
    want = kernels.mlx_lm_attention()(q16, k16, k16, None, scale=0.3, mask="causal")
    assert got.dtype == mx.float16 and mx.array_equal(got, want)
