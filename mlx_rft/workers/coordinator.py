"""The trainer's side of separate rollout workers: it sends weights and jobs, and takes back
each step's rollouts and rewards.

A job is a step number and the prompt rows of that step, from a copy of the trainer's own
sampler run ahead. The step also fixes the sampling seed, so a worker draws exactly what the
synchronous trainer would have drawn with the same weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from ..data import PromptSampler
from ..errors import MlxRftError
from .link import ERROR, JOB, RESULT, STOP, WEIGHTS, Link, Message, PeerLost
from .records import unpack_rollouts
from .schedule import JobSchedule, NoWorkersLeft


class RolloutWorkersFailed(MlxRftError):
    """Every rollout worker has stopped; the run cannot go on."""


@dataclass
class Job:
    step: int
    rows: list[int]  # indices into the training set


@dataclass
class Delivery:
    """One step's rollouts as a worker sent them."""

    job: Job
    message: Message  # RESULT: records.unpack_rollouts reads its header and arrays
    worker: int
    version: int  # the weight version that made them
    staleness: int
    wait_seconds: float  # how long the trainer waited for them


def stop_workers(link: Link, workers: list[int]) -> None:
    """Tell these workers to stop (also those never given a job, when the run had nothing left
    to do or failed before its first step)."""
    for worker in workers:
        try:
            link.send(worker, STOP)
        except PeerLost:
            pass
    try:
        link.flush()
    except PeerLost:
        pass


# Job times vary a lot from step to step (the longest completion sets a job's decode steps), and
# a trainer that sleeps past a result also delays the next job, so the estimate is the shortest
# of a worker's last few jobs, woken this share of it early.
WAKE_EARLY = 0.25
RECENT_JOBS = 4


class Wakeups:
    """When to expect each worker's next result: each worker runs its jobs in order, one after
    another, each taking at least about as long as its shortest recent one (the workers report
    when they finished and how long they were busy)."""

    def __init__(self):
        self.recent: dict[int, list[float]] = {}  # worker -> seconds of its last jobs
        self.sent_at: dict[int, float] = {}  # step -> when its job was sent
        self.done_at: dict[int, float] = {}  # worker -> when it finished its last job

    def sent(self, step: int) -> None:
        self.sent_at[step] = time.time()

    def answered(self, worker: int, header: dict) -> None:
        self.sent_at.pop(int(header["step"]), None)
        times = self.recent.setdefault(worker, [])
        times.append(float(header["seconds"]["busy"]))
        del times[:-RECENT_JOBS]
        self.done_at[worker] = float(header["finished_at"])

    def expected(self, step: int, queue: list[int], worker: int) -> float | None:
        """A time.time() shortly before the result of `step` (in `worker`'s queue) should come."""
        if worker not in self.recent:
            return None
        busy, free = min(self.recent[worker]), self.done_at[worker]
        for j in queue:
            free = max(self.sent_at.get(j, free), free) + busy
            if j == step:
                break
        # never more than one job's time from now, whatever the two clocks say
        return min(free - WAKE_EARLY * busy, time.time() + (1 - WAKE_EARLY) * busy)


class RolloutCoordinator:
    def __init__(
        self, link: Link, schedule: JobSchedule, sampler: PromptSampler,
        log: Callable[[str], None] = print,
    ):
        self.link, self.schedule, self.log = link, schedule, log
        # The trainer's sampler advances when a step trains; this copy runs ahead to the jobs.
        self.sampler = PromptSampler(sampler.n, sampler.batch_size, seed=sampler.seed)
        self.sampler.load_state_dict(sampler.state_dict())
        self.jobs: dict[int, Job] = {}
        self._results: dict[int, tuple[Message, int]] = {}
        self._draining: set[int] = set()  # failed workers still reading (they get STOP at the end)
        self.wakeups = Wakeups()
        self._outbox: list[tuple] = []  # (worker, kind, header, tensors) queued by this step

    def start(self, policy) -> None:
        """Send the starting weights to every worker, then the first jobs."""
        self._publish(self.schedule.start_step, policy)
        self._send_ready()
        self._post()

    def after_step(self, step: int, policy) -> None:
        """The weights after `step` go out when due, then every job they allow."""
        if self.schedule.publish_due(step):
            self._publish(step, policy)
        self._send_ready()
        self._post()

    def take(self, step: int) -> Delivery:
        """The rollouts of `step` (blocks until they arrive)."""
        t0 = time.perf_counter()
        while step not in self._results:
            worker = self.schedule.owner[step]
            wake = self.wakeups.expected(step, self.schedule.queues[worker], worker)
            try:
                msg = self.link.recv(worker, not_before=wake)
            except PeerLost as e:
                self._fail(worker, str(e), reading=False)
                continue
            if msg.kind == ERROR:
                self._fail(worker, msg.header.get("error", "unknown error"), reading=True)
                continue
            if msg.kind != RESULT:
                raise MlxRftError(f"rollout worker rank {worker} sent a {msg.name} message; expected rollouts")
            answered = int(msg.header["step"])
            self.schedule.answered(answered)
            self.wakeups.answered(worker, msg.header)
            self._results[answered] = (msg, worker)
        msg, worker = self._results.pop(step)
        version = int(msg.header["version"])
        return Delivery(
            self.jobs.pop(step), msg, worker, version, self.schedule.staleness(step, version),
            time.perf_counter() - t0,
        )

    def collect(self, step: int, sampler: PromptSampler, train_data, seconds: dict[str, float]):
        """The trainer's view of a step's delivery: its examples, rollouts, rewards and where
        they came from (metric name -> value). `sampler` (the trainer's, saved in checkpoints)
        moves on one step, as in the synchronous run; the worker's generation and reward times
        are added to `seconds`."""
        d = self.take(step)
        rows = [int(i) for i in next(sampler)]
        if rows != d.job.rows:  # the job's rows came from a copy of this sampler run ahead
            raise RuntimeError(f"step {step}: the job's rows {d.job.rows} are not the sampler's {rows}")
        examples = [train_data[i] for i in rows]
        rollouts, rewards = unpack_rollouts(d.message.header, d.message.arrays, examples)
        worker_seconds = d.message.header["seconds"]
        seconds["generate"] += worker_seconds["generate"]
        seconds["reward"] += worker_seconds["reward"]
        source = {
            "async/staleness": float(d.staleness), "async/weights_version": float(d.version),
            "async/worker": float(d.worker), "time/wait": d.wait_seconds,
            "time/worker_busy": worker_seconds["busy"],
        }
        return examples, rollouts, rewards, source

    def close(self) -> None:
        """Tell every worker still reading to stop, and wait until the messages are written."""
        stop_workers(self.link, [*self.schedule.live, *sorted(self._draining)])

    # ------------------------------------------------------------------
    def _publish(self, version: int, policy) -> None:
        names, tensors = zip(*tree_flatten(policy.trainable_parameters()))
        mx.eval(tensors)
        for worker in self.schedule.live:
            self._outbox.append((worker, WEIGHTS, {"version": version, "names": list(names)}, tensors))
        self.schedule.publish(version)

    def _send_ready(self) -> None:
        for step, worker in self.schedule.ready():
            job = Job(step, [int(i) for i in next(self.sampler)])
            self.jobs[step] = job
            self._send_job(worker, job)

    def _send_job(self, worker: int, job: Job) -> None:
        self.wakeups.sent(job.step)
        self._outbox.append((worker, JOB, {"step": job.step, "rows": job.rows}, ()))

    def _post(self) -> None:
        """Send what this step queued."""
        for worker, kind, header, tensors in self._outbox:
            self.link.send(worker, kind, header, tensors=tensors)
        self._outbox.clear()

    def _fail(self, worker: int, why: str, *, reading: bool) -> None:
        """A worker stopped: report it and hand its jobs to the others (or give up)."""
        if reading:
            self._draining.add(worker)
        try:
            moved = self.schedule.fail(worker, why)
        except NoWorkersLeft as e:
            raise RolloutWorkersFailed(
                f"every rollout worker has stopped ({e}); fix the cause and resume the run with "
                "--resume latest"
            ) from None
        self.log(
            f"warning: rollout worker rank {worker} stopped ({why}); its {len(moved)} pending "
            f"job(s) go to rank(s) {sorted({w for _, w in moved}) or self.schedule.live}"
        )
        for step, new_worker in moved:
            self._send_job(new_worker, self.jobs[step])
        self._post()
