"""Per-token log-probabilities (and entropies) of sampled completions, by teacher forcing.

For row n (prompt b = n // G) and completion position t:

    logp[n, t] = log_softmax(logits(prompt_b + completion_n[:t]) / temperature)[completion_n[t]]

This is what the policy-gradient losses need for the current policy (differentiable), the
behaviour ("old") policy and the reference policy (no gradient).

Memory. A Qwen3 vocabulary has 151,936 entries, so [N, T, V] float32 logits for N=16, T=256
would take 2.5 GB, and a plain `log_softmax` makes a second tensor of the same size. Here the
transformer body runs once to give hidden states; padding positions are dropped (completions in a
GRPO batch vary a lot in length); then the LM head and a *selective* log-softmax (logsumexp and a
gather of the chosen token) run over chunks of at most `chunk_size` tokens. A custom VJP does the
backward pass chunk by chunk too, recomputing each chunk's logits instead of keeping them from the
forward pass. Chunks are chained with `mx.depends` so that MLX runs them one after another; MLX
evaluates ahead while memory is below `mx.get_memory_limit()` and, above it, waits for finished
chunks to release their buffers, so chunking is what lets a large-vocabulary batch fit under the
limit (see BENCHMARKS.md, "Log-prob memory").

Layout. Prompts are left-padded to the longest prompt and completions right-padded, so every
row's completion starts at the same column. A left-padding-aware KV cache (mlx-lm's
`BatchKVCache` semantics) gives each row RoPE positions that start at 0 on its first real token
and an attention mask that hides the padding, so a batched row matches the same sequence run
alone.

Prompt sharing. The G completions of a prompt share it, so with `share_prompt=True` each
distinct prompt runs once (batch B) and its KV cache is gathered for each completion row before
the completions run. This is exact also under differentiation: the gradient of a gather is the
sum over the copies, which is what the full forward accumulates in the prompt's activations.

Length buckets. Completions in one batch often differ a lot in length (one row runs to the token
limit, the rest stop early). With prompt sharing the completion rows run in up to MAX_BUCKETS
passes, each padded only to its own longest row (`length_buckets` picks the split that wastes
least), so padding costs little compute.

Gradient checkpointing. Under `checkpointed_layers(model)` each transformer block keeps only its
inputs and is recomputed in the backward pass; nothing in the pass syncs with the host then
(see `kernels.graph_only`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import BatchKVCache

from .. import kernels
from ..errors import MlxRftError

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


class _PaddedKVCache(BatchKVCache):
    """`BatchKVCache` (left padding -> per-row RoPE offsets and masks) that grows by concatenation.

    mlx-lm's version writes into 256-step zero buffers, which suits generation; for one-shot
    teacher forcing (also under differentiation) plain concatenation allocates exactly what is
    needed and keeps the graph simple.
    """

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset = self.offset + keys.shape[2]
        self._idx += keys.shape[2]
        return self.keys, self.values

    def take(self, rows: mx.array) -> "_PaddedKVCache":
        """A cache whose row i is a copy of row `rows[i]` (a gather, so gradients flow back)."""
        out = _PaddedKVCache([0])
        out.keys, out.values = self.keys[rows], self.values[rows]
        out.left_padding, out.offset = self.left_padding[rows], self.offset[rows]
        out._idx = self._idx
        return out

    def with_entries(self, keys: mx.array | None, values: mx.array | None) -> "_PaddedKVCache":
        """A cache with this one's positions and padding but the given keys and values."""
        out = _PaddedKVCache([0])
        out.keys, out.values = keys, values
        out.left_padding, out.offset, out._idx = self.left_padding, self.offset, self._idx
        return out


def _checkpointed_call(call: Callable) -> Callable:
    """A transformer block's `__call__` that keeps only its inputs for the backward pass.

    The block runs under `mx.checkpoint`, which recomputes it during the backward pass. The
    block's trainable parameters are explicit inputs (so they get gradients; the frozen ones are
    constants), and so are the cache's keys and values: the cache's update is returned as outputs
    and applied outside, so the recomputation starts from the same cache state.
    """

    def checkpointed(self, x, mask=None, cache=None):
        if cache is not None and not isinstance(cache, _PaddedKVCache):
            return call(self, x, mask, cache)
        own = self.trainable_parameters()
        # The positions as of this call: the recomputation runs after `cache` has moved on.
        start = None if cache is None else cache.with_entries(None, None)

        def block(params, x, *entries):
            # Also runs in the backward pass (the recomputation), outside the caller's block.
            with kernels.graph_only():
                self.update(params)
                try:
                    c = None if start is None else start.with_entries(*(entries or (None, None)))
                    y = call(self, x, mask, c)
                finally:
                    self.update(own)
            return (y,) if c is None else (y, c.keys, c.values)

        entries = [] if cache is None or cache.keys is None else [cache.keys, cache.values]
        out = mx.checkpoint(block)(own, x, *entries)
        if cache is not None:
            cache.keys, cache.values = out[1], out[2]
            cache.offset = cache.offset + x.shape[1]
            cache._idx += x.shape[1]
        return out[0]

    return checkpointed


@contextmanager
def checkpointed_layers(model: nn.Module):
    """Gradient checkpointing of the model's transformer blocks for the duration of the block.

    Activation memory falls from every intermediate of every block to about each block's input,
    for one more forward pass of compute. Inside the block nothing syncs with the host
    (`kernels.graph_only`): on the CPU that gives up the NumPy exp paths, so a checkpointed
    gradient pass trades speed for memory there too. Patches the blocks' classes (as mlx-lm's
    `grad_checkpoint` does) and restores them on exit.
    """
    layers = getattr(_split_model(model)[0], "layers", None) or getattr(model, "layers", None)
    if not layers:
        raise MlxRftError(
            f"{type(model).__name__} has no `layers` list to checkpoint; turn "
            "gradient_checkpointing off for this model"
        )
    originals = {}
    for layer in layers:
        cls = type(layer)
        if cls not in originals:
            originals[cls] = cls.__call__
            cls.__call__ = _checkpointed_call(cls.__call__)
    try:
        with kernels.graph_only():
            yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


# A body pass has a fixed cost (30 layers of small ops, skinnier GEMMs) worth roughly this many
# row tokens of work on the default model; length buckets are split only when they save more.
BUCKET_COST_TOKENS = 64
MAX_BUCKETS = 4


def length_buckets(
    lengths: Sequence[int], cost: int | None = None, max_buckets: int | None = None
) -> list[np.ndarray]:
    """Rows grouped so that padding each group to its longest row wastes the least work.

    Minimises sum(rows x longest) + `cost` per group (default BUCKET_COST_TOKENS) over contiguous
    runs of the rows sorted by length: an exact dynamic programme with at most `max_buckets`
    groups (default MAX_BUCKETS). Rows of length 0 are dropped; each group's rows are ascending.
    """
    cost = BUCKET_COST_TOKENS if cost is None else cost
    max_buckets = MAX_BUCKETS if max_buckets is None else max_buckets
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    n = order.size
    if n == 0:
        return []
    srt = lengths[order]
    inf = np.iinfo(np.int64).max // 4
    # best[k][j]: least cost of the first j sorted rows in k groups; the last group ends at j - 1.
    best = np.full((max_buckets + 1, n + 1), inf, dtype=np.int64)
    back = np.zeros((max_buckets + 1, n + 1), dtype=np.int64)
    best[0][0] = 0
    for k in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            i = np.arange(j)  # the group holds sorted rows i..j-1, padded to srt[j - 1]
            c = best[k - 1][i] + (j - i) * srt[j - 1] + cost
            m = int(np.argmin(c))
            best[k][j], back[k][j] = c[m], m
    k = int(np.argmin(best[:, n]))
    groups, j = [], n
    while k > 0:
        i = int(back[k][j])
        groups.append(np.sort(order[i:j]))
        j, k = i, k - 1
    return groups[::-1]


def _split_model(model: nn.Module) -> tuple[Callable, nn.Module | None, Callable | None]:
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


def _vocab_size(model: nn.Module) -> int | None:
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return int(size) if size else None


def _token_stats(
    logits: mx.array, targets: mx.array, temperature: float, with_entropy: bool
) -> tuple[mx.array, mx.array | None]:
    """Selective log-softmax: log p(target) and (stop-gradient) entropy from [K, V] logits.

    Uses logsumexp + gather, never a second [K, V] tensor for the log-probs. The entropy,
    H = sum_v p_v * (lse - z_v) with z = logits / T, needs p (one more [K, V] block); it is a
    metric / masking signal, so it carries no gradient (as in TRL).
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
        zs, lses = mx.stop_gradient(z), mx.stop_gradient(lse)
        p = kernels.softmax(zs)
        # Summing p * (lse - z) avoids the cancellation of lse - sum(p * z) for large logits.
        entropy = (p * (lses[:, None] - zs)).sum(axis=-1)
    return logp, entropy


def _chunk_bounds(k: int, chunk_size: int) -> list[tuple[int, int]]:
    step = k if chunk_size <= 0 else chunk_size
    return [(s, min(s + step, k)) for s in range(0, k, step)]


def _head_token_stats(
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
                logp, ent = _token_stats(logits_of(leaves, hc), targets[s:e], 1.0, with_entropy)
            logps.append(logp)
            ents.append(ent if with_entropy else mx.zeros_like(logp))
            after = [logp, ents[-1]]
        return mx.concatenate(logps), mx.stop_gradient(mx.concatenate(ents))

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        hidden, leaves = primals
        g = cotangents[0]
        dh_parts, dleaves, after = [], None, list(outputs)
        for s, e in bounds:
            hc = hidden[s:e] if on_host else mx.depends(hidden[s:e], after)
            z = logits_of(leaves, hc)
            # d logp / d z = g * (onehot(target) - softmax(z)), formed in one buffer. The VJP runs
            # after the caller's `graph_only()` block has ended; keep to the forward's choice.
            with contextlib.nullcontext() if on_host else kernels.graph_only():
                dz = kernels.selective_logsoftmax_cotangent(z, targets[s:e], g[s:e])
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


def _check_inputs(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: mx.array,
    completion_mask: mx.array,
    group_size: int,
    temperature: float,
) -> None:
    if completion_ids.ndim != 2:
        raise MlxRftError(
            f"completion_ids must be a 2-D [N, T] array, got shape {tuple(completion_ids.shape)}; "
            "stack the completions (right-padded) into one array"
        )
    if completion_mask.shape != completion_ids.shape:
        raise MlxRftError(
            f"completion_mask shape {tuple(completion_mask.shape)} differs from completion_ids "
            f"shape {tuple(completion_ids.shape)}; pass one mask entry per completion token"
        )
    if group_size < 1:
        raise MlxRftError(f"group_size must be >= 1, got {group_size}")
    n = completion_ids.shape[0]
    if len(prompt_ids) * group_size != n:
        raise MlxRftError(
            f"{len(prompt_ids)} prompts x group_size {group_size} != {n} completion rows; pass one "
            "prompt per group (row n belongs to prompt n // group_size)"
        )
    for b, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise MlxRftError(
                f"prompt {b} is empty; every prompt needs at least one token to predict the first "
                "completion token from (render it with the chat template or add a BOS token)"
            )
    if not temperature > 0:
        raise MlxRftError(
            f"temperature must be > 0 for log-probs, got {temperature}; greedy (temperature 0) "
            "rollouts have no sampling distribution to train on, sample with temperature > 0"
        )


def _left_pad(prompt_ids: Sequence[Sequence[int]]) -> tuple[mx.array, list[int]]:
    """[B, P] int32 prompts left-padded with token 0 (hidden by the mask), and the pad counts."""
    width = max(len(p) for p in prompt_ids)
    pads = [width - len(p) for p in prompt_ids]
    rows = np.zeros((len(prompt_ids), width), dtype=np.int32)
    for b, p in enumerate(prompt_ids):
        rows[b, pads[b] :] = np.asarray(p, dtype=np.int32)
    return mx.array(rows), pads


def _auto_chunk_size(model: nn.Module) -> int:
    vocab = _vocab_size(model) or 151_936
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


def _make_caches(model: nn.Module, left_padding: list[int]) -> list[_PaddedKVCache]:
    """One padded KV cache per layer; refuses models whose layers need non-attention caches.

    Sliding-window layers are fine: a full cache plus the window mask the model asks for
    (`make_mask(..., window_size=...)`) attends to exactly what a rotating cache would keep.
    """
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    if hasattr(model, "make_cache"):
        caches = model.make_cache()
        kinds = {type(c) for c in caches}
        if not kinds <= {KVCache, RotatingKVCache}:
            names = ", ".join(sorted(k.__name__ for k in kinds))
            raise MlxRftError(
                f"{type(model).__module__} uses {names} layer caches (recurrent or other "
                "non-attention layers), which batched log-probs do not support; use an attention "
                "model (llama, qwen2, qwen3, qwen3_moe, phi3, smollm3, olmo2, starcoder2)"
            )
        num_layers = len(caches)
    else:
        layers = getattr(model, "layers", None)
        if layers is None:
            raise MlxRftError(
                f"{type(model).__name__} has no `layers`, so its KV cache cannot be built; use an "
                "mlx-lm language model"
            )
        num_layers = len(layers)
    return [_PaddedKVCache(left_padding) for _ in range(num_layers)]


def sequence_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: mx.array,
    completion_mask: mx.array,
    group_size: int,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    share_prompt: bool = True,
    chunk_size: int | None = None,
) -> tuple[mx.array, mx.array | None]:
    """Per-token log-probs of completions under `model`, by teacher forcing at `temperature`.

    Args:
        model: an mlx-lm model (LoRA-wrapped or not).
        prompt_ids: B unpadded prompts; row n of the completions belongs to prompt n // group_size.
        completion_ids: [N, T] int, right-padded (pad values are not looked at where the mask is 0
            beyond being fed to the model, which cannot affect earlier positions).
        completion_mask: [N, T], nonzero for tokens whose log-prob is wanted.
        group_size: G, completions per prompt (N = B * G).
        temperature: the sampling temperature; log-probs are of softmax(logits / temperature).
        with_entropy: also return the entropy of softmax(logits / temperature) at each position
            (no gradient).
        share_prompt: run each distinct prompt once and give its KV cache to its G completions,
            which run in length buckets (exact, also for gradients); False runs every row's full
            prompt+completion sequence, padded to the longest.
        chunk_size: completion tokens per LM-head chunk; None picks it from a 256 MiB budget for one
            float32 [chunk, V] block; 0 disables chunking.

    Returns:
        (logp, entropy): [N, T] float32 each, 0 where the mask is 0; entropy is None unless
        `with_entropy`. Differentiable w.r.t. the model's parameters (use inside `nn.value_and_grad`).
    """
    _check_inputs(prompt_ids, completion_ids, completion_mask, group_size, temperature)
    n, t = completion_ids.shape
    if chunk_size is None:
        chunk_size = _auto_chunk_size(model)
    valid = np.asarray(completion_mask.astype(mx.float32)) != 0
    flat_idx = np.flatnonzero(valid.reshape(-1)).astype(np.int32)
    if flat_idx.size == 0 or t == 0:
        zeros = mx.zeros((n, t), dtype=mx.float32)
        return zeros, (zeros if with_entropy else None)

    # Pad values may be anything (e.g. -1): any in-range id works at positions nobody reads.
    # Masked-in ids must be real tokens, or their log-prob would silently be another token's.
    ids_np = np.asarray(completion_ids.astype(mx.int32))
    vocab = _vocab_size(model) or np.iinfo(np.int32).max
    in_range = (ids_np >= 0) & (ids_np < vocab)
    if not in_range[valid].all():
        bad = int(ids_np[valid & ~in_range][0])
        raise MlxRftError(
            f"completion token id {bad} is outside the model's vocabulary [0, {vocab}) at a "
            "masked-in position; check that the completions come from this model's tokenizer and "
            "that padding is masked out"
        )
    ids = mx.array(np.where(in_range, ids_np, 0))

    body, head_module, head = _split_model(model)
    prompts, pads = _left_pad(prompt_ids)
    width = prompts.shape[1]
    if share_prompt:
        cache = _make_caches(model, pads)
        h_prompt = body(prompts, cache=cache)[:, -1]  # [B, H]: predicts completion token 0
        # Completions run in length buckets: each bucket is padded only to its own longest row
        # (the last masked-in position), so one long row does not make every row pay for its
        # length. Each bucket attends to its prompts' cached keys and values, selected by gather.
        needed = np.where(valid.any(axis=1), t - np.argmax(valid[:, ::-1], axis=1), 0)
        parts, order = [], []
        for rows_b in length_buckets(needed):
            length = int(needed[rows_b].max())
            prompt_rows = mx.array(rows_b // group_size)
            h_b = h_prompt[prompt_rows][:, None]  # [nb, 1, H]
            if length > 1:
                cache_b = [c.take(prompt_rows) for c in cache]
                h_rest = body(ids[mx.array(rows_b), : length - 1], cache=cache_b)  # tokens 1..length-1
                h_b = mx.concatenate([h_b, h_rest], axis=1)
            local_r, local_p = np.nonzero(valid[rows_b, :length])
            parts.append(h_b.reshape(-1, h_b.shape[-1])[mx.array(local_r * length + local_p)])
            order.append(rows_b[local_r] * t + local_p)
        # Back to the row-major order of `flat_idx`.
        h_valid = mx.concatenate(parts)[mx.array(np.argsort(np.concatenate(order), kind="stable"))]
    else:
        rows = mx.concatenate([mx.repeat(prompts, group_size, axis=0), ids[:, :-1]], axis=1)
        cache = _make_caches(model, [p for p in pads for _ in range(group_size)])
        hidden = body(rows, cache=cache)[:, width - 1 :]  # [N, T, H]
        h_valid = hidden.reshape(n * t, -1)[mx.array(flat_idx)]

    # Only masked-in positions go through the head; the rest of [N, T] is filled with zeros.
    targets = ids.reshape(-1)[mx.array(flat_idx)]
    if head is None:
        # Unknown architecture: `hidden` already holds the full logits.
        logp_v, ent_v = _token_stats(h_valid, targets, temperature, with_entropy)
    else:
        logp_v, ent_v = _head_token_stats(
            h_valid, targets, head_module, head, temperature, with_entropy, chunk_size
        )
    # Scatter back by a gather: padding positions point at an appended zero.
    inverse = np.full(n * t, flat_idx.size, dtype=np.int32)
    inverse[flat_idx] = np.arange(flat_idx.size, dtype=np.int32)
    inverse = mx.array(inverse)
    zero = mx.zeros((1,), dtype=mx.float32)
    logp = mx.concatenate([logp_v, zero])[inverse].reshape(n, t)
    entropy = None
    if with_entropy:
        entropy = mx.concatenate([ent_v, zero])[inverse].reshape(n, t)
    return logp, entropy


def sequence_logprobs_reference(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: mx.array,
    completion_mask: mx.array,
    group_size: int,
    temperature: float = 1.0,
) -> tuple[mx.array, mx.array]:
    """The plain computation, for tests: each row alone, unpadded, full `log_softmax` in float32.

    Returns (logp, entropy), [N, T] float32 each, 0 where the mask is 0. No caches, no padding,
    no chunking, no sharing: one `model(prompt + completion)` call per row.
    """
    _check_inputs(prompt_ids, completion_ids, completion_mask, group_size, temperature)
    mask = np.asarray(completion_mask.astype(mx.float32)) != 0
    ids = np.where(mask, np.asarray(completion_ids.astype(mx.int32)), 0)  # padding -> any valid id
    n, t = ids.shape
    logp_rows, ent_rows = [], []
    for r in range(n):
        length = int(np.flatnonzero(mask[r]).max()) + 1 if mask[r].any() else 0
        if length == 0:
            logp_rows.append(mx.zeros((t,)))
            ent_rows.append(mx.zeros((t,)))
            continue
        prompt = [int(x) for x in prompt_ids[r // group_size]]
        seq = mx.array(prompt + ids[r, : length - 1].tolist(), dtype=mx.int32)[None]
        logits = model(seq)[0, len(prompt) - 1 :].astype(mx.float32) / temperature  # [length, V]
        logsm = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        lp = mx.take_along_axis(logsm, mx.array(ids[r, :length])[:, None], axis=-1)[:, 0]
        ent = -(mx.exp(logsm) * logsm).sum(axis=-1)
        m = mx.array(mask[r, :length].astype(np.float32))
        pad = mx.zeros((t - length,))
        logp_rows.append(mx.concatenate([lp * m, pad]))
        ent_rows.append(mx.concatenate([ent * m, pad]))
    return mx.stack(logp_rows), mx.stack(ent_rows)
