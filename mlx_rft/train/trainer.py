"""The GRPO-family training loop.

One step (`train/step.py` names its stages and records): prompts -> rollouts (G per prompt) ->
rewards (once) -> group advantages -> reference log-probs (beta > 0 only) -> micro-batches ->
`num_iterations` optimizer updates, each accumulating gradients over the micro-batches ->
metrics -> checkpoint.

Kept from the GRPO/DAPO papers: group-relative advantages, clipped importance ratios, optional
k3 KL to a frozen reference. The old-policy log-probs are the behaviour log-probs the rollout
engine recorded while sampling (exact float32 log_softmax(logits / T)), so no extra forward pass is
spent on them. Seeds are derived from (seed, step), so a resumed run replays the same samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import cpu
from ..algo.advantages import RewardMoments, group_advantages
from ..config import GRPOConfig
from ..data import PromptDataset, PromptSampler
from ..errors import MlxRftError
from ..evaluate import columns_per_row, evaluate_prompts
from .health import HealthMonitor
from ..models import load_model, resolve_model_path
from ..policy.adapters import adapters_fused
from ..policy.logprobs import sequence_logprobs
from ..rewards import RewardSet
from ..rewards.base import RewardResult
from ..rollout import generate_rollouts
from ..timeseries.prompt_data import is_series_source, series_policy
from ..types import PromptExample, RolloutBatch
from ..workers import JobSchedule, RolloutCoordinator, RolloutWorkersFailed, split_roles, stop_workers
from ..workers.rollout_worker import serve as serve_rollouts
from . import checkpoint as ckpt
from . import run_folder
from .collapse_guard import CHECKPOINT_NAME as GUARD_TENSORS, CollapseGuard, Verdict
from .distributed import World, init_world
from .console import RunConsole
from .metrics import build_reporters
from .report import write_report
from .optim import CompiledApply, build_optimizer, squared_distance
from .policy import ReferencePolicy, adapter_config, count_parameters, setup_trainable
from .dynamic_sampling import choose_groups, informative_groups, local_groups, sampling_metrics
from .run_data import build_run_data
from .signals import GracefulStop
from .step import (
    BatchFn, LossFn, Trajectory, TrainBatch, UpdateStats, combine_loss_stats, grpo_loss,
    rollout_records, row_keep, step_metrics, train_batches,
)


EXIT_NOTHING_LEARNED = 3  # the exit code of a run ended by max_uninformative_steps or the guard


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    # 128 + the signal that stopped the run (130 Ctrl-C, 143 SIGTERM); EXIT_NOTHING_LEARNED when
    # it ended early because nothing could be learned (stop_reason says why).
    exit_code: int = 0
    stop_reason: str | None = None


@dataclass
class RunState:
    """What a checkpoint restores: the step reached, the data position and the history."""

    step: int
    sampler: PromptSampler
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step) so resume replays the same samples."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


class GRPOTrainer:
    """`GRPOTrainer(config, reward_funcs=[...], train_dataset=rows).train()`.

    reward_funcs: callables `(prompts, completions, **columns) -> list[float | None]` or spec
    strings (built-in names, `module:function`, `file.py:function`). Empty: the task's own.
    train_dataset / eval_dataset: lists of row dicts (`prompt` or `messages` + columns), a
    `datasets.Dataset`, or a `DatasetDict` (its "train" split; its "test"/"validation" split is the
    eval set unless eval_dataset is given), or None to use `config.train_file` / `config.task` /
    the default task.
    loss: a `train.step.LossFn` `(model, TrainBatch, totals) -> (loss, stats)` instead of the
    configured GRPO-family loss; batches: a `train.step.BatchFn` `(Trajectory, config) ->
    (TrainBatch list, row indices)` instead of `train_batches`. Both are seams for new
    algorithms: the rest of the step stays as it is.
    """

    def __init__(
        self,
        config: GRPOConfig,
        reward_funcs: Sequence[Callable | str] | None = None,
        train_dataset: Sequence[dict] | None = None,
        eval_dataset: Sequence[dict] | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        console: Any = None,
        loss: LossFn | None = None,
        batches: BatchFn | None = None,
    ):
        self.cfg = config.validate()
        self._reward_specs = list(reward_funcs or [])
        self._train_rows = train_dataset
        self._eval_rows = eval_dataset
        self.model = model
        self.policy: nn.Module | None = None  # what trains: the model, or a TimeSeriesLM around it
        self.tokenizer = tokenizer
        # A RunConsole, or a rich Console to wrap in one (bars when config.progress and a
        # terminal), or None for plain printed lines.
        self.console = console if isinstance(console, RunConsole) else RunConsole(console, self.cfg.progress)
        self.loss_fn = loss or grpo_loss(self.cfg)
        self.make_batches = batches or train_batches
        # Filled by train(): the process group, the model folder and the trainable setup...
        self.world = None
        self.roles = self.remote = None  # separate rollout workers: the ranks' roles, the coordinator
        self.model_dir: Path | None = None
        self.fingerprint = self.data_fingerprint = ""
        self.optimizer = self.apply_update = self.reference = self.adapter_cfg = None
        self.param_counts = None
        # ... the data and rewards ...
        self.train_data: PromptDataset | None = None
        self.eval_data: PromptDataset | None = None
        self.rewards: RewardSet | None = None
        self.eval_reward: RewardSet | None = None
        self.episodes = None  # an EpisodeSetup for multi-turn episodes (--env / --tools)
        # ... and the run's watchers.
        self.health = HealthMonitor(log_warnings=False)
        self.guard = CollapseGuard(self.cfg)  # counts steps with nothing to learn; rolls back
        self.unscored_steps = 0

    # ------------------------------------------------------------------ setup
    def _log(self, msg: str) -> None:
        self.console.log(msg)

    def _setup_model(self) -> None:
        cfg = self.cfg
        if self.model is None:
            self.model, self.tokenizer = load_model(self.model_dir, dtype=cfg.dtype)
        mx.random.seed(cfg.seed)  # LoRA initialisation
        num_adapted_layers = setup_trainable(self.model, cfg)
        self.adapter_cfg = (
            None if cfg.finetune_type == "full" else adapter_config(cfg, num_adapted_layers)
        )
        self.policy = self.model
        series = self._train_rows is None and is_series_source(cfg.task, cfg.train_file)
        if cfg.finetune_type == "none" and not series:
            raise MlxRftError(
                "finetune_type none freezes the whole model, which leaves nothing to train on text "
                "rows; use lora, dora or full (none is for time-series rows)"
            )
        if series:
            # Series rows: the encoder + projector train with the LLM's adapters.
            if cfg.beta > 0:
                raise MlxRftError(
                    "--beta above 0 is not supported with time-series rows yet (the reference "
                    "policy would need an encoder of its own); use --beta 0"
                )
            if cfg.off_policy_correction != "none" and cfg.num_iterations > 1:
                raise MlxRftError(
                    "off_policy_correction with num_iterations above 1 is not supported with "
                    "time-series rows yet; use --num-iterations 1"
                )
            self.policy = series_policy(self.model, cfg.encoder)
            mx.eval(self.policy.parameters())
        self.param_counts = count_parameters(self.policy)
        self.reference = ReferencePolicy(
            self.model, cfg, load_copy=lambda: load_model(self.model_dir, dtype=cfg.dtype)[0]
        )
        self._set_optimizer(1.0)

    def _set_optimizer(self, lr_scale: float, state: dict | None = None) -> None:
        """A new optimizer whose learning rate is lr_scale x the configured schedule, holding
        `state` (an optimizer state tree) when given, and the compiled update for it."""
        self.optimizer = build_optimizer(self.cfg, lr_scale)
        if state is not None:
            self.optimizer.state = state
        self.apply_update = CompiledApply(self.policy, self.optimizer, self.cfg.max_grad_norm)

    def _setup_data(self) -> None:
        data = build_run_data(
            self.cfg, self.tokenizer, self._train_rows, self._eval_rows, self._reward_specs
        )
        if data.train.skipped_bad:
            self._log(f"skipped {data.train.skipped_bad} malformed rows of {data.train.source}")
        self.train_data, self.eval_data = data.train, data.eval
        self.episodes = data.episodes
        self.data_fingerprint = run_folder.data_fingerprint(data.train)  # checked on resume
        self.rewards, self.eval_reward = data.rewards, data.eval_reward

    # ------------------------------------------------------------------ pieces
    def embed(self, examples: Sequence[PromptExample]):
        """Left-padded input embeddings of prompts with soft tokens (None for text prompts)."""
        if self.policy is self.model or not examples or examples[0].pieces is None:
            return None
        return self.policy.embed([e.pieces for e in examples], pad_left=True)[0]

    def generate(self, examples: Sequence[PromptExample], group_size: int, sampling, seed, **kw) -> RolloutBatch:
        """G samples of each example: completions, or episodes with their environments."""
        emb = self.embed(examples)
        if emb is not None:
            kw["prompt_embeddings"] = emb
        with adapters_fused(self.model):
            if self.episodes:
                return self.episodes.rollouts(
                    self.model, self.tokenizer, examples, group_size, sampling, seed=seed, **kw
                )
            return generate_rollouts(
                self.model, self.tokenizer, [e.prompt_ids for e in examples], group_size, sampling,
                seed=seed, **kw,
            )

    def score(self, reward_set: RewardSet, examples, rollouts: RolloutBatch) -> RewardResult:
        """Run every reward function once on the step's completions."""
        prompts = [e.prompt for e in examples for _ in range(rollouts.group_size)]
        columns = columns_per_row(examples, rollouts.group_size)
        ids, mask = np.asarray(rollouts.completion_ids), np.asarray(rollouts.completion_mask)
        columns["completion_ids"] = [row[m > 0].tolist() for row, m in zip(ids, mask)]
        if rollouts.episodes is not None:
            columns["episode"] = rollouts.episodes
        return reward_set(prompts, rollouts.texts, columns)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out score with the first reward (pass@1; pass@k when eval_k > 1)."""
        cfg = self.cfg
        temp = cfg.eval_temperature if cfg.eval_k == 1 else (cfg.eval_temperature or 1.0)
        sampling = dataclasses.replace(
            cfg.sampling_config(), temperature=temp, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0
        )
        label = "eval before" if step == 0 else "eval after" if step == cfg.num_steps else f"eval step {step}"
        with adapters_fused(self.model), self.console.eval_progress(len(self.eval_data), label) as advance:
            out = evaluate_prompts(
                self.model, self.tokenizer, list(self.eval_data), self.eval_reward,
                k=cfg.eval_k, sampling=sampling, seed=step_seed(cfg.seed, 0, salt=17), progress=advance,
                generate=self.generate if self.policy is not self.model or self.episodes else None,
            )
        if out["eval/unscored"]:
            self.console.warn(
                f"warning: {out['eval/unscored']:.0f} of {len(self.eval_data) * cfg.eval_k} eval "
                f"samples could not be scored by {self.eval_reward.names[0]!r}; they count as 0"
            )
        if "eval/distinct_answers" in out and out["eval/distinct_answers"] <= 1 and len(self.eval_data) > 1:
            self.console.alarm(
                f"health alarm: every one of the {len(self.eval_data)} held-out prompts got the same "
                "answer; the score is that answer's share, not learning (see eval/constant_baseline)"
            )
        return out

    # ------------------------------------------------------------------ stages of a step
    def collect(self, step: int, sampler: PromptSampler) -> Trajectory:
        """Prompts -> rollouts -> rewards -> advantages and the loss mask.

        With dynamic_sampling, more prompts are drawn within the step until it holds
        prompts_per_step groups whose rewards differ (or max_sampling_rounds ran); the step
        trains on those groups alone (see dynamic_sampling.py)."""
        cfg, world = self.cfg, self.world
        t = {"generate": 0.0, "reward": 0.0}
        source = {}
        if self.remote is not None:  # a rollout worker made and scored them
            examples, rollouts, rewards, source = self.remote.collect(step, sampler, self.train_data, t)
        else:
            examples = [self.train_data[i] for i in next(sampler)]
            rollouts, rewards = self._sample(step, 0, examples, t)
        self._check_scored(step, rewards)
        drawn_rewards, sampling = rewards.total, {}
        if cfg.dynamic_sampling:
            examples, rollouts, rewards, sampling, drawn_rewards = self._fill_informative(
                step, sampler, examples, rollouts, rewards, t
            )

        batch_stats = None
        if world.size > 1 and cfg.scale_rewards == "batch":
            moments = RewardMoments.from_array(world.sum_floats(*RewardMoments.of(rewards.total).as_array()))
            batch_stats = moments.mean_std()
        adv = group_advantages(rewards.total, cfg.group_size, scale=cfg.scale_rewards, batch_stats=batch_stats)
        keep = row_keep(adv, rollouts, cfg)
        return Trajectory(
            examples=examples, rollouts=rollouts, rewards=rewards, advantages=adv, row_keep=keep,
            loss_mask=rollouts.completion_mask * mx.array(keep)[:, None],
            seconds=t, drawn_rewards=drawn_rewards, sampling=sampling, source=source,
        )

    def _sample(self, step: int, round_: int, examples, seconds: dict[str, float]):
        """One generation round: G completions of each example, scored."""
        cfg, world, G = self.cfg, self.world, self.cfg.group_size
        n_local = len(examples) * G
        t0 = time.perf_counter()
        # Rows are numbered globally so each sample's random draws match the single-process run.
        seed = step_seed(cfg.seed, step) if round_ == 0 else step_seed(cfg.seed, step, salt=1000 + round_)
        rollouts = self.generate(
            examples, G, cfg.sampling_config(), seed=seed,
            row_offset=world.rank * n_local, total_rows=world.size * n_local,
        )
        mx.eval(rollouts.completion_ids, rollouts.logprobs)
        seconds["generate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        rewards = self.score(self.rewards, examples, rollouts)
        seconds["reward"] += time.perf_counter() - t0
        return rollouts, rewards

    def _fill_informative(self, step, sampler, examples, rollouts, rewards, seconds):
        """Dynamic sampling: refill rounds of prompts_per_step prompts until the step has found
        that many informative groups (or max_sampling_rounds ran), then keep the first ones.

        The decisions are global: every rank sees every group's flag, in the order a single
        process draws them, so the kept groups are the single-process run's (a rank may hold
        more of them than another, or none)."""
        cfg, world, G = self.cfg, self.world, self.cfg.group_size
        B = cfg.prompts_per_step
        rounds = [(examples, rollouts, rewards)]
        flags = [world.gather(informative_groups(rewards.total, G).astype(np.float32)) > 0]
        while sum(int(f.sum()) for f in flags) < B and len(rounds) < cfg.max_sampling_rounds:
            more = [self.train_data[i] for i in sampler.take(B)]
            ro, rw = self._sample(step, len(rounds), more, seconds)
            rounds.append((more, ro, rw))
            flags.append(world.gather(informative_groups(rw.total, G).astype(np.float32)) > 0)
        informative = np.concatenate(flags)  # [rounds * B], global draw order
        local = local_groups(choose_groups(informative, B), B, world.size, world.rank)
        rows = np.array([g * G + j for g in local for j in range(G)], dtype=np.int64)
        all_rewards = RewardResult.concat([r[2] for r in rounds])
        all_examples = [e for r in rounds for e in r[0]]
        return (
            [all_examples[g] for g in local],
            RolloutBatch.concat([r[1] for r in rounds]).select_groups(local),
            all_rewards.select(rows), sampling_metrics(informative, B), all_rewards.total,
        )

    def add_reference(self, traj: Trajectory) -> None:
        """The reference policy's log-probs of the completions (the KL term; beta > 0 only),
        and the proximal ones of an off-policy correction over several updates."""
        t0 = time.perf_counter()
        if self.cfg.beta > 0 and traj.rollouts.num_rows:  # (a process may hold no group)
            ref_lp, _ = self.reference.run(lambda m: sequence_logprobs(
                m, traj.prompt_ids, traj.rollouts.completion_ids, traj.loss_mask, traj.group_size,
                self.cfg.temperature,
            ))
            traj.ref_logprobs = mx.stop_gradient(ref_lp)
            mx.eval(traj.ref_logprobs)
        # An off-policy correction over several updates needs this step's weights' log-probs
        # (with one update they are the loss's own, at no cost).
        if self.cfg.off_policy_correction != "none" and self.cfg.num_iterations > 1 and traj.rollouts.num_rows:
            prox, _ = sequence_logprobs(
                self.model, traj.prompt_ids, traj.rollouts.completion_ids, traj.loss_mask,
                traj.group_size, self.cfg.temperature,
            )
            traj.proximal_logprobs = mx.stop_gradient(prox)
            mx.eval(traj.proximal_logprobs)
        traj.seconds["logprobs"] = time.perf_counter() - t0

    def update(self, loss_and_grad, batches: list[TrainBatch], totals: dict[str, float]) -> UpdateStats:
        """One optimizer update: accumulate gradients over micro-batches, clip, apply, eval."""
        grads = grads_acc = None
        per_batch, loss_acc = [], 0.0
        for batch in batches:
            (loss, stats), grads = loss_and_grad(self.policy, batch, totals)
            grads_acc = grads if grads_acc is None else tree_map(mx.add, grads_acc, grads)
            mx.eval(loss, grads_acc, stats)
            loss_acc += loss.item()
            per_batch.append(({k: float(v.item()) for k, v in stats.items()}, float(batch.mask.sum().item())))
        if grads_acc is None:  # nothing on this process changes the gradient
            grads_acc = tree_map(mx.zeros_like, self.policy.trainable_parameters())
        grads_acc = self.world.sum_tree(grads_acc)
        loss_acc = self.world.sum_floats(loss_acc)[0]
        grad_norm, change = self.apply_update(grads_acc)
        del grads_acc, grads  # the update frees each gradient once applied (see CompiledApply)
        mx.eval(change, self.policy.parameters(), self.optimizer.state, grad_norm)
        return UpdateStats(loss_acc, grad_norm.item(), math.sqrt(change.item()), combine_loss_stats(per_batch))

    def _check_scored(self, step: int, rewards: RewardResult) -> None:
        """Stop a run whose rewards cannot score anything (every rank decides the same)."""
        unscored = self.world.sum_floats(float(rewards.num_unscored), float(rewards.num_rows))
        if unscored[0] < unscored[1]:
            self.unscored_steps = 0
            return
        self.unscored_steps += 1
        limit = self.cfg.max_unscored_steps
        if limit and self.unscored_steps >= limit:
            raise MlxRftError(
                f"step {step}: no completion could be scored for {self.unscored_steps} step(s) in a "
                f"row ({rewards.unscored_reason()}); fix the reward or its data columns (or raise "
                "max_unscored_steps); the last checkpoint is kept"
            )

    def _watch(self, step: int, traj: Trajectory, metrics: dict) -> Verdict:
        """The collapse guard's decision after a step (the same on every rank), carried out: keep
        a healthy step's weights, or put the last healthy ones back (see collapse_guard.py)."""
        groups = len(traj.examples)
        groups, informative = self.world.sum_floats(
            float(groups), float(groups - traj.advantages.num_zero_std_groups)
        )
        verdict = self.guard.observe(step, informative, groups, metrics)
        if verdict.action == "rollback" or verdict.restore:
            step_count = self.optimizer.state["step"]  # the schedule carries on from here
            self._set_optimizer(self.guard.lr_scale)
            self.optimizer.state["step"] = step_count
            self.guard.restore(self.policy, self.optimizer)
        elif verdict.healthy:
            self.guard.keep(step, self.policy, self.optimizer)
        metrics.update(self.guard.metrics())
        return verdict

    def train_step(self, step: int, sampler: PromptSampler, loss_and_grad) -> tuple[dict, Trajectory]:
        """collect -> reference -> batches -> num_iterations updates -> metrics."""
        cfg = self.cfg
        t_start = time.perf_counter()
        mx.reset_peak_memory()
        # Dropout and any other global-PRNG use start from a per-step seed: resume replays exactly.
        mx.random.seed(step_seed(cfg.seed, step, salt=1))
        traj = self.collect(step, sampler)
        self.add_reference(traj)
        batches, rows = self.make_batches(traj, cfg)
        # Normalise by the whole step's counts over all processes, then sum gradients: exact.
        global_tokens, global_rows = self.world.sum_floats(
            float(traj.loss_mask.sum().item()), float(traj.rollouts.num_rows)
        )
        totals = {"num_sequences": int(global_rows), "global_token_count": max(global_tokens, 1.0)}

        t0 = time.perf_counter()
        # With several updates per step the step's change is not their sum: keep references to
        # the weights before them (they cost the weights' size once replaced). One update reports
        # its own change and keeps nothing.
        before = dict(tree_flatten(self.policy.trainable_parameters())) if cfg.num_iterations > 1 else None
        for _ in range(cfg.num_iterations):
            upd = self.update(loss_and_grad, batches, totals)
        if before is not None:
            upd.update_norm = math.sqrt(sum(
                squared_distance(v, before[k]) for k, v in tree_flatten(self.policy.trainable_parameters())
            ).item())
            del before
        t_upd = time.perf_counter() - t0
        m = step_metrics(
            traj, rows, upd, cfg, update_seconds=t_upd, step_seconds=time.perf_counter() - t_start,
            lr=_current_lr(self.optimizer),
        )
        if self.world.size > 1:  # the step's reward statistics over all processes
            everything = self.world.gather(np.asarray(traj.drawn_rewards, dtype=np.float32))
            finite = everything[np.isfinite(everything)]
            m["reward/mean"] = float(finite.mean()) if finite.size else float("nan")
            m["reward/std"] = float(finite.std()) if finite.size else float("nan")
        return m, traj

    # ------------------------------------------------------------------ the run
    def train(self) -> TrainResult:
        cfg = self.cfg
        self.world = init_world()
        self.roles = split_roles(self.world, cfg.rollout_workers)
        if self.roles is not None:  # each role does its maths alone; the link joins them
            self.world = World(None)
            if not self.roles.is_trainer:
                return self._serve_rollouts()
        if cfg.prompts_per_step % self.world.size:
            raise MlxRftError(
                f"prompts_per_step={cfg.prompts_per_step} does not split over {self.world.size} "
                f"processes; use a multiple of {self.world.size}"
            )
        self.model_dir = resolve_model_path(cfg.model)
        # Refuse a folder that holds another run, or a checkpoint that does not match, before
        # anything heavy runs or anything is written.
        plan = run_folder.plan_run(cfg, self.model_dir)
        self.world.sum_floats(0.0)  # every rank has read the folder before rank 0 writes to it
        self.fingerprint = plan.fingerprint
        self._setup_model()
        self._setup_data()
        try:
            with cpu.speedups(self.model):  # CPU kernels and allocator, restored on return
                return self._run(plan)
        finally:
            if self.roles is not None and self.remote is None:  # workers that never got a job
                stop_workers(self.roles.link, self.roles.workers)

    def _serve_rollouts(self) -> TrainResult:
        """A rollout worker's whole run: set up as the trainer does, then answer its jobs."""
        self.model_dir = resolve_model_path(self.cfg.model)
        self._setup_model()
        self._setup_data()
        # A signal reaches every rank; the trainer ends the run, and tells the workers to stop.
        quiet = GracefulStop(lambda _: self.console.warn("rollout worker: stopping when the trainer does"))
        with cpu.speedups(self.model), quiet:
            jobs = serve_rollouts(self, self.roles.link, self.roles.trainer)
        return TrainResult(Path(self.cfg.output_dir), jobs)

    def _start_workers(self, run: RunState) -> None:
        """Send the rollout workers the run's weights and first jobs (they generate while the
        trainer evaluates)."""
        cfg = self.cfg
        schedule = JobSchedule(
            self.roles.workers, run.step, cfg.num_steps, cfg.max_staleness, cfg.weight_sync_steps
        )
        self.remote = RolloutCoordinator(self.roles.link, schedule, run.sampler, log=self.console.warn)
        self.remote.start(self.policy)

    def _restore(self, plan: run_folder.RunPlan) -> RunState:
        sampler = PromptSampler(
            len(self.train_data), self.cfg.prompts_per_step, seed=self.cfg.seed,
            rank=self.world.rank, world_size=self.world.size,
        )
        if plan.resume_from is None:
            return RunState(0, sampler)
        state = ckpt.load_checkpoint(plan.resume_from, self.policy, self.optimizer)
        run_folder.check_same_data(state, self.data_fingerprint, plan.resume_from)
        sampler.load_state_dict(state["sampler"])
        self.guard.load(
            state.get("collapse_guard"), ckpt.load_extra_tensors(plan.resume_from, GUARD_TENSORS),
            state["step"], self.policy, self.optimizer,
        )
        if self.guard.lr_scale != 1.0:  # the learning rate a rollback lowered stays lowered
            self._set_optimizer(self.guard.lr_scale, self.optimizer.state)
        self._log(f"resumed from {plan.resume_from} at step {state['step']}")
        return RunState(state["step"], sampler, state.get("history", []), state.get("eval_before", {}))

    def _run(self, plan: run_folder.RunPlan) -> TrainResult:
        cfg, world, run_dir = self.cfg, self.world, plan.run_dir
        main = world.is_main
        run = self._restore(plan)
        done = run_folder.read_summary(run_dir) if plan.resume_from else None
        if done and run.step >= cfg.num_steps and done.get("steps") == run.step:
            self._log(f"{run_dir} already finished its {run.step} steps; nothing to do")
            return TrainResult(run_dir, run.step, run.eval_before, done.get("eval_after", {}), run.history)
        # Rank 0 alone writes logs, metrics and checkpoints.
        reporters, rollout_log = [], None
        if main:
            run_folder.start_run(plan, cfg, run.step)
            reporters = build_reporters(cfg.report_to, run_dir, cfg.to_dict(), append=run.step > 0)
            rollout_log = open(run_dir / "rollouts.jsonl", "a" if run.step else "w")
            self._log(f"model {self.model_dir.name} ({cfg.finetune_type}): {self.param_counts.describe()}")
            self._log(
                f"data: {len(self.train_data)} train / {len(self.eval_data)} eval prompts; "
                f"{cfg.prompts_per_step} prompts x {cfg.group_size} completions per step"
                + (f" over {world.size} processes" if world.size > 1 else "")
                + ("; dynamic sampling" if cfg.dynamic_sampling else "")
                + (
                    f"; rollouts from {cfg.rollout_workers} worker process(es), max staleness "
                    f"{cfg.max_staleness}" if self.roles else ""
                )
            )
        if self.roles is not None:
            self._start_workers(run)
        if main and not run.eval_before:
            run.eval_before = self.evaluate(0)
            run.history.append({"step": 0, **run.eval_before})  # the report's eval panel starts here
            self._log(f"eval before training: {_fmt(run.eval_before)}")
            for r in reporters:
                r.log(0, run.eval_before)

        self.guard.start(run.step, self.policy, self.optimizer)
        loss_and_grad = nn.value_and_grad(self.policy, self.loss_fn)
        interrupted, stop_reason, step = False, None, run.step
        try:
            bar = self.console.train_progress(cfg.num_steps, run.step, show=main)
            with GracefulStop(self._log) as signals, bar as advance:
                for step in range(run.step + 1, cfg.num_steps + 1):
                    try:
                        metrics, traj = self.train_step(step, run.sampler, loss_and_grad)
                    except RolloutWorkersFailed:
                        if step - 1 > run.step and (step - 1) % cfg.save_every:
                            self._save(run_dir, step - 1, run)  # keep every finished step
                        raise
                    verdict = self._watch(step, traj, metrics)
                    if self.remote is not None:  # the weights after this step, and new jobs
                        self.remote.after_step(step, self.policy)
                    run.history.append({"step": step, **metrics})
                    if main:
                        self._report(step, metrics, run.history, reporters, rollout_log, traj)
                        advance(metrics)
                        if verdict.action == "rollback":  # below the step line it is about
                            self.console.alarm(verdict.message)
                    stop_reason = verdict.message if verdict.action == "stop" else None
                    # Every rank stops at the same step when any of them got a stop signal.
                    interrupted = world.sum_floats(float(signals.requested))[0] > 0
                    last = interrupted or stop_reason is not None or step == cfg.num_steps
                    if main and (last or step % cfg.save_every == 0):
                        self._save(run_dir, step, run)
                    if interrupted or stop_reason:
                        break
        finally:
            if self.remote is not None:
                self.remote.close()
            if rollout_log is not None:
                rollout_log.close()
        exit_code = signals.exit_code if interrupted else (EXIT_NOTHING_LEARNED if stop_reason else 0)
        if not main:
            return TrainResult(
                run_dir, step, run.eval_before, {}, run.history, interrupted, exit_code, stop_reason
            )
        return self._finish(run_dir, step, run, reporters, interrupted, exit_code, stop_reason)

    def _report(self, step, metrics, history, reporters, rollout_log, traj: Trajectory) -> None:
        """Rank 0's per-step output: periodic eval, health alarms, reporters, console, samples."""
        cfg = self.cfg
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
            ev = self.evaluate(step)
            metrics.update(ev)
            history[-1].update(ev)
        alarms = self.health.update(step, metrics)
        metrics.update(self.health.metrics())
        history[-1].update(self.health.metrics())  # the report shades the alarms' steps
        for r in reporters:
            r.log(step, metrics)
        if step % cfg.log_every == 0 or step == cfg.num_steps:
            self.console.step_line(step, cfg.num_steps, metrics)
        for a in alarms:  # below the step line they are about
            self.console.alarm(f"health alarm {a.name} at step {a.step}: {a.message}")
        if rollout_log is not None and cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            rollout_log.writelines(json.dumps(r) + "\n" for r in rollout_records(step, traj))
            rollout_log.flush()

    def _finish(self, run_dir, step, run: RunState, reporters, interrupted, exit_code,
                stop_reason: str | None = None) -> TrainResult:
        eval_after: dict[str, float] = {}
        if not interrupted:
            eval_after = self.evaluate(step)
            run.history.append({"step": step, **eval_after})
            for r in reporters:
                r.log(step, eval_after)
            self._log(f"eval before training: {_fmt(run.eval_before)}")
            self._log(f"eval after training:  {_fmt(eval_after)}")
            baseline = eval_after.get("eval/constant_baseline")
            if baseline is not None and eval_after["eval/accuracy"] <= baseline:
                self.console.warn(
                    f"the held-out score {eval_after['eval/accuracy']:.3f} is no better than a "
                    f"constant answer ({baseline:.3f}: the same answer to every prompt)"
                )
        for r in reporters:
            r.close()
        summary = {
            "model": self.model_dir.name, "steps": step, "finetune_type": self.cfg.finetune_type,
            "loss_type": self.cfg.loss_type, **{f"before {k}": v for k, v in run.eval_before.items()},
            **{f"after {k}": v for k, v in eval_after.items()},
        }
        if stop_reason:
            summary["ended early"] = f"at step {step} of {self.cfg.num_steps}: {stop_reason}"
        if self.guard.rollbacks:
            summary["collapse guard"] = "; ".join(e["message"] for e in self.guard.events)
        report = write_report(run_dir, run.history, summary)
        if not interrupted:
            run_folder.write_summary(run_dir, {
                "steps": step, "eval_before": run.eval_before, "eval_after": eval_after,
                **({"stop_reason": stop_reason} if stop_reason else {}),
                **({"collapse_guard": self.guard.summary()} if self.guard.enabled else {}),
            })
        if stop_reason:
            self.console.alarm(f"run ended early at step {step} of {self.cfg.num_steps}: {stop_reason}")
        self._log(f"run folder {run_dir}: checkpoints/, metrics.jsonl, rollouts.jsonl, {report.name}")
        return TrainResult(
            run_dir, step, run.eval_before, eval_after, run.history, interrupted, exit_code, stop_reason
        )

    def _save(self, run_dir: Path, step: int, run: RunState) -> None:
        state = {
            "sampler": run.sampler.state_dict(), "eval_before": run.eval_before,
            "history": run.history, "model_fingerprint": self.fingerprint,
            "data_fingerprint": self.data_fingerprint, "collapse_guard": self.guard.state_dict(),
        }
        ckpt.save_checkpoint(
            run_dir / "checkpoints", step, self.policy, self.optimizer, self.cfg, state,
            adapter_cfg=self.adapter_cfg, base_model_dir=self.model_dir,
            extra_tensors=self.guard.checkpoint_tensors(step),
        )


def _current_lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.item() if isinstance(lr, mx.array) else lr)


COUNTS = ("eval/unscored", "eval/distinct_answers")


def _fmt(d: dict[str, float]) -> str:
    shown = {k: v for k, v in d.items() if not k.endswith("time") and not (k == "eval/unscored" and not v)}
    return ", ".join(f"{k} {v:.0f}" if k in COUNTS else f"{k} {v:.3f}" for k, v in shown.items())
