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

Gradient checkpointing of the blocks: `checkpointing.checkpointed_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxRftError
from .head import auto_chunk_size, head_token_stats, split_model, token_stats, vocab_size
from .kv_cache import make_caches

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
    prompt_embeddings: mx.array | None = None,
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
        prompt_embeddings: [B, P, H] input embeddings of the prompts, left-padded like the ids
            (P = the longest prompt), used instead of the ids' own embeddings: prompts that hold
            soft tokens (time series). Gradients flow into them.

    Returns:
        (logp, entropy): [N, T] float32 each, 0 where the mask is 0; entropy is None unless
        `with_entropy`. Differentiable w.r.t. the model's parameters (use inside `nn.value_and_grad`).
    """
    _check_inputs(prompt_ids, completion_ids, completion_mask, group_size, temperature)
    n, t = completion_ids.shape
    if chunk_size is None:
        chunk_size = auto_chunk_size(model)
    valid = np.asarray(completion_mask.astype(mx.float32)) != 0
    flat_idx = np.flatnonzero(valid.reshape(-1)).astype(np.int32)
    if flat_idx.size == 0 or t == 0:
        zeros = mx.zeros((n, t), dtype=mx.float32)
        return zeros, (zeros if with_entropy else None)

    # Pad values may be anything (e.g. -1): any in-range id works at positions nobody reads.
    # Masked-in ids must be real tokens, or their log-prob would silently be another token's.
    ids_np = np.asarray(completion_ids.astype(mx.int32))
    vocab = vocab_size(model) or np.iinfo(np.int32).max
    in_range = (ids_np >= 0) & (ids_np < vocab)
    if not in_range[valid].all():
        bad = int(ids_np[valid & ~in_range][0])
        raise MlxRftError(
            f"completion token id {bad} is outside the model's vocabulary [0, {vocab}) at a "
            "masked-in position; check that the completions come from this model's tokenizer and "
            "that padding is masked out"
        )
    ids = mx.array(np.where(in_range, ids_np, 0))

    body, head_module, head = split_model(model)
    prompts, pads = _left_pad(prompt_ids)
    width = prompts.shape[1]
    if prompt_embeddings is not None and prompt_embeddings.shape[:2] != prompts.shape:
        raise MlxRftError(
            f"prompt_embeddings shape {tuple(prompt_embeddings.shape)} does not fit the "
            f"{tuple(prompts.shape)} left-padded prompts; pass one embedding per prompt position"
        )
    embed = {} if prompt_embeddings is None else {"input_embeddings": prompt_embeddings}
    if share_prompt:
        cache = make_caches(model, pads)
        h_prompt = body(prompts, cache=cache, **embed)[:, -1]  # [B, H]: predicts completion token 0
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
        cache = make_caches(model, [p for p in pads for _ in range(group_size)])
        if embed:
            table = _embedding_table(model)
            embed = {"input_embeddings": mx.concatenate(
                [mx.repeat(prompt_embeddings, group_size, axis=0), table(ids[:, :-1])], axis=1)}
        hidden = body(rows, cache=cache, **embed)[:, width - 1 :]  # [N, T, H]
        h_valid = hidden.reshape(n * t, -1)[mx.array(flat_idx)]

    # Only masked-in positions go through the head; the rest of [N, T] is filled with zeros.
    targets = ids.reshape(-1)[mx.array(flat_idx)]
    if head is None:
        # Unknown architecture: `hidden` already holds the full logits.
        logp_v, ent_v = token_stats(h_valid, targets, temperature, with_entropy)
    else:
        logp_v, ent_v = head_token_stats(
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


def _embedding_table(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    return inner.embed_tokens


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
