"""The LM head and the selective log-softmax over the vocabulary, chunk by chunk of tokens.

The transformer body gives hidden states; only masked-in positions reach the head, in chunks of at
most `chunk_size` tokens, with a custom VJP that recomputes each chunk's logits in the backward
pass (see `logprobs`, "Memory").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..cpu import kernels

# Budget for one [chunk, V] float32 logits block when `chunk_size` is None: 256 MiB gives
# 441 tokens per chunk for Qwen3's 151,936-entry vocabulary and 1,365 for SmolLM2's 49,152.
# A chunk's backward pass holds about 2.25 such blocks (logits, softmax, a boolean one-hot).
LOGITS_CHUNK_BYTES = 256 * 1024 * 1024

# mlx-lm model modules whose `Model.__call__` is exactly `head(self.model(inputs, cache))`, with the
# head `self.model.embed_tokens.as_linear` when `args.tie_word_embeddings` else `self.lm_head`.
# For these we can take hidden states and run the head in chunks. Any other architecture (e.g.
# logit soft-capping or scaling after the head) goes through `model(...)` and gets full logits.
_PLAIN_HEAD_MODULES = frozenset(
    f"mlx_lm.models.{name}"
    for name in ("llama", "qwen2", "qwen3", "qwen3_moe", "phi3", "smollm3", "olmo2", "starcoder2")
)


def split_model(model: nn.Module) -> tuple[Callable, nn.Module | None, Callable | None]:
    """(body, head_module, head) with body(tokens, cache) -> hidden and head(hidden) -> logits.

    For architectures outside `_PLAIN_HEAD_MODULES`, body is the whole model (it returns logits),
    and head_module/head are None.
    """
    if type(model).__module__ in _PLAIN_HEAD_MODULES and hasattr(model, "model"):
        body = model.model
        if getattr(model.args, "tie_word_embeddings", False):
            return body, body.embed_tokens, body.embed_tokens.as_linear
        if hasattr(model, "lm_head"):
            return body, model.lm_head, model.lm_head
    return model, None, None


def vocab_size(model: nn.Module) -> int | None:
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return int(size) if size else None


def token_stats(
    logits: mx.array, targets: mx.array, temperature: float, with_entropy: bool
) -> tuple[mx.array, mx.array | None]:
    """Selective log-softmax: log p(target) and the entropy from [K, V] logits, both differentiable.

    Uses logsumexp + gather, never a second [K, V] tensor for the log-probs. The entropy,
    H = sum_v p_v * (lse - z_v) with z = logits / T, needs p (one more [K, V] block). Its gradient
    serves the entropy bonus; masking and metrics take it under stop_gradient.
    """
    # float32 at least (a float64 model stays float64).
    z = logits if logits.dtype == mx.float64 else logits.astype(mx.float32)
    if temperature != 1.0:
        z = z / temperature
    lse = kernels.logsumexp(z)  # vectorised on CPU (MLX's CPU exp is scalar), differentiable
    # Indices carry no gradient (and gather has no VJP w.r.t. them).
    chosen = mx.take_along_axis(z, mx.stop_gradient(targets)[:, None], axis=-1)[:, 0]
    logp = chosen - lse
    entropy = None
    if with_entropy:
        p = mx.softmax(z, axis=-1, precise=True)
        # Summing p * (lse - z) avoids the cancellation of lse - sum(p * z) for large logits.
        entropy = (p * (lse[:, None] - z)).sum(axis=-1)
    return logp, entropy


def _entropy_cotangent(z: mx.array, g: mx.array) -> mx.array:
    """g[:, None] * dH/dz for H = entropy of softmax(z): dH/dz_v = -p_v (log p_v + H)."""
    logp = z - mx.logsumexp(z, axis=-1, keepdims=True)
    p = mx.exp(logp)
    ent = -(p * logp).sum(axis=-1, keepdims=True)
    return -g[:, None].astype(z.dtype) * p * (logp + ent)


def _chunk_bounds(k: int, chunk_size: int) -> list[tuple[int, int]]:
    step = k if chunk_size <= 0 else chunk_size
    return [(s, min(s + step, k)) for s in range(0, k, step)]


def head_token_stats(
    hidden: mx.array,
    targets: mx.array,
    head_module: nn.Module,
    head: Callable,
    temperature: float,
    with_entropy: bool,
    chunk_size: int,
) -> tuple[mx.array, mx.array | None]:
    """Log-probs (and entropies) of `targets` from hidden states [K, H] through the LM head, chunked.

    A custom VJP makes the backward pass chunked as well: for each chunk it recomputes the logits,
    forms d logp / d logits = g * (onehot - softmax) directly and pulls it back through the head,
    so no [K, V] tensor is kept from the forward pass. On GPUs `mx.depends` chains the chunks
    (forward: chunk i+1 after chunk i's outputs; backward: after chunk i's gradients, and the first
    one after the whole forward), which stops MLX's breadth-first scheduler from running every
    chunk's head matmul at once; with that order MLX keeps within its memory limit
    (`mx.set_memory_limit`) by waiting for finished chunks to free their buffers. On the CPU the
    softmax runs in NumPy (MLX's CPU exp is scalar, ~12 ns per element): each chunk syncs, and its
    results are copied out of the graph (inside `grad`, evaluated arrays keep their inputs alive)
    so that the chunk's buffers are freed before the next one.

    The head's trainable parameters (a tied embedding, an lm_head, LoRA weights on it) are explicit
    inputs, so they receive gradients; frozen ones are captured as constants.
    """
    bounds = _chunk_bounds(hidden.shape[0], chunk_size)
    flat = tree_flatten(head_module.trainable_parameters())
    keys, leaves = [k for k, _ in flat], [v for _, v in flat]

    def logits_of(leaves: list[mx.array], hc: mx.array) -> mx.array:
        if keys:
            # Same trick as nn.utils.checkpoint: run the module on the given parameter arrays.
            saved = head_module.trainable_parameters()
            head_module.update(tree_unflatten(list(zip(keys, leaves))))
            out = head(hc)
            head_module.update(saved)
        else:
            out = head(hc)
        z = out if out.dtype == mx.float64 else out.astype(mx.float32)
        return z / temperature if temperature != 1.0 else z

    on_host = kernels.host_paths() and hidden.dtype in (mx.float32, mx.float64)  # see the docstring

    @mx.custom_function
    def fused(hidden: mx.array, leaves: list[mx.array]):
        logps, ents, after = [], [], None
        for s, e in bounds:
            if on_host:
                z = logits_of(leaves, hidden[s:e])
                logp, ent = kernels.selective_logsoftmax(z, targets[s:e], with_entropy)
            else:
                hc = hidden[s:e] if after is None else mx.depends(hidden[s:e], after)
                logp, ent = token_stats(logits_of(leaves, hc), targets[s:e], 1.0, with_entropy)
            logps.append(logp)
            ents.append(ent if with_entropy else mx.zeros_like(logp))
            after = [logp, ents[-1]]
        return mx.concatenate(logps), mx.concatenate(ents)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        hidden, leaves = primals
        g = cotangents[0]
        # The entropy's cotangent (the entropy bonus); None or zeros when nothing uses it.
        g_ent = cotangents[1] if with_entropy and len(cotangents) > 1 else None
        dh_parts, dleaves, after = [], None, list(outputs)
        for s, e in bounds:
            hc = hidden[s:e] if on_host else mx.depends(hidden[s:e], after)
            z = logits_of(leaves, hc)
            # d logp / d z = g * (onehot(target) - softmax(z)), formed in one buffer. The VJP runs
            # after the caller's `graph_only()` block has ended; keep to the forward's choice.
            with contextlib.nullcontext() if on_host else kernels.graph_only():
                dz = kernels.selective_logsoftmax_cotangent(z, targets[s:e], g[s:e])
                if g_ent is not None:
                    dz = dz + _entropy_cotangent(z, g_ent[s:e])
            _, grads = mx.vjp(lambda *a: logits_of(list(a[:-1]), a[-1]), [*leaves, hc], [dz])
            dh, dl = grads[-1], grads[:-1]
            if on_host and len(bounds) > 1:
                # Graph-free results, the head's gradients summed in NumPy in place.
                dh_parts.append(kernels.detach(dh))
                if dleaves is None:
                    dleaves = [np.array(kernels.host(a)) for a in dl]
                else:
                    for acc, a in zip(dleaves, dl):
                        acc += kernels.host(a)
                continue
            dh_parts.append(dh)
            dleaves = dl if dleaves is None else [a + b for a, b in zip(dleaves, dl)]
            after = [dh, *dleaves]
        if dleaves and isinstance(dleaves[0], np.ndarray):
            dleaves = [mx.array(a, dtype=leaf.dtype) for a, leaf in zip(dleaves, leaves)]
        return mx.concatenate(dh_parts), dleaves or []

    logp, entropy = fused(hidden, leaves)
    return logp, (entropy if with_entropy else None)


def auto_chunk_size(model: nn.Module) -> int:
    vocab = vocab_size(model) or 151_936
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))
