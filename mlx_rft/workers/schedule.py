"""When each step's rollouts are asked for, and from which worker (no MLX, no messages).

Versions count updates: version v is the trainer's weights after v optimizer steps, so step s
trains version s - 1 into version s. The job of step j (its rollouts) is sent once weights of
version >= j - 1 - k have gone out (k = max_staleness), so when step j trains, the rollouts' weights
are at most k versions behind. Weights go out every weight_sync_steps steps (and at the start).
With k = 0 the job of step j is sent right after the weights of step j - 1: the synchronous run.

Jobs go to the live workers in turn; each worker runs its jobs in the order they were sent, so
the trainer knows which worker's next message answers which job. A worker that fails hands its
unanswered jobs to the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class NoWorkersLeft(RuntimeError):
    pass


@dataclass
class JobSchedule:
    workers: list[int]  # the rollout workers' ranks
    start_step: int  # the step the trainer resumes from (0 for a new run)
    num_steps: int
    max_staleness: int = 1
    weight_sync_steps: int = 1
    published: int = field(init=False)  # the newest weight version sent to the workers
    next_step: int = field(init=False)  # the next step without a job
    queues: dict[int, list[int]] = field(init=False)  # worker -> steps it has yet to answer
    owner: dict[int, int] = field(init=False)  # step -> worker answering it
    lost: dict[int, str] = field(init=False)  # worker -> why it stopped
    _turn: int = field(init=False, default=0)

    def __post_init__(self):
        if not self.workers:
            raise ValueError("a schedule needs at least one rollout worker")
        if self.max_staleness < self.weight_sync_steps - 1:
            raise ValueError("max_staleness must be >= weight_sync_steps - 1")
        self.published = self.start_step
        self.next_step = self.start_step + 1
        self.queues = {w: [] for w in self.workers}
        self.owner, self.lost = {}, {}

    @property
    def live(self) -> list[int]:
        return [w for w in self.workers if w not in self.lost]

    def publish_due(self, step: int) -> bool:
        """Whether the weights after `step` go out: every weight_sync_steps steps, while some
        job is still to be sent."""
        return step % self.weight_sync_steps == 0 and self.next_step <= self.num_steps

    def publish(self, version: int) -> None:
        self.published = version

    def ready(self) -> list[tuple[int, int]]:
        """The (step, worker) jobs that may be sent now; they count as sent."""
        out = []
        while self.next_step <= self.num_steps and self.next_step - 1 - self.max_staleness <= self.published:
            out.append((self.next_step, self._assign(self.next_step)))
            self.next_step += 1
        return out

    def answered(self, step: int) -> None:
        worker = self.owner.pop(step)
        self.queues[worker].remove(step)

    def fail(self, worker: int, why: str) -> list[tuple[int, int]]:
        """Take `worker` out; its unanswered jobs go to the others: the (step, new worker) pairs.
        Raises NoWorkersLeft when none is left."""
        self.lost[worker] = why
        moved, self.queues[worker] = self.queues[worker], []
        if not self.live:
            raise NoWorkersLeft("; ".join(f"rank {w}: {r}" for w, r in self.lost.items()))
        return [(step, self._assign(step)) for step in moved]

    def staleness(self, step: int, version: int) -> int:
        """How many updates the trainer's weights at `step` are ahead of those that made its
        rollouts."""
        return step - 1 - version

    def _assign(self, step: int) -> int:
        live = self.live
        worker = live[self._turn % len(live)]
        self._turn += 1
        self.queues[worker].append(step)
        self.owner[step] = worker
        return worker
