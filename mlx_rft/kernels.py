"""CPU paths around MLX's slow `exp`: SwiGLU and the vocabulary-wide log-softmax.

On MLX's CPU backend `mx.exp` (and `sigmoid`, `silu`, `softmax`, which use it) costs ~12 ns per
element, against ~0.3 ns for an add. Two remedies, each checked against float64 in
tests/test_kernels.py:

* NumPy, whose `exp` is vectorised (~0.9 ns per element), for large blocks: the SwiGLU of prefill
  and training passes (a [1664, 1536] block: ~8 against ~45 ms) and the log-softmax over the
  vocabulary in `algo/logprobs.py` (logsumexp forward, softmax in its backward). Going through the
  host syncs, so these are custom functions whose VJPs need no further sync: a sync inside the
  backward pass would evaluate it piecewise, and under `grad` every evaluated array keeps its
  inputs alive (the memory of the whole backward at once).
* `exp_nonpositive`, a polynomial exp of adds and multiplies that MLX's compiler fuses, for small
  blocks where a sync would stall the pipelined decode loop: the decode-step SwiGLU (16 x 1536:
  0.17 against 0.46 ms per layer) and the sampler's per-step exponentials (~3 ns per element on
  [16, 49152], within 1e-7 relative of float64; on large arrays it is no faster than `mx.exp`).

`install(model)` points the `swiglu` name that mlx-lm's model files call at `swiglu` below
(process-wide, for the modules that define `model`'s layers); `load_model` and the rollout engine
call it. CPU only: on GPUs every function here falls through to MLX. MLX_RFT_FAST_KERNELS=0 keeps
mlx-lm's function.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import mlx.core as mx
import numpy as np

_LN2_HI = 0.693359375  # ln 2 split in two (Cody-Waite) so n * _LN2_HI is exact in float32
_LN2_LO = -2.12194440e-4
_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds a float32 |t| < 2**22 to an integer
_EXP_UNDERFLOW = -87.0  # exp(-87) ~ 1.6e-38: below this float32 results are ~0 anyway


@partial(mx.compile, shapeless=True)
def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    # exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by a degree-7 Taylor
    # polynomial (truncation error < 2e-8 relative); 2^n as the float32 bit pattern (n + 127) << 23.
    # The rounding uses the 1.5 * 2^23 trick rather than floor so the fused loop stays branch-free.
    xc = mx.maximum(x, _EXP_UNDERFLOW)
    n = (xc * _LOG2E + _ROUND) - _ROUND
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 5040.0
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + c
    return p, (n.astype(mx.int32) + 127) << 23


@partial(mx.compile, shapeless=True)
def _exp_scale(x: mx.array, p: mx.array, scale: mx.array) -> mx.array:
    return mx.where(x < _EXP_UNDERFLOW, 0.0, p * scale)


def _exp_poly(x: mx.array) -> mx.array:
    p, bits = _exp_parts(x)
    # The bit cast sits between two compiled pieces: a view has no shapeless form.
    return _exp_scale(x, p, bits.view(mx.float32))


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0 (including -inf -> 0), within a few ulp of `mx.exp`.

    On the CPU backend this fused polynomial is ~4x faster than `mx.exp` on cache-sized blocks;
    on GPUs `mx.exp` is already fast and exact, so it is used directly.
    """
    if on_cpu() and x.dtype == mx.float32:
        return _exp_poly(x)
    return mx.exp(x)


# ---------------------------------------------------------------- SwiGLU: silu(gate) * x


@partial(mx.compile, shapeless=True)
def _sigmoid_from(gate: mx.array, e: mx.array) -> mx.array:
    # e = exp(-|gate|) <= 1, so neither branch overflows
    return mx.where(gate >= 0, 1.0, e) / (1.0 + e)


@partial(mx.compile, shapeless=True)
def _swiglu_grads(gate, x, sig, c):
    silu = gate * sig
    # d silu / d gate = sig * (1 + gate * (1 - sig))
    return c * x * (sig + silu * (1.0 - sig)), c * silu


@mx.custom_function
def _swiglu(gate: mx.array, x: mx.array) -> mx.array:
    sig = _sigmoid_from(gate, exp_nonpositive(-mx.abs(gate)))
    return gate * sig * x


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    return _swiglu_grads(gate, x, _sigmoid_from(gate, exp_nonpositive(-mx.abs(gate))), cotangent)


def host(a: mx.array) -> np.ndarray:
    """Evaluate `a` and view it as a NumPy array (no copy when it is already row-contiguous)."""
    return np.asarray(mx.contiguous(a))


@mx.custom_function
def _swiglu_host(gate: mx.array, x: mx.array) -> tuple[mx.array, mx.array]:
    # Returns (silu(gate) * x, sigmoid(gate)); the sigmoid is kept for the VJP, so the backward
    # pass needs no exp and no sync (a sync there would evaluate the backward piecewise, and inside
    # `grad` every evaluated array keeps its inputs alive until the end).
    g, u = host(gate), host(x)
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88 gives sigmoid 0, as it should
        sig = 1.0 / (1.0 + np.exp(-g))
    return mx.array(g * sig * u, dtype=gate.dtype), mx.array(sig, dtype=gate.dtype)


@_swiglu_host.vjp
def _swiglu_host_vjp(primals, cotangents, outputs):
    gate, x = primals
    return _swiglu_grads(gate, x, outputs[1], cotangents[0])


# Inputs up to this many elements take the polynomial path (a 16-row decode step has 16 x 1536);
# larger ones (prefill, training) go through NumPy, whose exp is vectorised.
SMALL_INPUT = 1 << 16


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's `activations.swiglu`."""
    if not (on_cpu() and gate.dtype == x.dtype == mx.float32 and gate.shape == x.shape):
        return mlx_lm_swiglu()(gate, x)
    return _swiglu(gate, x) if gate.size <= SMALL_INPUT else _swiglu_host(gate, x)[0]


# ---------------------------------------------------------------- vocabulary-wide log-softmax


def host_ok(z: mx.array) -> bool:
    """Whether the NumPy path below applies: [K, V] float32/float64 logits on the CPU."""
    return on_cpu() and z.dtype in (mx.float32, mx.float64) and z.ndim == 2


def _host_shifted_exp(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exp(z - max), max) along the last axis, max kept; a new array, z is untouched."""
    m = z.max(axis=-1, keepdims=True)
    t = z - m
    np.exp(t, out=t)
    return t, m


def _host_lse(z: np.ndarray) -> np.ndarray:
    t, m = _host_shifted_exp(z)
    return (m + np.log(t.sum(axis=-1, keepdims=True)))[:, 0]


@mx.custom_function
def _logsumexp_host(z: mx.array) -> mx.array:
    return mx.array(_host_lse(host(z)), dtype=z.dtype)


@_logsumexp_host.vjp
def _logsumexp_host_vjp(z, cotangent, output):
    t = host(z) - host(output)[:, None]
    np.exp(t, out=t)
    t *= host(cotangent)[:, None]
    return (mx.array(t, dtype=z.dtype),)


def logsumexp(z: mx.array) -> mx.array:
    """logsumexp over the last axis of [K, V] logits (differentiable)."""
    return _logsumexp_host(z) if host_ok(z) else mx.logsumexp(z, axis=-1)


def softmax(z: mx.array) -> mx.array:
    """softmax over the last axis of [K, V] logits (no gradient)."""
    if not host_ok(z):
        return mx.softmax(z, axis=-1, precise=True)
    t, _ = _host_shifted_exp(host(z))
    t /= t.sum(axis=-1, keepdims=True)
    return mx.array(t, dtype=z.dtype)


def selective_logsoftmax(
    z: mx.array, targets: mx.array, with_entropy: bool
) -> tuple[mx.array, mx.array | None]:
    """log softmax(z)[targets] and (optionally) the entropy of softmax(z), for [K, V] logits on
    the CPU, as new arrays with no graph behind them (callers supply their own VJP)."""
    t = host(z)
    rows = np.arange(t.shape[0])
    chosen = t[rows, host(targets)]
    lse = _host_lse(t)
    entropy = None
    if with_entropy:
        p = t - lse[:, None]  # log p
        ent = -(np.exp(p) * p).sum(axis=-1)
        entropy = mx.array(ent, dtype=z.dtype)
    return mx.array(chosen - lse, dtype=z.dtype), entropy


def detach(a: mx.array) -> mx.array:
    """A copy of `a` with no graph behind it. Inside a transformation (grad), evaluated arrays keep
    their inputs alive; a chunked VJP that syncs per chunk detaches each chunk's results so the
    chunk's buffers can be freed."""
    return mx.array(host(a), dtype=a.dtype)


def selective_logsoftmax_cotangent(z: mx.array, targets: mx.array, g: mx.array) -> mx.array:
    """g[:, None] * (onehot(targets) - softmax(z)): the cotangent of z for g = d loss / d logp."""
    if not host_ok(z):
        onehot = mx.arange(z.shape[-1]) == targets[:, None]
        return g[:, None] * (onehot - mx.softmax(z, axis=-1, precise=True))
    t, _ = _host_shifted_exp(host(z))
    gn = host(g).astype(t.dtype)
    t *= (-gn / t.sum(axis=-1))[:, None]
    t[np.arange(t.shape[0]), host(targets)] += gn
    return mx.array(t, dtype=z.dtype)


def row_sum(x: mx.array) -> mx.array:
    """Sum over the last axis, keeping it; on the CPU accumulated in float64.

    MLX's CPU float32 sum over a 49,152-entry vocabulary row is off by up to ~2.5e-4 relative
    (log-probs off by as much); in float64 the error is ~1e-9, for ~0.4 ms more on [16, 49152].
    """
    if on_cpu() and x.dtype == mx.float32:
        return mx.sum(x.astype(mx.float64), axis=-1, keepdims=True).astype(mx.float32)
    return mx.sum(x, axis=-1, keepdims=True)


def log_normalizer(z: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(max, exp(z - max), logsumexp) along the last axis; max and logsumexp keep the axis."""
    m = mx.max(z, axis=-1, keepdims=True)
    e = exp_nonpositive(z - m)
    return m, e, m + mx.log(row_sum(e))


# ---------------------------------------------------------------- installing into a model


def mlx_lm_swiglu():
    """mlx-lm's own SwiGLU (`install` patches the model modules' globals, never this one)."""
    from mlx_lm.models.activations import swiglu as stock

    return stock


def enabled() -> bool:
    return on_cpu() and os.environ.get("MLX_RFT_FAST_KERNELS", "1").strip() not in ("0", "false", "no")


def install(model) -> list[str]:
    """Point the mlx-lm modules that define `model`'s layers at `swiglu`; returns what it patched.

    Only a module global `swiglu` that is still mlx-lm's own function is replaced, so this is
    idempotent. The change is process-wide for those modules (their other models use it too);
    `swiglu` falls back to mlx-lm's function off the CPU or for non-float32 inputs.
    """
    if not enabled():
        return []
    stock = mlx_lm_swiglu()
    names = {type(m).__module__ for m in model.modules()} | {type(model).__module__}
    patched = []
    for name in sorted(names):
        module = sys.modules.get(name)
        if name.startswith("mlx_lm.models.") and getattr(module, "swiglu", None) is stock:
            module.swiglu = swiglu
            patched.append(f"{name}.swiglu")
    return patched


def uninstall() -> list[str]:
    """Undo `install` everywhere (benchmarks use it to time mlx-lm's own functions)."""
    stock, restored = mlx_lm_swiglu(), []
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(module, "swiglu", None) is swiglu:
            module.swiglu = stock
            restored.append(f"{name}.swiglu")
    return restored
