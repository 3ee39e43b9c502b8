"""LoRA adapters switched for a while: off (the base model, e.g. the reference policy or a judge)
or merged into plain Linear layers (faster sampling)."""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return [m for _, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear, LoRAEmbedding))]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the model as its base (reference) policy by zeroing every LoRA scale temporarily."""
    layers = _adapter_layers(model)
    saved = [layer.scale for layer in layers]
    try:
        for layer in layers:
            layer.scale = 0.0
        yield model
    finally:
        for layer, scale in zip(layers, saved):
            layer.scale = scale


@contextlib.contextmanager
def adapters_fused(model: nn.Module):
    """Sample from the policy with its LoRA adapters merged into plain Linear layers.

    A LoRA layer costs two extra small matmuls and an add per call; merged (mlx-lm's
    `LoRALinear.fuse`), a 16-row decode step of SmolLM2 with adapters on every linear layer drops
    from ~112 to ~97 ms, the base model's cost. The merge is exact up to float rounding, so the
    behaviour log-probs recorded while sampling match the unmerged policy to ~1e-6. Adapters on a
    quantized base (QLoRA), DoRA and MoE adapters are left as they are. Restored on exit; the
    merged weights (one extra copy of the adapted matrices) are dropped.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    swaps = [
        (name, m) for name, m in model.named_modules()
        if type(m) is LoRALinear and type(m.linear) is nn.Linear
    ]
    if not swaps:
        yield model
        return
    fused = [(name, m.fuse()) for name, m in swaps]
    mx.eval([f.parameters() for _, f in fused])
    model.update_modules(tree_unflatten(fused))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(swaps))
