"""Gradient checkpointing of a model's transformer blocks for the teacher-forced pass.

Under `checkpointed_layers(model)` each transformer block keeps only its inputs and is recomputed
in the backward pass; nothing in the pass syncs with the host then (see `kernels.graph_only`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from ..cpu import kernels
from ..errors import MlxRftError
from .head import split_model
from .kv_cache import PaddedKVCache


def _checkpointed_call(call: Callable) -> Callable:
    """A transformer block's `__call__` that keeps only its inputs for the backward pass.

    The block runs under `mx.checkpoint`, which recomputes it during the backward pass. The
    block's trainable parameters are explicit inputs (so they get gradients; the frozen ones are
    constants), and so are the cache's keys and values: the cache's update is returned as outputs
    and applied outside, so the recomputation starts from the same cache state.
    """

    def checkpointed(self, x, mask=None, cache=None):
        if cache is not None and not isinstance(cache, PaddedKVCache):
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
    layers = getattr(split_model(model)[0], "layers", None) or getattr(model, "layers", None)
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
