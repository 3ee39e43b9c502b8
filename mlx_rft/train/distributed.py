"""Data parallelism on MLX's own distributed layer (`mlx.launch`: ring, MPI or NCCL backends).

Each rank takes its own slice of every step's prompts, generates and scores them, and the maths is
made to equal the single-process run: the loss of each rank is normalised by *global* counts
(sequences, tokens), gradients are summed across ranks, and batch-level reward statistics are
all-reduced. Rank 0 alone writes logs, metrics and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map


@dataclass
class World:
    group: Any  # mx.distributed.Group, or None in a single process
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, x: mx.array) -> mx.array:
        """Sum over ranks (identity in a single process)."""
        if self.size == 1:
            return x
        # all_sum runs on the CPU stream: the ring backend has no GPU kernels.
        return mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)

    def sum_floats(self, *values: float) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        out = self.sum(mx.array(np.asarray(values, dtype=np.float64).astype(np.float32)))
        return [float(v) for v in np.asarray(out)]

    def sum_tree(self, tree):
        if self.size == 1:
            return tree
        return tree_map(self.sum, tree)

    def gather(self, x: np.ndarray) -> np.ndarray:
        """Concatenate equal-length 1-D float arrays from all ranks in rank order."""
        if self.size == 1:
            return np.asarray(x)
        out = mx.distributed.all_gather(mx.array(np.asarray(x, dtype=np.float32)), group=self.group, stream=mx.cpu)
        return np.asarray(out)


def init_world() -> World:
    """The process group set up by `mlx.launch`, or a single-process world."""
    if not mx.distributed.is_available():
        return World(None)
    group = mx.distributed.init()
    return World(group, group.rank(), group.size())
