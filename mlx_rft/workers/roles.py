"""Which rank does what when rollouts are made by separate workers."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import MlxRftError
from .link import Link

TRAINER_RANK = 0


@dataclass
class Roles:
    link: Link
    rank: int
    workers: list[int]  # the rollout workers' ranks
    trainer: int = TRAINER_RANK

    @property
    def is_trainer(self) -> bool:
        return self.rank == self.trainer


def split_roles(world, num_workers: int) -> Roles | None:
    """Rank 0 trains, ranks 1..num_workers make rollouts; None when num_workers is 0."""
    if not num_workers:
        return None
    need = num_workers + 1
    if world.size != need:
        raise MlxRftError(
            f"rollout_workers={num_workers} needs {need} processes (1 trainer + {num_workers} "
            f"worker{'s' if num_workers > 1 else ''}) but this run has {world.size}; launch it "
            f"with `mlx.launch -n {need} ...` "
            f"or a host file of {need} entries"
        )
    # The ring backend links each process to its two neighbours only, so the trainer can reach
    # ranks 1 and size - 1 and no others.
    if "MLX_HOSTFILE" in os.environ and num_workers > 2:
        raise MlxRftError(
            f"rollout_workers={num_workers}: over the ring backend rank 0 reaches only its two "
            "neighbours, so at most 2 rollout workers; use --backend mpi for more"
        )
    return Roles(Link(world.group), world.rank, list(range(1, need)))
