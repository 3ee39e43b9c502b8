"""The KV cache of one rollout: mlx-lm's left-padded `BatchKVCache` plus group fan-out.

`RolloutKVCache` keeps mlx-lm's layout and masking (rows left-padded to a common length,
per-row RoPE offsets, padding masked out) and adds what a GRPO rollout needs:

* `expand(group_size, capacity)`: after the B distinct prompts are prefilled once, copy each
  row G times into a buffer with room for `capacity` positions, so the G samples of a prompt
  share one prompt forward pass (past `capacity` the cache grows like BatchKVCache, 256
  positions at a time);
* `filter(keep)`: drop finished rows without a host sync (the left padding is mirrored on the
  host, where mlx-lm's version calls `.tolist()` on a device array for every layer);
* `make_mask`: no mask array at all while no row is padded (decoding a single prompt's group);
* `select`, `drop_last`, `extend`: what multi-turn episodes need to feed an environment's reply
  into the rows that wait for one (see rollout/turns.py): copy those rows out, forget positions
  they were fed while riding along after their turn ended, prefill the replies right-padded, drop
  the padding, and put the rows back. Dropped positions become left padding (a roll of each row,
  as mlx-lm's `BatchKVCache.finalize` does for right-padded prompts), so RoPE positions and the
  mask stay right without touching other rows.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from ..errors import MlxRftError


class RolloutKVCache(BatchKVCache):
    """Left-padded batched KV cache for one layer (see module docstring)."""

    def __init__(self, left_padding: list[int]) -> None:
        super().__init__(left_padding)
        self._left_host = [int(x) for x in left_padding]

    def make_mask(self, N: int, return_array: bool = False, **kwargs) -> Any:
        if max(self._left_host) == 0 and not return_array and kwargs.get("window_size") is None:
            # Unpadded rows need no array mask: SDPA's own causal path (or none for one token).
            return None if N == 1 else "causal"
        return super().make_mask(N, return_array=return_array, **kwargs)

    def expand(self, group_size: int, capacity: int) -> None:
        """Repeat every row `group_size` times (row b -> rows b*G .. b*G+G-1) into a buffer that
        holds `capacity` positions, and drop padding columns shared by all rows."""
        shift = min(self._left_host)
        used = self._idx - shift
        if capacity < used:
            raise ValueError(f"capacity {capacity} is below the {used} cached positions")
        keys = self.keys[..., shift : self._idx, :]
        values = self.values[..., shift : self._idx, :]
        n = keys.shape[0] * group_size
        if group_size > 1:
            keys = mx.repeat(keys, group_size, axis=0)
            values = mx.repeat(values, group_size, axis=0)
        new_k = mx.zeros((n, keys.shape[1], capacity, keys.shape[3]), keys.dtype)
        new_v = mx.zeros((n, values.shape[1], capacity, values.shape[3]), values.dtype)
        new_k[..., :used, :] = keys
        new_v[..., :used, :] = values
        self.keys, self.values = new_k, new_v
        self._left_host = [l - shift for l in self._left_host for _ in range(group_size)]
        self.left_padding = mx.array(self._left_host)
        self.offset = mx.repeat(self.offset, group_size, axis=0)
        self._idx = used

    def filter(self, batch_indices: list[int]) -> None:
        """Keep only the rows in `batch_indices` (a host list), without syncing the device."""
        idx = mx.array(batch_indices)
        left = [self._left_host[i] for i in batch_indices]
        shift = min(left)
        # Slicing first makes the gather copy only the kept columns of the kept rows.
        self.keys = self.keys[:, :, shift:][idx]
        self.values = self.values[:, :, shift:][idx]
        self.offset = self.offset[idx]
        self._left_host = [l - shift for l in left]
        self.left_padding = mx.array(self._left_host)
        self._idx -= shift

    def select(self, batch_indices: list[int]) -> "RolloutKVCache":
        """A new cache holding copies of the rows in `batch_indices` (this one is unchanged)."""
        out = RolloutKVCache(list(self._left_host))
        out.keys, out.values = self.keys[..., : self._idx, :], self.values[..., : self._idx, :]
        out.offset, out._idx = self.offset, self._idx
        out.filter(batch_indices)
        return out

    def drop_last(self, counts: list[int]) -> None:
        """Forget the last `counts[i]` cached positions of row i (they become left padding)."""
        if not any(counts):
            return
        shifts = mx.array(counts)
        n = self._idx
        idx = (mx.arange(n)[None, :] - shifts[:, None]) % n  # [B, n]: position j reads j - count
        idx = idx[:, None, :, None]
        self.keys = mx.take_along_axis(self.keys[..., :n, :], idx, axis=2)
        self.values = mx.take_along_axis(self.values[..., :n, :], idx, axis=2)
        self.offset = self.offset - shifts
        self._left_host = [l + c for l, c in zip(self._left_host, counts)]
        self.left_padding = mx.array(self._left_host)
        shift = min(self._left_host)
        if shift:
            self.keys, self.values = self.keys[..., shift:, :], self.values[..., shift:, :]
            self._left_host = [l - shift for l in self._left_host]
            self.left_padding = mx.array(self._left_host)
            self._idx -= shift

    def extend(self, other: "RolloutKVCache") -> None:
        """Append the rows of `other` (both right-aligned at the longer one's length)."""
        width = max(self._idx, other._idx)

        def aligned(c):
            k, v = c.keys[..., : c._idx, :], c.values[..., : c._idx, :]
            pad = width - c._idx
            if pad:
                k = mx.pad(k, [(0, 0), (0, 0), (pad, 0), (0, 0)])
                v = mx.pad(v, [(0, 0), (0, 0), (pad, 0), (0, 0)])
            return k, v, [l + pad for l in c._left_host]

        k1, v1, l1 = aligned(self)
        k2, v2, l2 = aligned(other)
        self.keys, self.values = mx.concatenate([k1, k2]), mx.concatenate([v1, v2])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._left_host = l1 + l2
        self.left_padding = mx.array(self._left_host)
        self._idx = width


def make_rollout_cache(model, left_padding: list[int]) -> list[RolloutKVCache]:
    """One RolloutKVCache per layer, after checking the model uses plain attention KV caches."""
    reference = make_prompt_cache(model)
    unsupported = sorted({type(c).__name__ for c in reference if type(c) is not KVCache})
    if unsupported:
        raise MlxRftError(
            f"the rollout engine supports models with standard attention KV caches (Llama, "
            f"Qwen3, Qwen3-MoE, ...), but this model uses {', '.join(unsupported)}; "
            "use a full-attention model or disable sliding-window/recurrent layers in its config"
        )
    return [RolloutKVCache(left_padding) for _ in reference]
