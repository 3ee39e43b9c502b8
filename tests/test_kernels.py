"""The CPU fast paths in mlx_rft.kernels against float64 references and mlx-lm's own functions."""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from mlx_rft import kernels


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


@pytest.mark.parametrize("shape", [(16, 1, 96), (3, 7, 40)])
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


def test_large_inputs_use_mlx_lm_function():
    from mlx_lm.models.activations import swiglu as stock

    n = kernels.SMALL_INPUT + 1
    g = mx.random.normal((n,), key=mx.random.key(0)) * 4
    x = mx.random.normal((n,), key=mx.random.key(1))
    # Bit-identical: the stock path, not the polynomial one.
    assert mx.array_equal(kernels.swiglu(g, x), stock(g, x)).item()


def test_install_patches_the_model_module_once_and_can_be_disabled(tiny_qwen3, monkeypatch):
    from mlx_rft.models import load_model

    model, _ = load_model(tiny_qwen3)
    qwen3 = importlib.import_module("mlx_lm.models.qwen3")
    stock = kernels._stock_fn("swiglu")
    monkeypatch.setattr(qwen3, "swiglu", stock)  # undone after the test

    monkeypatch.setenv("MLX_RFT_FAST_KERNELS", "0")
    assert kernels.install(model) == [] and qwen3.swiglu is stock

    monkeypatch.delenv("MLX_RFT_FAST_KERNELS")
    tokens = mx.array([[1, 5, 9, 30, 2]])
    before = model(tokens)
    assert kernels.install(model) == ["mlx_lm.models.qwen3.swiglu"]
    assert qwen3.swiglu is kernels.swiglu
    assert kernels.install(model) == []  # already installed
    after = model(tokens)
    assert mx.abs(after - before).max().item() < 1e-4
