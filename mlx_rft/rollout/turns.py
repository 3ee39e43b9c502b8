"""Multi-turn rows in the rollout engine: the hook an episode runner implements, and the prefill
that feeds an environment's reply into the rows waiting for one.

A row's tokens after its prompt are its model turns and, between them, the tokens the
environment's replies were fed as:

    prompt | model turn 1 (sampled) | env reply 1 (fed) | model turn 2 (sampled) | ...

When a row's turn ends, the engine asks the `TurnHandler` for the reply's token ids. The row then
waits, riding along in the batch like a finished row (its extra positions are forgotten later),
until the engine's next compaction, where the waiting rows are copied out of the cache, their
replies prefilled in one right-padded batch (`feed_replies`), and the rows put back with the first
token of their next turn sampled. No row's history is ever recomputed.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx

from ..policy.head import split_model


class TurnHandler(Protocol):
    """What the engine asks at the end of each model turn (see mlx_rft/episodes/runner.py)."""

    max_tokens: int  # model + environment tokens a row may hold after its prompt

    def end_turn(self, row: int, token_ids: list[int], text: str, reason: str, used: int) -> list[int] | None:
        """The token ids to feed before the row's next turn, or None: the episode is over.

        token_ids / text: the turn's sampled tokens and its decoded text (EOS removed, cut at a
        stop string); reason: "stop" (EOS or a stop string), "length" (the turn reached
        max_new_tokens) or "tokens" (the row reached `max_tokens`: must return None); used:
        tokens the row holds after its prompt, this turn included. A reply must leave room for
        at least one more token (used + len(reply) < max_tokens)."""


def feed_replies(model, cache, pending: list[list[int]], drop: list[int]) -> mx.array:
    """Prefill each waiting row's pending tokens into its cache rows; returns next-token logits.

    cache: per-layer RolloutKVCache holding only the waiting rows (`RolloutKVCache.select`).
    pending[i]: tokens row i still has to be fed (model tokens it has not been fed yet, then the
        environment's reply); drop[i]: positions at the end of row i that it was fed after its
        turn ended (riding along in the batch), forgotten first.
    Returns [R, V] logits at each row's last pending token.
    """
    for c in cache:
        c.drop_last(drop)
    lengths = [len(p) for p in pending]
    width = max(lengths)
    # Right-padded: a row's real tokens never attend to its padding (it comes after them), and
    # the padding's positions are dropped afterwards, so they never reach the next turn either.
    inputs = mx.array([p + [0] * (width - len(p)) for p in pending], dtype=mx.int32)
    body, _, head = split_model(model)
    hidden = body(inputs, cache=cache)
    last = hidden[mx.arange(len(pending)), mx.array([n - 1 for n in lengths])]
    logits = last if head is None else head(last)
    for c in cache:
        c.drop_last([width - n for n in lengths])
    return logits
