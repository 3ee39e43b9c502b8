"""Which prompts each step sees: a seeded, resumable, rank-sharded sampler, and the held-out
split that keeps every copy of a prompt on one side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from ..errors import MlxRftError
from ..types import PromptExample
from .prompts import PromptDataset

# ---------------------------------------------------------------------------------------------
# Sampling and splitting


class PromptSampler:
    """Endless seeded batches of prompt indices, resumable exactly, sharded over ranks.

    Each epoch is a fresh permutation of range(n) drawn from numpy's Generator seeded with
    (seed, epoch), so any epoch can be rebuilt from the state alone. A step takes the next
    `batch_size` positions of the permutation (the global batch); a batch that runs past the end of
    an epoch continues in the next one, so every prompt is used exactly once per epoch. Rank r of
    world_size gets the r-th contiguous slice of the global batch: shards of one step are disjoint
    and together they are the global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise MlxRftError("cannot sample batches from an empty dataset; give it at least one row")
        if batch_size < 1:
            raise MlxRftError(f"batch_size is {batch_size}; it must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise MlxRftError(f"rank {rank} is outside world_size {world_size}")
        if batch_size % world_size:
            raise MlxRftError(
                f"the global batch size {batch_size} does not split evenly over {world_size} ranks; "
                f"use a multiple of {world_size}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0  # epoch of the next index to hand out
        self.position = 0  # its position within that epoch's permutation
        self.steps = 0  # batches handed out so far
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch `epoch` (a permutation of range(n))."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_global(self, size: int | None = None) -> list[int]:
        """The next `size` (default batch_size) indices of all ranks, in rank order, advancing
        the state."""
        size = self.batch_size if size is None else size
        out: list[int] = []
        while len(out) < size:
            perm = self.permutation(self.epoch)
            take = min(size - len(out), self.n - self.position)
            out.extend(int(i) for i in perm[self.position : self.position + take])
            self.position += take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def take(self, size: int) -> list[int]:
        """This rank's share of the next `size` global indices (extra prompts within a step,
        e.g. dynamic sampling's refills); `size` must split evenly over the ranks."""
        if size % self.world_size:
            raise MlxRftError(f"cannot split {size} prompts evenly over {self.world_size} ranks")
        per_rank = size // self.world_size
        return self.next_global(size)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[int]:
        """This rank's indices for the next step."""
        self.steps += 1
        return self.take(self.batch_size)

    @property
    def steps_per_epoch(self) -> float:
        return self.n / self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue with the exact next batch (JSON-serialisable)."""
        return {
            "n": self.n,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "position": self.position,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()` output. The dataset size and seed must match; the batch
        size may differ (the position counts prompts, not batches)."""
        if int(state["n"]) != self.n or int(state["seed"]) != self.seed:
            raise MlxRftError(
                f"the sampler state was saved for {state['n']} prompts with seed {state['seed']}, "
                f"but this run has {self.n} prompts with seed {self.seed}; resume with the same "
                "data and seed, or start a fresh run"
            )
        position = int(state["position"])
        if not 0 <= position < self.n:
            raise MlxRftError(
                f"the sampler state has position {position} outside 0..{self.n - 1}; it is corrupt, "
                "so resume from another checkpoint"
            )
        self.epoch, self.position = int(state["epoch"]), position
        self.steps = int(state.get("steps", 0))


T = TypeVar("T")


def _split_key(item: Any) -> str:
    if isinstance(item, PromptExample):
        return item.prompt
    if isinstance(item, dict):
        content = item.get("messages", item.get("prompt"))
        if content is not None:
            return json.dumps(content, sort_keys=True, default=str)
    return json.dumps(item, sort_keys=True, default=str)


def train_eval_split(
    dataset: PromptDataset | Sequence[T],
    *,
    eval_size: int | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """(train, eval) with no prompt in both: rows with identical prompts go to the same side.

    Give eval_size (rows) or eval_fraction (of all rows). Rows keep their original order on each
    side. A PromptDataset gives PromptDatasets, any other sequence gives lists.
    """
    n = len(dataset)
    if (eval_size is None) == (eval_fraction is None):
        raise MlxRftError("give exactly one of eval_size or eval_fraction for the held-out split")
    if eval_fraction is not None:
        if not 0.0 < eval_fraction < 1.0:
            raise MlxRftError(f"eval_fraction is {eval_fraction}; it must be between 0 and 1")
        eval_size = max(1, round(n * eval_fraction))
    if not 0 < eval_size < n:
        raise MlxRftError(
            f"eval_size {eval_size} must be between 1 and {n - 1} for a dataset of {n} rows, so "
            "both splits have rows"
        )
    groups: dict[str, list[int]] = {}
    for i in range(n):
        groups.setdefault(_split_key(dataset[i]), []).append(i)
    members = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(members))
    eval_idx: list[int] = []
    for g in order:
        if len(eval_idx) + len(members[g]) <= eval_size:
            eval_idx.extend(members[g])
        if len(eval_idx) == eval_size:
            break
    if len(members) < 2:
        raise MlxRftError(
            f"all {n} rows have the same prompt, so none can be held out for evaluation without "
            "also being trained on; give different prompts, or pass held-out rows yourself "
            "(eval_dataset= in Python, --eval-file on the command line)"
        )
    if not eval_idx:
        smallest = min(len(m) for m in members)
        raise MlxRftError(
            f"every prompt appears more than eval_size={eval_size} times (the rarest {smallest} "
            f"times), and a prompt's copies stay on one side; set eval_size to at least "
            f"{smallest} (below {n}), or pass held-out rows (eval_dataset= / --eval-file)"
        )
    in_eval = set(eval_idx)
    train_idx = [i for i in range(n) if i not in in_eval]
    eval_idx.sort()
    if isinstance(dataset, PromptDataset):
        return dataset.subset(train_idx), dataset.subset(eval_idx)
    return [dataset[i] for i in train_idx], [dataset[i] for i in eval_idx]
