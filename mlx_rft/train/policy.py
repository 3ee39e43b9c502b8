"""Which parameters train: LoRA / DoRA adapters (mlx-lm's layers), QLoRA, or full fine-tuning.

Also the reference policy for the KL term: with adapters it is the same model with the adapter
scale set to 0 (no second copy in memory); with full fine-tuning it is a frozen copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import GRPOConfig
from ..errors import MlxRftError
from ..policy.adapters import adapters_disabled


QLORA_GROUP_SIZE = 64


@dataclass
class ParamCounts:
    trainable: int
    frozen: int

    def describe(self) -> str:
        total = self.trainable + self.frozen
        pct = 100 * self.trainable / max(total, 1)
        return f"trainable {self.trainable:,} / {total:,} parameters ({pct:.3f}%)"


def count_parameters(model: nn.Module) -> ParamCounts:
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return ParamCounts(trainable, total - trainable)


def lora_parameters(cfg: GRPOConfig) -> dict:
    """mlx-lm's adapter `lora_parameters` dict (it uses scale = alpha / rank)."""
    params = {"rank": cfg.lora_rank, "scale": cfg.lora_alpha / cfg.lora_rank, "dropout": cfg.lora_dropout}
    if cfg.lora_keys:
        params["keys"] = list(cfg.lora_keys)
    return params


def adapter_config(cfg: GRPOConfig, num_layers: int) -> dict:
    """The adapter_config.json that `mlx_lm.load(..., adapter_path=...)` reads."""
    out = {
        "fine_tune_type": cfg.finetune_type,
        "num_layers": num_layers,
        "lora_parameters": lora_parameters(cfg),
    }
    if cfg.quantize_bits:  # QLoRA: the adapters belong to the quantized base (models.load_model)
        out["quantization"] = {"bits": cfg.quantize_bits, "group_size": QLORA_GROUP_SIZE}
    return out


def setup_trainable(model: nn.Module, cfg: GRPOConfig) -> int:
    """Freeze the base and attach adapters (or unfreeze for full). Returns the adapted layer count."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num_layers = len(model.layers) if cfg.lora_layers < 0 else min(cfg.lora_layers, len(model.layers))
    if cfg.finetune_type == "full":
        model.unfreeze()
        if cfg.freeze:
            matched = [m for name, m in model.named_modules() if any(p in name for p in cfg.freeze)]
            if not matched:
                raise MlxRftError(
                    f"freeze={cfg.freeze} matched no module names (e.g. model.embed_tokens, "
                    "model.layers.0.self_attn); fix the patterns"
                )
            for module in matched:
                module.freeze()
        return num_layers
    if cfg.finetune_type == "none":  # a frozen LLM: the series encoder alone trains
        model.freeze()
        return 0
    if cfg.quantize_bits:
        nn.quantize(model, group_size=QLORA_GROUP_SIZE, bits=cfg.quantize_bits)
    model.freeze()
    try:
        linear_to_lora_layers(
            model, num_layers, lora_parameters(cfg), use_dora=cfg.finetune_type == "dora"
        )
    except ValueError as e:
        raise MlxRftError(f"cannot attach {cfg.finetune_type} adapters: {e}") from e
    if not tree_flatten(model.trainable_parameters()):
        raise MlxRftError(
            f"lora_keys={cfg.lora_keys} matched no layers, so nothing would train; use module "
            "paths inside a block such as self_attn.q_proj, or leave lora_keys empty"
        )
    return num_layers


class ReferencePolicy:
    """Calls `fn(model)` under the reference policy: adapters off, or a frozen full copy."""

    def __init__(self, model: nn.Module, cfg: GRPOConfig, load_copy=None):
        self.model = model
        self.copy = None
        if cfg.beta > 0 and cfg.finetune_type == "full":
            self.copy = load_copy()
            self.copy.freeze()

    def run(self, fn):
        if self.copy is not None:
            return fn(self.copy)
        with adapters_disabled(self.model):
            return fn(self.model)
