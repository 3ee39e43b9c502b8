"""A token prefix that every row starts with, run through the LLM once.

The rows of one dataset share their opening text (system prompt, dataset description,
question) and differ only from the first series on. With the LLM frozen, that prefix's keys
and values are the same for every row and every step, so they are computed once and every
forward pass runs only the rows' own suffixes against them. This is exact: causal attention
never lets the prefix see the suffix, and the suffix positions start at the prefix length.
With trainable LLM weights (LoRA, full) the prefix would change every step, so it is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..errors import MlxRftError


def common_prefix(first_pieces: Sequence[np.ndarray]) -> int:
    """Length of the longest token prefix shared by all rows' first (text) pieces."""
    first = first_pieces[0]
    n = len(first)
    for p in first_pieces[1:]:
        m = min(n, len(p))
        diff = np.nonzero(first[:m] != p[:m])[0]
        n = int(diff[0]) if diff.size else m
    return n


class _FixedPrefixCache:
    """One layer's cache for a forward pass over [B, L] suffixes after the shared prefix.

    Nothing is stored: each call returns prefix + the suffix's keys and values, so the same
    object serves a differentiated forward pass."""

    def __init__(self, keys: mx.array, values: mx.array, batch: int):
        self.keys = mx.repeat(keys, batch, axis=0) if batch > 1 else keys
        self.values = mx.repeat(values, batch, axis=0) if batch > 1 else values
        self.offset = keys.shape[2]

    def update_and_fetch(self, keys, values):
        return (mx.concatenate([self.keys, keys], axis=2),
                mx.concatenate([self.values, values], axis=2))

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if N == 1 and not return_array:
            return None
        # Suffix position i sees the whole prefix and suffix positions <= i.
        if return_array or window_size:
            from mlx_lm.models.base import create_causal_mask

            return create_causal_mask(N, self.offset, window_size=window_size)
        return "causal"


class SharedPrefix:
    """The KV cache of `ids` (1-D token ids) under a frozen LLM."""

    def __init__(self, llm, ids: np.ndarray):
        self.llm = llm
        self.ids = np.asarray(ids, np.int32)
        self.length = len(self.ids)
        self.kv: list[tuple[mx.array, mx.array]] = []
        if self.length:
            cache = make_prompt_cache(llm)
            llm(mx.array(self.ids)[None], cache=cache)
            self.kv = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]
            mx.eval(self.kv)

    def strip(self, pieces: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        """A row's pieces after the prefix (which must open its first, text, piece)."""
        if not self.length:
            return tuple(pieces)
        first = pieces[0]
        if first.dtype.kind not in "iu" or not np.array_equal(first[: self.length], self.ids):
            raise MlxRftError(
                "a row does not start with the shared prefix its batch was built for; build the "
                "prefix from these rows (common_prefix)"
            )
        return (first[self.length :], *pieces[1:])

    def caches(self, batch: int) -> list | None:
        """Per-layer caches for a forward pass of `batch` suffix rows (None without a prefix)."""
        if not self.length:
            return None
        return [_FixedPrefixCache(k, v, batch) for k, v in self.kv]

    def decode_caches(self, batch: int) -> list:
        """mlx-lm KVCaches holding the prefix for `batch` rows, to generate from."""
        cache = make_prompt_cache(self.llm)
        for c, (k, v) in zip(cache, self.kv):
            c.update_and_fetch(mx.repeat(k, batch, axis=0), mx.repeat(v, batch, axis=0))
        return cache


