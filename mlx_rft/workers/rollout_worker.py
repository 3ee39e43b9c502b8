"""A rollout worker's loop: take weights and jobs from the trainer, answer each job with the
step's rollouts and their rewards.

The worker builds the same model, adapters, data and rewards as the trainer (it runs the same
command), so a job needs only a step number and row indices, and weights only the trainable
tensors. Rewards are scored here, next to the rollouts: a judge server or the code sandbox runs
while the trainer updates.
"""

from __future__ import annotations

import sys
import time
import traceback

import mlx.core as mx
from mlx.utils import tree_unflatten

from ..errors import MlxRftError
from .link import ERROR, JOB, RESULT, STOP, WEIGHTS, Link
from .records import pack_rollouts


def serve(trainer, link: Link, trainer_rank: int = 0) -> int:
    """Answer jobs until the trainer says stop; returns the number of jobs answered.

    `trainer` is a GRPOTrainer set up on this rank (model, data, rewards) whose world is this
    process alone: its `_sample` generates and scores one step's rows as the synchronous run does.
    After a failure the worker reports it once, then only reads (so the trainer's messages in
    flight still arrive) until it is told to stop.
    """
    version, answered, failed = None, 0, False
    while True:
        # When the trainer is the slower side, this waits on the socket (see link.py); when the
        # workers are, the next job is already here.
        msg = link.recv(trainer_rank)
        if msg.kind == STOP:
            break
        if failed:
            continue
        if msg.kind == WEIGHTS:
            trainer.policy.update(tree_unflatten(list(zip(msg.header["names"], msg.tensors))))
            mx.eval(trainer.policy.parameters())
            version = int(msg.header["version"])
        elif msg.kind == JOB:
            step = int(msg.header["step"])
            try:
                seconds = {"generate": 0.0, "reward": 0.0}
                t0 = time.perf_counter()
                examples = [trainer.train_data[i] for i in msg.header["rows"]]
                rollouts, rewards = trainer._sample(step, 0, examples, seconds)
                header, arrays = pack_rollouts(rollouts, rewards)
                seconds["busy"] = time.perf_counter() - t0
                link.send(trainer_rank, RESULT, {**header, "step": step, "version": version,
                                                 "seconds": seconds, "finished_at": time.time()}, arrays)
                answered += 1
            except Exception as e:  # reported to the trainer, which hands the job to another worker
                traceback.print_exc(file=sys.stderr)
                why = str(e) if isinstance(e, MlxRftError) else f"{type(e).__name__}: {e}"
                link.send(trainer_rank, ERROR, {"step": step, "error": why})
                failed = True
    link.flush()
    return answered
