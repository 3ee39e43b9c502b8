"""Optimizers from mlx.optimizers with warmup + constant / cosine / linear schedules."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config import GRPOConfig
from ..cpu.kernels import on_cpu
from ..errors import MlxRftError


def build_schedule(cfg: GRPOConfig, lr_scale: float = 1.0):
    """Learning rate as a function of the optimizer step (a float when constant without warmup).

    lr_scale multiplies the whole schedule (the collapse guard lowers it after a rollback); at 1.0
    the schedule is exactly the configured one."""
    peak = cfg.learning_rate if lr_scale == 1.0 else cfg.learning_rate * lr_scale
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


# The name of each optimizer's momentum buffer in its per-parameter state (Adam's "v" is its second
# moment; SGD's and Muon's "v" is their momentum).
MOMENTUM_KEYS = {"adamw": "m", "adam": "m", "lion": "m", "sgd": "v", "muon": "v"}


def build_optimizer(cfg: GRPOConfig, lr_scale: float = 1.0) -> optim.Optimizer:
    lr = build_schedule(cfg, lr_scale)
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


@mx.compile
def squared_distance(a: mx.array, b: mx.array) -> mx.array:
    """sum((a - b)^2) in float32 at least: the squared size of a parameter's change."""
    return mx.sum(mx.square(a.astype(mx.float32) - b.astype(mx.float32)))


def _balanced_groups(sizes: dict[str, int], n: int) -> list[list[str]]:
    """The keys in n groups of about equal total size (largest first into the lightest group)."""
    groups: list[list[str]] = [[] for _ in range(n)]
    totals = [0] * n
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        i = totals.index(min(totals))
        groups[i].append(key)
        totals[i] += sizes[key]
    return [sorted(g) for g in groups if g]


class CompiledApply:
    """Gradient clipping + the optimizer update as `mx.compile`d functions, on two CPU streams.

    `apply(grads) -> (grad_norm, change)`: the norm before clipping and the squared norm of the
    parameter change. Compiling fuses the optimizer's element-wise maths (AdamW: about ten
    operations per parameter) into a few loops. MLX's CPU backend runs a stream's element-wise
    work on one thread, so on the CPU the parameters are split into two groups of equal size, each
    updated on its own stream (both cores; `python bench/bench_train_parts.py`). The update itself
    is the optimizer's own: the first group goes through `apply_gradients` (the schedule and the
    step count advance once), the second through `apply_single` with the same state.

    The model's and the optimizer's state are declared as the compiled functions' inputs and
    outputs (mlx-lm's pattern), so the weights are read and written, never captured as constants;
    the functions are rebuilt whenever the optimizer's state object is replaced (resuming a
    checkpoint does that).
    """

    def __init__(
        self, model, optimizer: optim.Optimizer, max_grad_norm: float, streams: int | None = None
    ) -> None:
        self.model, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm
        if streams is None:
            streams = 2 if on_cpu() else 1
        self.streams = [mx.default_stream(mx.default_device())] + [
            mx.new_stream(mx.default_device()) for _ in range(streams - 1)
        ]
        self._fns = None
        self._state_obj = None

    def _build(self):
        model, optimizer = self.model, self.optimizer
        optimizer.init(model.trainable_parameters())  # keeps existing (resumed) state
        state = [model.state, optimizer.state]
        sizes = {k: v.size for k, v in tree_flatten(model.trainable_parameters())}
        groups = _balanced_groups(sizes, len(self.streams))

        @mx.compile
        def squared_sum(grads: list[mx.array]) -> mx.array:
            return sum((mx.sum(g.astype(mx.float32) ** 2) for g in grads), mx.array(0.0))

        def make_update(keys: list[str], first: bool):
            @partial(mx.compile, inputs=state, outputs=state)
            def update(grads: list[mx.array], normalizer: mx.array) -> mx.array:
                tree = tree_unflatten([(k, (g * normalizer).astype(g.dtype)) for k, g in zip(keys, grads)])
                old = dict(tree_flatten(model.trainable_parameters()))
                if first:  # advances the schedule and the step count, once per update
                    new = optimizer.apply_gradients(tree, model)
                else:
                    new = tree_map(optimizer.apply_single, tree, model, optimizer.state)
                model.update(new)
                return sum((squared_distance(n, old[k]) for k, n in tree_flatten(new)), mx.array(0.0))

            return update

        self._state_obj = optimizer.state
        return groups, squared_sum, [make_update(keys, i == 0) for i, keys in enumerate(groups)]

    def __call__(self, grads) -> tuple[mx.array, mx.array]:
        """(gradient norm before clipping, squared L2 norm of the parameter change), lazily.

        Evaluate the change first (`mx.eval(change, ...)`) with no other references to the old
        weights or the gradients: MLX then computes the update parameter by parameter and frees
        each old weight, moment and gradient as soon as its replacement exists, instead of holding
        all the old and new state at once (1.6x the weights' size more at the peak).
        """
        if self._fns is None or self.optimizer.state is not self._state_obj:
            self._fns = self._build()
        groups, squared_sum, updates = self._fns
        flat = dict(tree_flatten(grads))
        per_group = [[flat[k] for k in keys] for keys in groups]
        partial_sums = []
        for stream, g in zip(self.streams, per_group):
            with mx.stream(stream):
                partial_sums.append(squared_sum(g))
        norm = mx.sqrt(sum(partial_sums[1:], partial_sums[0]))
        if self.max_grad_norm > 0:  # as optim.clip_grad_norm
            normalizer = mx.minimum(self.max_grad_norm / (norm + 1e-6), 1.0)
        else:
            normalizer = mx.array(1.0)
        changes = []
        for stream, update, g in zip(self.streams, updates, per_group):
            with mx.stream(stream):
                changes.append(update(g, normalizer))
        return norm, sum(changes[1:], changes[0])
