"""Optimizers from mlx.optimizers with warmup + constant / cosine / linear schedules."""

from __future__ import annotations

import mlx.optimizers as optim

from ..config import GRPOConfig
from ..errors import MlxRftError


def build_schedule(cfg: GRPOConfig):
    """Learning rate as a function of the optimizer step (a float when constant without warmup)."""
    peak = cfg.learning_rate
    decay_steps = max(cfg.num_steps - cfg.warmup_steps, 1)
    if cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(peak, decay_steps, end=0.0)
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(peak, 0.0, decay_steps)
    else:
        main = (lambda step: peak) if cfg.warmup_steps else peak
    if not cfg.warmup_steps:
        return main
    warmup = optim.linear_schedule(peak / cfg.warmup_steps, peak, cfg.warmup_steps - 1 or 1)
    if not callable(main):
        main = optim.linear_schedule(peak, peak, 1)
    return optim.join_schedules([warmup, main], [cfg.warmup_steps])


def build_optimizer(cfg: GRPOConfig) -> optim.Optimizer:
    lr = build_schedule(cfg)
    name = cfg.optimizer
    if name == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    if name == "adam":
        return optim.Adam(learning_rate=lr)
    if name == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=cfg.weight_decay)
    if name == "lion":
        return optim.Lion(learning_rate=lr, weight_decay=cfg.weight_decay)
    if name == "muon":
        if not hasattr(optim, "Muon"):
            raise MlxRftError("this MLX has no Muon optimizer; upgrade mlx or use adamw")
        return optim.Muon(learning_rate=lr, weight_decay=cfg.weight_decay)
    raise MlxRftError(f"unknown optimizer {name!r}")
