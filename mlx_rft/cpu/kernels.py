"""CPU paths around MLX's slow `exp`: SwiGLU, attention and the vocabulary-wide log-softmax.

On MLX's CPU backend `mx.exp` (and `sigmoid`, `silu`, `softmax`, which use it) costs ~12 ns per
element, against ~0.3 ns for an add. Two remedies, each checked against float64 in
tests/test_kernels.py:

* NumPy, whose `exp` is vectorised (~0.9 ns per element), for large blocks: the SwiGLU of prefill
  and training passes (a [1664, 1536] block: ~8 against ~45 ms), the attention softmax of those
  passes (0.6 s of a 6.7 s training pass of the default model, and 0.3 GB of its peak memory),
  and the log-softmax over the vocabulary in `algo/logprobs.py` (logsumexp forward, softmax in its
  backward). Going through the host syncs, so these are custom functions whose VJPs need no
  further sync: a sync inside the backward pass would evaluate it piecewise, and under `grad`
  every evaluated array keeps its inputs alive (the memory of the whole backward at once).
* `exp_nonpositive`, a polynomial exp of adds and multiplies that MLX's compiler fuses, for small
  blocks where a sync would stall the pipelined decode loop: the decode-step SwiGLU (16 x 1536:
  0.17 against 0.46 ms per layer) and the sampler's per-step exponentials (~3 ns per element on
  [16, 49152], within 1e-7 relative of float64; on large arrays it is no faster than `mx.exp`).

`patched(model)` is a block within which the `swiglu` and `scaled_dot_product_attention` names
that mlx-lm's model files call point at the functions below (for the modules that define `model`'s
layers); on exit they are mlx-lm's own again. `mlx_rft.cpu.speedups` enters it. CPU only: on GPUs
every function here falls through to MLX, and inside `graph_only()` (gradient checkpointing)
nothing syncs: SwiGLU, attention and the log-softmax use MLX's own ops. MLX_RFT_FAST_KERNELS=0
keeps mlx-lm's functions.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from contextlib import contextmanager
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


_graph_only = 0  # depth of nested `graph_only()` blocks


@contextmanager
def graph_only():
    """Within this block the functions here build MLX graphs only: no NumPy path, no host sync.

    Gradient checkpointing needs it. Inside `grad`, an array evaluated during the forward pass
    keeps its inputs alive, so a single sync pins every activation computed before it and the
    checkpointed layers would free nothing (their recomputation would sync piecewise as well).
    """
    global _graph_only
    _graph_only += 1
    try:
        yield
    finally:
        _graph_only -= 1


def host_paths() -> bool:
    """Whether the NumPy paths may run: on the CPU, outside `graph_only()`."""
    return on_cpu() and not _graph_only


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
    if gate.size <= SMALL_INPUT:
        return _swiglu(gate, x)
    if not host_paths():  # the polynomial's pieces would hold several arrays of this size
        return mlx_lm_swiglu()(gate, x)
    return _swiglu_host(gate, x)[0]


# ---------------------------------------------------------------- attention over several queries


def _host_attention_probs(scores: np.ndarray, scale: float, mask, L: int, r: int) -> np.ndarray:
    """softmax(scale * scores + mask) over the last axis, in NumPy, for grouped scores
    [B, Hkv, r * L, S] (row j of a group is query j % L of query head j // L)."""
    t = scores * np.float32(scale)
    S = t.shape[-1]
    # Masked scores become the lowest finite value, as in MLX: a fully masked row (a left-padding
    # query) gets uniform weights instead of NaN.
    low = np.finfo(t.dtype).min
    if isinstance(mask, str):  # "causal", aligned to the end: query i sees keys <= i + S - L
        keep = np.tri(L, S, S - L, dtype=bool)
        np.putmask(t, ~np.broadcast_to(np.tile(keep, (r, 1)), t.shape), low)
    elif mask is not None:
        Hk = t.shape[1]
        m = np.broadcast_to(mask, (mask.shape[0] if mask.ndim == 4 else 1, Hk * r, L, S))
        m = m.reshape(m.shape[0], Hk, r * L, S)
        if m.dtype == np.bool_:
            np.putmask(t, ~np.broadcast_to(m, t.shape), low)
        else:
            t += m
    t -= t.max(axis=-1, keepdims=True)
    np.exp(t, out=t)
    t /= t.sum(axis=-1, keepdims=True)
    return t


def _attention_fn(scale: float, mask, shape: tuple[int, ...], kv_heads: int):
    B, H, L, D = shape
    r = H // kv_heads

    def grouped(x):  # [B, H, L, D] -> [B, Hkv, r * L, D]: the queries that share a key/value head
        return x.reshape(B, kv_heads, r * L, x.shape[-1])

    @mx.custom_function
    def attend(q, k, v):
        scores = grouped(q) @ k.swapaxes(-1, -2)
        host_mask = mask if mask is None or isinstance(mask, str) else host(mask)
        probs = mx.array(_host_attention_probs(host(scores), scale, host_mask, L, r), dtype=q.dtype)
        return (probs @ v).reshape(B, H, L, v.shape[-1]), probs

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        # Only MLX ops (no sync): the softmax VJP needs the probabilities, not another exp.
        q, k, v = primals
        probs = outputs[1]
        dout = grouped(cotangents[0])
        dp = dout @ v.swapaxes(-1, -2)
        ds = probs * (dp - (dp * probs).sum(axis=-1, keepdims=True)) * scale
        dq = (ds @ k).reshape(q.shape)
        return dq, ds.swapaxes(-1, -2) @ grouped(q), probs.swapaxes(-1, -2) @ dout

    return attend


# Query blocks of at least this many rows take the NumPy softmax (prefill and training passes);
# decode steps (one query) keep MLX's fused kernel, whose softmax over a few hundred keys is cheap.
MIN_HOST_QUERIES = 2


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's `base.scaled_dot_product_attention` with the softmax of multi-query blocks in NumPy.

    MLX's CPU `mx.fast.scaled_dot_product_attention` falls back to separate ops: a scaled copy of
    the queries, the scores, the masked scores, a softmax with the scalar exp, and their VJPs. Here
    the scores come from one matmul, the softmax (mask included) runs in NumPy, and the custom VJP
    keeps only q, k, v and the probabilities. Decode steps, attention sinks, quantized caches,
    non-float32 inputs, other devices and `graph_only()` blocks use mlx-lm's function.
    """
    if (
        sinks is not None or hasattr(cache, "bits") or not host_paths() or queries.dtype != mx.float32
        or keys.dtype != mx.float32 or queries.shape[2] < MIN_HOST_QUERIES
        or queries.shape[1] % keys.shape[1]
    ):
        return mlx_lm_attention()(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    fn = _attention_fn(float(scale), mask, tuple(queries.shape), keys.shape[1])
    return fn(queries, keys, values)[0]


# ---------------------------------------------------------------- vocabulary-wide log-softmax


def host_ok(z: mx.array) -> bool:
    """Whether the NumPy path below applies: [K, V] float32/float64 logits on the CPU, outside
    `graph_only()`."""
    return host_paths() and z.dtype in (mx.float32, mx.float64) and z.ndim == 2


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


# ---------------------------------------------------------------- patching mlx-lm's model modules


def mlx_lm_swiglu():
    """mlx-lm's own SwiGLU (`patched` swaps the model modules' globals, never this one)."""
    from mlx_lm.models.activations import swiglu as stock

    return stock


def mlx_lm_attention():
    """mlx-lm's own `base.scaled_dot_product_attention`."""
    from mlx_lm.models.base import scaled_dot_product_attention as stock

    return stock


PATCHABLE = ("swiglu", "scaled_dot_product_attention")


def enabled() -> bool:
    return on_cpu() and os.environ.get("MLX_RFT_FAST_KERNELS", "1").strip() not in ("0", "false", "no")


def _patches() -> dict:
    """Module-global names in mlx-lm's model files -> (mlx-lm's function, ours)."""
    return {
        "swiglu": (mlx_lm_swiglu(), swiglu),
        "scaled_dot_product_attention": (mlx_lm_attention(), scaled_dot_product_attention),
    }


_lock = threading.Lock()
_holders: Counter = Counter()  # (module name, global name) -> open `patched` blocks that swapped it


def _targets(model, names) -> list[tuple[str, str]]:
    if model is None:  # every mlx-lm model module imported so far
        modules = [n for n, m in list(sys.modules.items()) if m is not None]
    else:
        modules = {type(m).__module__ for m in model.modules()} | {type(model).__module__}
    # Not the modules that define mlx-lm's functions: those stay the reference to restore.
    own = ("mlx_lm.models.activations", "mlx_lm.models.base")
    return [(m, a) for m in sorted(modules) if m.startswith("mlx_lm.models.") and m not in own
            for a in names]


@contextmanager
def patched(model=None, names=PATCHABLE):
    """Within this block mlx-lm's model modules call `swiglu` and `scaled_dot_product_attention`
    from here; yields the "module.name" globals swapped.

    The modules are those that define `model`'s layers (with `model=None`: every `mlx_lm.models.*`
    module imported at entry). Only a global that holds mlx-lm's own function is swapped, and it is
    mlx-lm's again once the last block holding it exits, so blocks nest, may overlap from several
    threads, and leave a global someone else replaced alone. Both functions fall back to mlx-lm's
    off the CPU or for inputs they do not cover. Does nothing when `enabled()` is false.
    """
    held = []
    if enabled():
        patches = {a: p for a, p in _patches().items() if a in names}
        with _lock:
            for module_name, attr in _targets(model, patches):
                module = sys.modules.get(module_name)
                stock, ours = patches[attr]
                current = getattr(module, attr, None)
                if current is stock or (current is ours and _holders[module_name, attr]):
                    setattr(module, attr, ours)
                    _holders[module_name, attr] += 1
                    held.append((module_name, attr))
    try:
        yield [f"{m}.{a}" for m, a in held]
    finally:
        if held:
            patches = _patches()
            with _lock:
                for module_name, attr in held:
                    _holders[module_name, attr] -= 1
                    if _holders[module_name, attr] == 0:
                        del _holders[module_name, attr]
                        module = sys.modules.get(module_name)
                        stock, ours = patches[attr]
                        if getattr(module, attr, None) is ours:
                            setattr(module, attr, stock)
