"""The rollout engine: B prompts x G samples in one batched decode loop.

    prompts ──> one left-padded prefill of the B distinct prompts
            ──> KV cache fanned out to N = B * G rows (each prompt's G samples share its prefill)
            ──> decode loop: all unfinished rows advance one token per model call;
                finished rows are dropped from the batch (and the cache)
            ──> RolloutBatch (ids, mask, behaviour log-probs, texts, finish reasons)

The loop is pipelined like mlx-lm's `generate_step`: step t+1 is queued on the device
(`mx.async_eval`) before the host reads step t's tokens, so building the graph and the host's
bookkeeping (EOS, stop strings, finished rows) overlap the forward pass. The one host sync per
step is reading the sampled tokens and their log-probs.

Stopping (per row, first match wins): an EOS id of the tokenizer (any of
`tokenizer.eos_token_ids`) -> "stop", kept in the mask; a stop string in the decoded text ->
"stop", cut as described in `stopping.py`; `max_new_tokens` tokens -> "length".

Episodes (`turns=`, see turns.py): a row's turn that stops does not end the row; the handler
returns the environment's reply as token ids, the row waits (riding along like a finished row)
until the next compaction, where the waiting rows' replies are prefilled into their own cache
rows and they rejoin the batch. The mask is 1 on sampled tokens only, so the reply tokens carry
no loss. `max_new_tokens` then limits each turn, and the handler's `max_tokens` the whole row.
Their rows rejoin the batch at decode steps that depend on the other rows, so their draws are
keyed by token position instead of decode step (`position_uniforms`): a row samples the same
tokens whichever rows share its batch or its process.

Randomness: all draws come from an explicit key, `mx.random.key(seed)` split once per step,
so MLX's global PRNG is left untouched when `seed` is given and a fixed seed reproduces the same
completions for the same inputs. With `seed=None` one number is drawn from the global PRNG
(so `mx.random.seed` still makes runs repeatable) and used as the seed.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .. import cpu
from ..errors import MlxRftError
from ..types import RolloutBatch, SamplingConfig
from .cache import make_rollout_cache
from .sampling import (
    TokenSampler, penalty_counts, position_table, position_uniforms, step_uniforms, validate_sampling,
)
from .stopping import StopStringMatcher
from .turns import TurnHandler, feed_replies

PREFILL_STEP_SIZE = 512


@dataclass
class RolloutStats:
    """What one `generate_rollouts` call did; pass an instance as `stats=` to have it filled."""

    prompt_tokens: int = 0  # real (unpadded) tokens of the B distinct prompts, each prefilled once
    completion_tokens: int = 0  # tokens kept in the N completions (the mask's sum)
    decode_steps: int = 0  # batched model calls after the prefill
    row_steps: int = 0  # sum over decode steps of the rows in the batch (compute actually spent)
    compactions: int = 0  # times finished rows were dropped from the batch
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    env_tokens: int = 0  # environment tokens fed between turns (episodes)
    reply_feeds: int = 0  # batched prefills of waiting rows' replies (episodes)

    @property
    def completion_tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.completion_tokens / total if total > 0 else 0.0


def _check_inputs(prompt_ids, group_size, sampling) -> list[list[int]]:
    if not isinstance(sampling, SamplingConfig):
        raise MlxRftError(
            f"sampling must be a mlx_rft.types.SamplingConfig, got {type(sampling).__name__}"
        )
    validate_sampling(sampling)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise MlxRftError(f"group_size={group_size!r} is invalid; set it to an integer >= 1")
    if not isinstance(prompt_ids, Sequence) or len(prompt_ids) == 0:
        raise MlxRftError("prompt_ids is empty; pass a list with one list of token ids per prompt")
    prompts = []
    for b, p in enumerate(prompt_ids):
        if isinstance(p, (mx.array, np.ndarray)):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise MlxRftError(
                f"prompt {b} is not a non-empty list of token ids; tokenize it first "
                "(e.g. tokenizer.apply_chat_template(messages, add_generation_prompt=True))"
            )
        p = [int(t) for t in p]
        if min(p) < 0:
            raise MlxRftError(f"prompt {b} has a negative token id {min(p)}; pass valid token ids")
        prompts.append(p)
    return prompts


def _prefill(model, cache, tokens: mx.array, step: int, embeddings: mx.array | None = None) -> mx.array:
    """Run the [B, P] left-padded prompts through the model; returns last-position logits [B, V].

    All but the last position go in chunks whose logits are never evaluated (only the cache
    is), so the LM head runs on one position per row. `embeddings` ([B, P, H], optional) replace
    the ids' own embeddings (prompts with soft tokens).
    """
    def chunk(a, b):
        if embeddings is None:
            return model(tokens[:, a:b], cache=cache)
        return model(tokens[:, a:b], cache=cache, input_embeddings=embeddings[:, a:b])

    P = tokens.shape[1]
    for start in range(0, P - 1, step):
        chunk(start, min(start + step, P - 1))
        mx.eval([c.state for c in cache])
    return chunk(P - 1, P)[:, -1, :]


def _compact_due(finished: int, active: int) -> bool:
    # Dropping rows copies the kept rows' KV cache; doing it as soon as any row finishes costs a
    # gather per finish. Waiting until an eighth of the batch is done (or the batch is small)
    # keeps copies rare while a finished row rides along for at most a few steps.
    return finished > 0 and (finished * 8 >= active or active <= 4)


def generate_rollouts(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    group_size: int,
    sampling: SamplingConfig,
    *,
    seed: int | None = None,
    row_offset: int = 0,
    total_rows: int | None = None,
    ignore_eos: bool = False,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    stats: RolloutStats | None = None,
    prompt_embeddings: mx.array | None = None,
    turns: TurnHandler | None = None,
) -> RolloutBatch:
    """Sample `group_size` completions for each prompt in one batched decode loop.

    Args:
        model: an mlx-lm model (e.g. from `mlx_rft.models.load_model`).
        tokenizer: its mlx-lm TokenizerWrapper (EOS ids, decoding).
        prompt_ids: B prompts as lists of token ids (chat template already applied).
        group_size: G completions per prompt; row n of the result belongs to prompt n // G.
        sampling: temperature (0 = greedy), truncation, penalties, max_new_tokens, stop strings.
        seed: PRNG seed; a fixed seed reproduces the same completions (see module docstring).
        row_offset, total_rows: number this call's rows as rows row_offset.. of a larger batch of
            total_rows rows (default: this call's N). Each row's random draws depend only on the
            seed and its global number, so a batch split over processes samples exactly what one
            process would (data-parallel training relies on this).
        ignore_eos: keep generating past EOS (benchmarks that need fixed-length rows).
        prefill_step_size: prompt positions per prefill forward (bounds prefill memory).
        stats: optional RolloutStats filled with token counts and timings.
        prompt_embeddings: [B, P, H] input embeddings of the prompts, left-padded to the longest
            (P), used in the prefill instead of the ids' embeddings: prompts with soft tokens
            (time series), whose ids hold placeholders there.
        turns: make each row a multi-turn episode (see the module docstring and turns.py); row n's
            completion then holds its turns and the environment's replies between them, with
            the mask 0 on the replies, and `texts[n]` is its last turn's text.

    Returns:
        RolloutBatch with N = B * G rows; `logprobs` are log_softmax(logits / T) of the sampled
        tokens without penalties or truncation (the behaviour log-probs the loss uses), and
        `truncated_logprobs` those of the distribution actually sampled from (see sampling.py).
    """
    prompts = _check_inputs(prompt_ids, group_size, sampling)
    draw_rows = len(prompts) * group_size if total_rows is None else int(total_rows)
    if row_offset < 0 or row_offset + len(prompts) * group_size > draw_rows:
        raise MlxRftError(
            f"rows {row_offset}..{row_offset + len(prompts) * group_size} do not fit in "
            f"total_rows={draw_rows}; pass the global row count and this call's first row"
        )
    stats = stats if stats is not None else RolloutStats()
    # The CPU speed-ups for this call only (a no-op inside the caller's own block; see cpu/).
    with cpu.speedups(model):
        B, G = len(prompts), group_size
        N = B * G
        max_new = sampling.max_new_tokens
        eos_ids = set() if ignore_eos else {int(t) for t in tokenizer.eos_token_ids}
        stopper = StopStringMatcher(tokenizer, sampling.stop, include=sampling.include_stop)

        if seed is None:
            seed = int(mx.random.randint(0, 2**31 - 1, shape=()).item())
        key = mx.random.key(seed)

        vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        if vocab is not None:
            for b, p in enumerate(prompts):
                if max(p) >= vocab:
                    raise MlxRftError(
                        f"prompt {b} has token id {max(p)} but the model's vocabulary has {vocab} "
                        "entries; tokenize prompts with this model's own tokenizer"
                    )

        # ---- prefill the B distinct prompts once, left-padded to a common length ----
        tic = time.perf_counter()
        lengths = [len(p) for p in prompts]
        P = max(lengths)
        padding = [P - n for n in lengths]
        cache = make_rollout_cache(model, padding)
        padded = mx.array([[0] * pad + p for pad, p in zip(padding, prompts)], dtype=mx.int32)
        if prompt_embeddings is not None and prompt_embeddings.shape[:2] != padded.shape:
            raise MlxRftError(
                f"prompt_embeddings shape {tuple(prompt_embeddings.shape)} does not fit the "
                f"{tuple(padded.shape)} left-padded prompts; pass one embedding per prompt position"
            )
        logits = _prefill(model, cache, padded, max(1, int(prefill_step_size)), prompt_embeddings)
        vocab_size = logits.shape[-1]
        for c in cache:
            # Room for the first 256 new tokens; past that the cache grows by 256 positions at a
            # time (mlx-lm's BatchKVCache policy), so rows that finish early never cost memory for
            # the full max_new_tokens.
            c.expand(G, capacity=P + min(max_new, c.step))
        if G > 1:
            logits = mx.repeat(logits, G, axis=0)

        protected = set(eos_ids) | set(tokenizer.encode("\n", add_special_tokens=False))
        sampler = TokenSampler(sampling, vocab_size, protected_ids=sorted(protected))
        if turns is not None and sampler.uses_penalties:
            raise MlxRftError(
                "repetition, presence and frequency penalties are not supported in multi-turn "
                "episodes; set them to their defaults (repetition_penalty 1, the others 0)"
            )

        # Penalty context: the last C tokens of prompt + completion per row, as [N, C] ids + validity.
        context = valid = None
        if sampler.uses_penalties:
            C = sampling.repetition_context_size
            tails = [p[-C:] for p in prompts]
            ctx = np.zeros((B, C), np.int32)
            val = np.zeros((B, C), np.float32)
            for b, t in enumerate(tails):
                if t:
                    ctx[b, C - len(t) :] = t
                    val[b, C - len(t) :] = 1.0
            context = mx.repeat(mx.array(ctx), G, axis=0)
            valid = mx.repeat(mx.array(val), G, axis=0)

        # Episodes: a row's tokens are drawn by position, not by decode step (see position_uniforms).
        table = None
        if turns is not None:
            key, sub = mx.random.split(key)
            table = position_table(sub, turns.max_tokens + 1, draw_rows)

        def sample(step_logits, step_key, live, ctx, val, positions=None):
            counts = penalty_counts(ctx, val, vocab_size) if ctx is not None else None
            if table is None:
                uniforms = step_uniforms(step_key, live + row_offset, draw_rows)
            else:
                uniforms = position_uniforms(table, live + row_offset, mx.array(positions), draw_rows)
            out = sampler(step_logits, uniforms, counts)
            if ctx is not None:
                ctx = mx.concatenate([ctx[:, 1:], out.tokens[:, None]], axis=1)
                val = mx.concatenate([val[:, 1:], mx.ones((val.shape[0], 1), val.dtype)], axis=1)
            return out, ctx, val

        live = mx.arange(N)  # output row of each batch position, on the device
        key, sub = mx.random.split(key)
        cur, context, valid = sample(logits, sub, live, context, valid, [0] * N)
        mx.eval(cur.tokens, cur.logprobs, cur.truncated_logprobs)  # so prefill_seconds is complete
        stats.prompt_tokens += sum(lengths)
        stats.prefill_seconds += time.perf_counter() - tic

        # ---- decode ----
        tic = time.perf_counter()
        rows = list(range(N))  # batch position -> output row
        out_ids: list[list[int]] = [[] for _ in range(N)]
        out_lp: list[list[float]] = [[] for _ in range(N)]
        out_tlp: list[list[float]] = [[] for _ in range(N)]
        finish: list[str | None] = [None] * N
        riding = 0  # finished or waiting rows still in the batch (dropped at the next compaction)
        # Episodes: where each row's current turn starts, the reply tokens' positions (mask 0),
        # positions fed into each row's cache after its prompt, and the rows waiting for a reply
        # (row -> its length before the reply).
        turn_start = [0] * N
        env_pos: list[list[int]] = [[] for _ in range(N)]
        fed = [0] * N
        waiting: dict[int, int] = {}

        for step in itertools.count():
            nxt = None
            if turns is not None or step + 1 < max_new:
                # Queue step t+1 before reading step t (rows that turn out finished ride along).
                step_logits = model(cur.tokens[:, None], cache=cache)[:, -1, :]
                key, sub = mx.random.split(key)
                # (positions: the queued token follows `cur`, which is not yet in out_ids)
                positions = [len(out_ids[r]) + 1 for r in rows] if table is not None else None
                nxt, next_context, next_valid = sample(step_logits, sub, live, context, valid, positions)
                mx.async_eval(nxt.tokens, nxt.logprobs, nxt.truncated_logprobs)
                stats.decode_steps += 1
                stats.row_steps += len(rows)
                for r in rows:
                    fed[r] += 1

            toks = cur.tokens.tolist()
            lps = cur.logprobs.tolist()
            tlps = cur.truncated_logprobs.tolist()
            for i, r in enumerate(rows):
                if finish[r] is not None or r in waiting:
                    continue
                t = toks[i]
                out_ids[r].append(t)
                out_lp[r].append(lps[i])
                out_tlp[r].append(tlps[i])
                used, start = len(out_ids[r]), turn_start[r]
                if t in eos_ids or (stopper and stopper.completed(out_ids[r][max(start, used - stopper.window) :])):
                    reason = "stop"
                elif used - start >= max_new:
                    reason = "length"
                elif turns is not None and used >= turns.max_tokens:
                    reason = "tokens"
                else:
                    continue
                riding += 1
                if turns is not None:
                    turn = out_ids[r][start:]
                    text = _turn_text(tokenizer, turn, reason, eos_ids, stopper)
                    reply = turns.end_turn(r, turn, text, reason, used)
                    if reply:
                        waiting[r] = len(out_ids[r])
                        env_pos[r].extend(range(len(out_ids[r]), len(out_ids[r]) + len(reply)))
                        out_ids[r].extend(reply)
                        out_lp[r].extend([0.0] * len(reply))
                        out_tlp[r].extend([0.0] * len(reply))
                        turn_start[r] = len(out_ids[r])
                        continue
                finish[r] = "stop" if reason == "stop" else "length"

            if nxt is None or (riding == len(rows) and not waiting):
                break
            if riding == len(rows) or _compact_due(riding, len(rows)):
                keep = [i for i, r in enumerate(rows) if finish[r] is None and r not in waiting]
                back = [i for i, r in enumerate(rows) if r in waiting]
                if back:
                    # Copied out before the batch drops them; they come back after the kept rows.
                    back_rows = [rows[i] for i in back]
                    key, sub = mx.random.split(key)
                    back_cache, back_out = _feed_waiting(
                        model, cache, back, back_rows, out_ids, fed, waiting,
                        lambda logits: sample(logits, sub, mx.array(back_rows), None, None,
                                              [len(out_ids[r]) for r in back_rows])[0], stats,
                    )
                if keep:
                    for c in cache:
                        c.filter(keep)
                    idx = mx.array(keep)
                    nxt = nxt.take(idx)
                    if next_context is not None:
                        next_context, next_valid = next_context[idx], next_valid[idx]
                    rows = [rows[i] for i in keep]
                if back and keep:
                    for c, b in zip(cache, back_cache):
                        c.extend(b)
                    nxt, rows = nxt.concat(back_out), rows + back_rows
                elif back:
                    cache, nxt, rows = back_cache, back_out, back_rows
                live = mx.array(rows)
                riding = 0
                stats.compactions += 1
            cur = nxt
            if sampler.uses_penalties:
                context, valid = next_context, next_valid

        del cache, cur, nxt
        stats.decode_seconds += time.perf_counter() - tic
        return _assemble(
            tokenizer, prompts, G, out_ids, out_lp, out_tlp, finish, eos_ids, stopper, stats,
            turn_start, env_pos,
        )


def _feed_waiting(model, cache, back, back_rows, out_ids, fed, waiting, sample, stats):
    """The waiting rows' own cache rows with their replies fed, and the first token of each one's
    next turn (see turns.py). `back`: their batch positions; updates `fed` and `waiting`."""
    back_cache = [c.select(back) for c in cache]
    # A waiting row was fed the tokens sampled after its turn ended (to forget), or, if its turn
    # ended at the last queued step, not yet all of the turn (still to feed).
    drop = [max(0, fed[r] - waiting[r]) for r in back_rows]
    pending = [out_ids[r][min(fed[r], waiting[r]) :] for r in back_rows]
    first = sample(feed_replies(model, back_cache, pending, drop))
    for r in back_rows:
        stats.env_tokens += len(out_ids[r]) - waiting[r]
        fed[r] = len(out_ids[r])
        del waiting[r]
    stats.reply_feeds += 1
    return back_cache, first


def _turn_text(tokenizer, turn, reason, eos_ids, stopper) -> str:
    """A turn's text: EOS removed, cut at the stop string that ended it."""
    body = turn[:-1] if turn and turn[-1] in eos_ids and reason == "stop" else turn
    text = tokenizer.decode(list(body))
    return stopper.cut(text) if stopper and reason == "stop" else text


def _assemble(
    tokenizer, prompts, G, out_ids, out_lp, out_tlp, finish, eos_ids, stopper, stats, turn_start, env_pos
):
    N = len(out_ids)
    T = max(len(t) for t in out_ids)
    ids = np.zeros((N, T), np.int32)
    mask = np.zeros((N, T), np.float32)
    lp = np.zeros((N, T), np.float32)
    tlp = np.zeros((N, T), np.float32)
    texts = []
    for n in range(N):
        k = len(out_ids[n])
        ids[n, :k] = out_ids[n]
        mask[n, :k] = 1.0
        mask[n, env_pos[n]] = 0.0
        lp[n, :k] = out_lp[n]
        tlp[n, :k] = out_tlp[n]
        texts.append(_turn_text(tokenizer, out_ids[n][turn_start[n] :], finish[n], eos_ids, stopper))
    stats.completion_tokens += int(mask.sum())
    return RolloutBatch(
        prompt_ids=[list(p) for p in prompts],
        completion_ids=mx.array(ids),
        completion_mask=mx.array(mask),
        logprobs=mx.array(lp),
        truncated_logprobs=mx.array(tlp),
        texts=texts,
        finish_reasons=[f or "length" for f in finish],
        group_index=[n // G for n in range(N)],
        group_size=G,
    )
