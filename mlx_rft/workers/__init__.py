"""Generation and training as separate processes: rank 0 trains, ranks 1..N make rollouts.

    roles.py        which rank does what (`mlx.launch -n 1+N`), checked against the backend
    link.py         messages over mx.distributed send / recv (head, npz payload, raw tensors)
    schedule.py     which step's job goes to which worker, and when (max_staleness, weight sync)
    coordinator.py  the trainer's side: weights and jobs out, rollouts and rewards in
    rollout_worker.py  a worker's loop: weights in, jobs answered with scored rollouts
    records.py      a step's rollouts and rewards as a payload and back

The trainer's step is the synchronous one with `collect` reading a worker's delivery instead of
generating; with max_staleness 0 the run is the synchronous run.
"""

from .coordinator import RolloutCoordinator, RolloutWorkersFailed, stop_workers
from .roles import Roles, split_roles
from .schedule import JobSchedule

__all__ = ["JobSchedule", "Roles", "RolloutCoordinator", "RolloutWorkersFailed", "split_roles", "stop_workers"]
