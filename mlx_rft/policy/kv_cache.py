"""The KV cache of a teacher-forced pass: left padding as in mlx-lm's `BatchKVCache`, grown by
concatenation."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache

from ..errors import MlxRftError


class PaddedKVCache(BatchKVCache):
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

    def take(self, rows: mx.array) -> "PaddedKVCache":
        """A cache whose row i is a copy of row `rows[i]` (a gather, so gradients flow back)."""
        out = PaddedKVCache([0])
        out.keys, out.values = self.keys[rows], self.values[rows]
        out.left_padding, out.offset = self.left_padding[rows], self.offset[rows]
        out._idx = self._idx
        return out

    def with_entries(self, keys: mx.array | None, values: mx.array | None) -> "PaddedKVCache":
        """A cache with this one's positions and padding but the given keys and values."""
        out = PaddedKVCache([0])
        out.keys, out.values = keys, values
        out.left_padding, out.offset, out._idx = self.left_padding, self.offset, self._idx
        return out


def make_caches(model: nn.Module, left_padding: list[int]) -> list[PaddedKVCache]:
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
    return [PaddedKVCache(left_padding) for _ in range(num_layers)]
