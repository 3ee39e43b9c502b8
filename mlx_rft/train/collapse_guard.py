"""The collapse guard: go back to the last healthy weights when the policy stops learning.

GRPO learns only from groups whose completions got different rewards. A policy that answers each
prompt one fixed way gets equal rewards in every group, so nothing pulls it back: on a two-answer
task it ends up giving one answer to every prompt, right on the prompts that want it and wrong on
the others, and stays there (BENCHMARKS.md, *Collapse on a two-answer task*). The guard undoes it:

- After every healthy step it keeps the trainable weights and the optimizer state (as references:
  MLX never changes an array in place, so the snapshot costs one copy of them once the next update
  has replaced them), and it keeps the starting weights before step 1. A step is healthy when at
  least HEALTHY_SHARE of its groups carried signal and no fewer than in the run's average step so
  far: a collapse starts with steps that still carry some signal, only less than before, and those
  are not worth going back to. (How many groups carry signal in a good step depends on the task:
  nearly all on a two-answer task, about half on the default task.)
- After `guard_patience` steps in a row in which every group's completions got equal rewards while
  the prompts scored differently, it restores that snapshot, multiplies the learning rate by
  `guard_lr_factor` and continues on new prompts. The optimizer's momentum is zeroed: it points
  the way the run went from the snapshot on, into the collapse (kept, it carried a rolled-back
  run on the two-answer task straight into the same collapse); the other moments (Adam's second
  moment: the update's scale) go back as they were, and the step count (the position on the
  learning-rate schedule) carries on.
- At the next collapse after `guard_max_rollbacks` rollbacks it ends the run (exit code 3) with
  the snapshot's weights, saying what happened and what to change.

Steps in which every completion got one and the same reward (a constant reward, a task out of the
model's reach, or one it has solved) are not a collapse that going back can undo: as without the
guard, they end the run after `max_uninformative_steps`. The guard's counters and snapshot go into
checkpoints, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from ..config import GRPOConfig
from .optim import MOMENTUM_KEYS

# A step is healthy, and its weights worth going back to, when at least this share of its groups
# had completions with different rewards (and no less than the run's mean share so far).
HEALTHY_SHARE = 0.5

CHECKPOINT_NAME = "collapse_guard"  # <checkpoint>/collapse_guard.safetensors holds the snapshot


@dataclass
class Verdict:
    """What the trainer does after a step: "continue", "rollback" (restore the snapshot) or
    "stop" (end the run; with restore, after putting the snapshot's weights back)."""

    action: str = "continue"
    healthy: bool = False  # keep this step's weights as the snapshot
    message: str = ""
    restore: bool = False


@dataclass
class Snapshot:
    step: int
    params: dict[str, mx.array]  # flattened trainable parameters
    optimizer: dict[str, mx.array]  # flattened optimizer state

    @classmethod
    def take(cls, step: int, model: nn.Module, optimizer) -> Snapshot:
        params = dict(tree_flatten(model.trainable_parameters()))
        return cls(step, params, dict(tree_flatten(optimizer.state)))

    def restore(self, model: nn.Module, optimizer, momentum_key: str | None = None) -> None:
        """Put the weights and optimizer moments back into model and optimizer (a freshly built
        one, carrying the learning rate to use from now on; the step count is its own), with the
        state leaves named momentum_key zeroed."""
        model.load_weights(list(self.params.items()), strict=False)
        step_count, lr = optimizer.state["step"], optimizer.state["learning_rate"]
        optimizer.init(model.trainable_parameters())
        own = {"step": step_count, "learning_rate": lr}

        def leaf(path: str, fresh: mx.array) -> mx.array:
            if path in own:
                return own[path]
            if momentum_key and path.rsplit(".", 1)[-1] == momentum_key:
                return mx.zeros_like(fresh)
            return self.optimizer.get(path, fresh)  # the starting weights' snapshot has no moments

        optimizer.state = tree_map_with_path(leaf, optimizer.state)
        mx.eval(model.parameters(), optimizer.state)

    def tensors(self) -> dict[str, mx.array]:
        return {
            **{f"params/{k}": v for k, v in self.params.items()},
            **{f"optimizer/{k}": v for k, v in self.optimizer.items()},
        }

    @classmethod
    def from_tensors(cls, step: int, tensors: dict[str, mx.array]) -> Snapshot:
        def part(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(step, part("params/"), part("optimizer/"))


class CollapseGuard:
    """Counts the steps in a row with nothing to learn and decides, after each step, whether the
    run continues, rolls back to the snapshot or ends (see the module docstring).

    Off (collapse_guard false, or empty with full fine-tuning), it only ends the run after
    max_uninformative_steps, as before."""

    def __init__(self, cfg: GRPOConfig):
        self.enabled = cfg.guard_enabled
        self.patience, self.max_rollbacks = cfg.guard_patience, cfg.guard_max_rollbacks
        self.lr_factor, self.learning_rate = cfg.guard_lr_factor, cfg.learning_rate
        self.stop_after, self.group_size = cfg.max_uninformative_steps, cfg.group_size
        self.momentum_key = MOMENTUM_KEYS.get(cfg.optimizer)
        self.streak = 0  # steps in a row in which no group had differing rewards
        self.streak_differs = False  # ... and in one of them the prompts scored differently
        self.rollbacks, self.lr_scale = 0, 1.0
        self.share_sum, self.steps_seen = 0.0, 0  # informative share of the steps so far
        self.snapshot: Snapshot | None = None
        self.snapshot_step: int | None = None
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ decisions
    def observe(self, step: int, informative: float, groups: float, metrics: dict) -> Verdict:
        """informative / groups: the step's groups with differing rewards / all its groups (over
        every process); metrics: the step's, for reward/std (all completions) and the message."""
        share = informative / groups if groups > 0 else 0.0
        self.share_sum, self.steps_seen = self.share_sum + share, self.steps_seen + 1
        mean = self.share_sum / self.steps_seen
        healthy = self.enabled and share >= HEALTHY_SHARE and share >= mean - 1e-9  # (float sums)
        if informative > 0:
            self.streak, self.streak_differs = 0, False
            return Verdict(healthy=healthy)
        self.streak += 1
        std = metrics.get("reward/std")
        self.streak_differs |= std is not None and math.isfinite(std) and std > 0
        collapsed = self.streak >= self.patience and self.streak_differs
        if self.enabled and collapsed and self.snapshot_step is not None:
            if self.rollbacks < self.max_rollbacks:
                return self._roll_back(step, metrics)
            return Verdict("stop", message=self._give_up(step), restore=True)
        if self.stop_after and self.streak >= self.stop_after:
            message = nothing_learned(step, self.stop_after, self.group_size, metrics)
            return Verdict("stop", message=message)
        return Verdict()

    def _roll_back(self, step: int, metrics: dict) -> Verdict:
        first = step - self.streak + 1
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        self.streak, self.streak_differs = 0, False
        message = (
            f"collapse guard at step {step}: in steps {first}-{step} every group's completions got "
            f"the same reward while the prompts scored differently (mean reward "
            f"{metrics.get('reward/mean', float('nan')):.3f}, "
            f"{metrics.get('completion/distinct_per_group', float('nan')):.1f} distinct completions "
            "per group): each prompt's completions all score alike, so nothing pulls the policy "
            "back toward the prompts it gets wrong. "
            f"Restored the weights and optimizer state of step {self.snapshot_step} (momentum "
            f"zeroed: it pointed into the collapse) and lowered the learning rate to {self.learning_rate * self.lr_scale:.3g} ({self.lr_scale:g} x "
            f"--learning-rate); rollback {self.rollbacks} of {self.max_rollbacks}"
        )
        self.events.append({"step": step, "restored_step": self.snapshot_step,
                            "lr_scale": self.lr_scale, "message": message})
        return Verdict("rollback", message=message)

    def _give_up(self, step: int) -> str:
        first = step - self.streak + 1
        return (
            f"steps {first}-{step}: every group's completions got the same reward again after the "
            f"collapse guard rolled back {self.rollbacks} time(s) (learning rate now "
            f"{self.learning_rate * self.lr_scale:.3g}); the run ends with the weights of step "
            f"{self.snapshot_step}, the last healthy ones. To keep it learning try a lower "
            "--learning-rate, two updates per batch with clip-higher (--num-iterations 2 "
            "--epsilon-high 0.28), more --prompts-per-step, or a --guard-max-rollbacks above "
            f"{self.rollbacks}"
        )

    # ------------------------------------------------------------------ the snapshot
    def keep(self, step: int, model: nn.Module, optimizer) -> None:
        """Remember this step's weights and optimizer state as the last healthy ones."""
        self.snapshot = Snapshot.take(step, model, optimizer)
        self.snapshot_step = step

    def restore(self, model: nn.Module, optimizer) -> None:
        """Put the snapshot back (optimizer: a fresh one with the lowered learning rate)."""
        self.snapshot.restore(model, optimizer, self.momentum_key)

    def start(self, step: int, model: nn.Module, optimizer) -> None:
        """Before the first step of a run (or of a resume from a checkpoint without a snapshot):
        the starting weights are the first snapshot."""
        if self.enabled and self.snapshot is None:
            self.keep(step, model, optimizer)

    # ------------------------------------------------------------------ logs and checkpoints
    def metrics(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        return {"guard/rollbacks": float(self.rollbacks), "guard/lr_scale": self.lr_scale}

    def summary(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "events": self.events}

    def state_dict(self) -> dict[str, Any]:
        return {
            "streak": self.streak, "streak_differs": self.streak_differs, "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale, "snapshot_step": self.snapshot_step, "events": self.events,
            "share_sum": self.share_sum, "steps_seen": self.steps_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak, self.streak_differs = int(state["streak"]), bool(state["streak_differs"])
        self.rollbacks, self.lr_scale = int(state["rollbacks"]), float(state["lr_scale"])
        self.snapshot_step, self.events = state["snapshot_step"], list(state["events"])
        self.share_sum, self.steps_seen = float(state["share_sum"]), int(state["steps_seen"])

    def checkpoint_tensors(self, step: int) -> dict[str, dict[str, mx.array]]:
        """The snapshot for a checkpoint at `step`; nothing when it is that step's own state."""
        if self.snapshot is None or self.snapshot.step == step:
            return {}
        return {CHECKPOINT_NAME: self.snapshot.tensors()}

    def load(self, state: dict[str, Any] | None, tensors: dict[str, mx.array] | None, step: int,
             model: nn.Module, optimizer) -> None:
        """Restore the guard from a checkpoint at `step` (model and optimizer already loaded);
        a checkpoint written without the guard leaves it fresh."""
        if not state:
            return
        self.load_state_dict(state)
        if self.snapshot_step is None:
            return
        if tensors is None:  # the checkpoint's own state was the snapshot
            self.snapshot = Snapshot.take(step, model, optimizer)
        else:
            self.snapshot = Snapshot.from_tensors(self.snapshot_step, tensors)


def nothing_learned(step: int, limit: int, group_size: int, metrics: dict) -> str:
    """Why a run with max_uninformative_steps steps in a row of equal rewards ends, and what to do."""
    return (
        f"steps {step - limit + 1}-{step}: in every group all {group_size} completions got the same "
        f"reward (mean reward {metrics['reward/mean']:.3f}, "
        f"{metrics['completion/distinct_per_group']:.1f} distinct completions per group), so "
        "nothing was learned. If the samples are identical the policy has collapsed: lower "
        "--learning-rate, add an entropy bonus (--entropy-coef) or raise --temperature; if "
        "the task is too hard or too easy, change it or use --dynamic-sampling "
        "(max_uninformative_steps 0 never stops)"
    )
