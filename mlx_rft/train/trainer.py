"""The GRPO-family training loop.

One step: prompts -> rollouts (G per prompt) -> rewards (once) -> group advantages ->
reference log-probs (beta > 0 only) -> `num_iterations` optimizer updates, each accumulating
gradients over `gradient_accumulation_steps` micro-batches -> metrics -> checkpoint.

Kept from the GRPO/DAPO papers: group-relative advantages, clipped importance ratios, optional
k3 KL to a frozen reference. The old-policy log-probs are the behaviour log-probs the rollout
engine recorded while sampling (exact float32 log_softmax(logits / T)), so no extra forward pass is
spent on them. Seeds are derived from (seed, step), so a resumed run replays the same samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..config import GRPOConfig
from ..errors import MlxRftError
from ..evaluate import columns_per_row
from ..policy.adapters import adapters_fused
from ..types import PromptExample, RolloutBatch, SamplingConfig
from . import checkpoint as ckpt
from . import run_folder
from .metrics import build_reporters, format_step_line, write_report
from .optim import CompiledApply, build_optimizer, squared_distance
from .distributed import init_world
from .signals import GracefulStop
from .policy import ReferencePolicy, adapter_config, count_parameters, setup_trainable


# LossStats fields -> metric names (the health monitor reads clip/region_frac).
STAT_NAMES = {
    "clip_low": "clip/low_frac", "clip_high": "clip/high_frac", "clip_region": "clip/region_frac",
    "ratio_mean": "ratio/mean", "kl_mean": "kl", "entropy_mean": "entropy",
    "num_tokens": "tokens/completion", "num_loss_tokens": "tokens/in_loss",
}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    exit_code: int = 0  # 128 + the signal that stopped the run (130 Ctrl-C, 143 SIGTERM)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step) so resume replays the same samples."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


def sampling_from(cfg: GRPOConfig) -> SamplingConfig:
    return cfg.sampling_config()


class GRPOTrainer:
    """`GRPOTrainer(config, reward_funcs=[...], train_dataset=rows).train()`.

    reward_funcs: callables `(prompts, completions, **columns) -> list[float | None]` or spec
    strings (built-in names, `module:function`, `file.py:function`). Empty: the task's own.
    train_dataset / eval_dataset: lists of row dicts (`prompt` or `messages` + columns), or None
    to use `config.train_file` / `config.task` / the default task.
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
    ):
        self.cfg = config.validate()
        self._reward_specs = list(reward_funcs or [])
        self._train_rows = train_dataset
        self._eval_rows = eval_dataset
        self.model = model
        self.tokenizer = tokenizer
        self.console = console
        self.eval_reward = None

    # ------------------------------------------------------------------ setup
    def _log(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, highlight=False, markup=False)
        else:
            print(msg, flush=True)

    def _setup_model(self) -> None:
        from ..models import load_model

        cfg = self.cfg
        if self.model is None:
            self.model, self.tokenizer = load_model(self.model_dir, dtype=cfg.dtype)
        mx.random.seed(cfg.seed)  # LoRA initialisation
        self.num_adapted_layers = setup_trainable(self.model, cfg)
        self.adapter_cfg = (
            None if cfg.finetune_type == "full" else adapter_config(cfg, self.num_adapted_layers)
        )
        self.param_counts = count_parameters(self.model)
        self.reference = ReferencePolicy(
            self.model, cfg, load_copy=lambda: load_model(self.model_dir, dtype=cfg.dtype)[0]
        )
        self.optimizer = build_optimizer(cfg)
        self.apply_update = CompiledApply(self.model, self.optimizer, cfg.max_grad_norm)

    def _setup_data(self) -> None:
        from ..data import PromptDataset, load_prompt_dataset, train_eval_split
        from ..rewards import RewardSet, resolve_reward
        from ..tasks import DEFAULT_TASK, load_task

        cfg = self.cfg
        task = None
        rows = self._train_rows
        if rows is None and cfg.train_file is None:
            name = cfg.task or DEFAULT_TASK.name
            task = load_task(name, size=cfg.task_size, seed=cfg.seed, eval_size=cfg.eval_size, **cfg.task_kwargs())
            rows = task.rows
        system = cfg.system_prompt if cfg.system_prompt is not None else getattr(task, "system_prompt", None)
        opts = dict(
            system_prompt=system, max_prompt_length=cfg.max_prompt_length,
            on_long_prompt=cfg.on_long_prompt, on_bad_row=cfg.on_bad_row,
        )
        if rows is not None:
            train = PromptDataset.from_rows(rows, self.tokenizer, **opts)
        else:
            train = load_prompt_dataset(cfg.train_file, self.tokenizer, **opts)
        if self._eval_rows is not None:
            evals = PromptDataset.from_rows(self._eval_rows, self.tokenizer, **opts)
        elif cfg.eval_file:
            evals = load_prompt_dataset(cfg.eval_file, self.tokenizer, **opts)
        elif task is not None and getattr(task, "eval_rows", None):
            evals = PromptDataset.from_rows(task.eval_rows, self.tokenizer, **opts)
        else:
            held_out = min(cfg.eval_size, len(train) - 1)
            train, evals = train_eval_split(train, eval_size=held_out, seed=cfg.seed)
            if len(train) < max(cfg.prompts_per_step, held_out):
                raise MlxRftError(
                    f"{len(train) + len(evals)} distinct prompts leave {len(train)} for training "
                    f"once {len(evals)} are held out (eval_size {cfg.eval_size}); give more rows, "
                    f"a separate --eval-file, or a smaller --eval-size (e.g. {max(1, (len(train) + len(evals)) // 4)})"
                )
        if train.skipped_bad:
            self._log(f"skipped {train.skipped_bad} malformed rows of {train.source}")
        self.train_data, self.eval_data = train, evals

        specs = self._reward_specs or list(cfg.reward_funcs)
        if specs:
            funcs = [resolve_reward(s) if isinstance(s, str) else s for s in specs]
        elif task is not None:
            funcs = list(task.reward_funcs)
        else:
            raise MlxRftError(
                "no reward functions: pass --reward-funcs (e.g. accuracy format) or use a --task"
            )
        weights = list(cfg.reward_weights) or None
        if weights is None and not specs and task is not None:
            weights = list(getattr(task, "reward_weights", None) or []) or None
        self.rewards = RewardSet(
            funcs, weights=weights, on_error=cfg.reward_on_error, timeout=cfg.reward_timeout
        )
        # Eval scores with the first reward (the task's accuracy), pass@k counts scores >= 1.
        self.eval_reward = RewardSet(funcs[:1], on_error="none", timeout=cfg.reward_timeout)

    # ------------------------------------------------------------------ pieces
    def generate(self, examples: Sequence[PromptExample], group_size: int, sampling, seed, **kw) -> RolloutBatch:
        from ..rollout import generate_rollouts

        with adapters_fused(self.model):
            return generate_rollouts(
                self.model, self.tokenizer, [e.prompt_ids for e in examples], group_size, sampling,
                seed=seed, **kw,
            )

    def score(self, reward_set, examples, rollouts: RolloutBatch):
        """Run every reward function once on the step's completions."""
        prompts = [e.prompt for e in examples for _ in range(rollouts.group_size)]
        columns = columns_per_row(examples, rollouts.group_size)
        ids, mask = np.asarray(rollouts.completion_ids), np.asarray(rollouts.completion_mask)
        columns["completion_ids"] = [row[m > 0].tolist() for row, m in zip(ids, mask)]
        return reward_set(prompts, rollouts.texts, columns)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out score with the first reward (pass@1; pass@k when eval_k > 1)."""
        from ..evaluate import evaluate_prompts

        cfg = self.cfg
        temp = cfg.eval_temperature if cfg.eval_k == 1 else (cfg.eval_temperature or 1.0)
        sampling = dataclasses.replace(
            sampling_from(cfg), temperature=temp, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0
        )
        with adapters_fused(self.model):
            out = evaluate_prompts(
                self.model, self.tokenizer, list(self.eval_data), self.eval_reward,
                k=cfg.eval_k, sampling=sampling, seed=step_seed(cfg.seed, 0, salt=17),
            )
        if out["eval/unscored"]:
            self._log(
                f"warning: {out['eval/unscored']:.0f} of {len(self.eval_data) * cfg.eval_k} eval "
                f"samples could not be scored by {self.eval_reward.names[0]!r}; they count as 0"
            )
        return out

    def _check_scored(self, step: int, rewards) -> None:
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

    def _micro_slices(self, n: int, group_size: int) -> list[slice]:
        """At most `gradient_accumulation_steps` contiguous slices covering all n rows: on group
        boundaries (so each micro-batch runs its prompts once) when there are enough groups."""
        m = self.cfg.gradient_accumulation_steps
        groups = n // group_size
        if groups >= m:
            cuts = [group_size * (groups * i // m) for i in range(m + 1)]
        else:
            cuts = [n * i // m for i in range(m + 1)]
        return [slice(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]

    def _make_loss(self):
        from ..algo.losses import compute_loss
        from ..policy.checkpointing import checkpointed_layers
        from ..policy.logprobs import sequence_logprobs

        cfg = self.cfg
        loss_cfg = cfg.loss_config()
        need_entropy = cfg.top_entropy_quantile < 1.0

        def loss_fn(model, prompts, group_size, ids, mask, old_lp, ref_lp, adv, norms):
            # Entropy costs a second pass over [N, T, V] (~40% of the gradient pass on CPU), so it
            # is computed only when entropy masking needs it (then it is also logged).
            with checkpointed_layers(model) if cfg.gradient_checkpointing else contextlib.nullcontext():
                logp, entropy = sequence_logprobs(
                    model, prompts, ids, mask, group_size, cfg.temperature, with_entropy=need_entropy
                )
            loss, stats = compute_loss(loss_cfg, logp, old_lp, ref_lp, adv, mask, entropy=entropy, **norms)
            return loss, stats.as_dict()

        return nn.value_and_grad(self.model, loss_fn)

    def _update(self, loss_and_grad, micro_batches, totals) -> dict[str, float]:
        """One optimizer update: accumulate gradients over micro-batches, clip, apply, eval."""
        grads = grads_acc = None
        stats_acc, loss_acc = {}, 0.0
        for mb in micro_batches:
            (loss, stats), grads = loss_and_grad(self.model, *mb, totals)
            grads_acc = grads if grads_acc is None else tree_map(mx.add, grads_acc, grads)
            mx.eval(loss, grads_acc, stats)
            loss_acc += loss.item()
            weight = float(mb[3].sum().item())
            for k, v in stats.items():
                stats_acc.setdefault(k, []).append((float(v.item()), weight))
        if grads_acc is None:  # nothing on this process changes the gradient
            grads_acc = tree_map(mx.zeros_like, self.model.trainable_parameters())
        grads_acc = self.world.sum_tree(grads_acc)
        loss_acc = self.world.sum_floats(loss_acc)[0]
        grad_norm, change = self.apply_update(grads_acc)
        del grads_acc, grads  # the update frees each gradient once applied (see CompiledApply)
        mx.eval(change, self.model.parameters(), self.optimizer.state, grad_norm)
        out = {"loss": loss_acc, "grad_norm": grad_norm.item(), "update_norm": math.sqrt(change.item())}
        for k, pairs in stats_acc.items():
            if k in ("num_tokens", "num_loss_tokens"):
                out[STAT_NAMES[k]] = sum(v for v, _ in pairs)
                continue
            tot = sum(w for _, w in pairs)
            out[STAT_NAMES.get(k, k)] = sum(v * w for v, w in pairs) / tot if tot else float("nan")
        return out

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        from ..algo.advantages import group_advantages
        from ..data import PromptSampler
        from ..health import HealthMonitor
        from ..models import resolve_model_path

        cfg = self.cfg
        world = self.world = init_world()
        if cfg.prompts_per_step % world.size:
            raise MlxRftError(
                f"prompts_per_step={cfg.prompts_per_step} does not split over {world.size} processes; "
                f"use a multiple of {world.size}"
            )
        main = world.is_main
        self.model_dir = resolve_model_path(cfg.model)
        # Refuse a folder that holds another run, or a checkpoint that does not match, before
        # anything heavy runs or anything is written.
        plan = run_folder.plan_run(cfg, self.model_dir)
        self.fingerprint = plan.fingerprint
        run_dir = plan.run_dir
        self._setup_model()
        self._setup_data()
        sampler = PromptSampler(
            len(self.train_data), cfg.prompts_per_step, seed=cfg.seed, rank=world.rank, world_size=world.size
        )
        start_step, history = 0, []
        eval_before: dict[str, float] = {}
        if plan.resume_from is not None:
            state = ckpt.load_checkpoint(plan.resume_from, self.model, self.optimizer)
            start_step = state["step"]
            sampler.load_state_dict(state["sampler"])
            eval_before = state.get("eval_before", {})
            history = state.get("history", [])
            done = run_folder.read_summary(run_dir)
            if start_step >= cfg.num_steps and done and done.get("steps") == start_step:
                self._log(f"{run_dir} already finished its {start_step} steps; nothing to do")
                return TrainResult(run_dir, start_step, eval_before, done.get("eval_after", {}), history)
            self._log(f"resumed from {plan.resume_from} at step {start_step}")
        # Rank 0 alone writes logs, metrics and checkpoints.
        reporters, rollout_log = [], None
        if main:
            run_folder.start_run(plan, cfg, start_step)
            reporters = build_reporters(cfg.report_to, run_dir, cfg.to_dict(), append=start_step > 0)
            rollout_log = open(run_dir / "rollouts.jsonl", "a" if start_step else "w")
            self._log(
                f"model {self.model_dir.name} ({cfg.finetune_type}): {self.param_counts.describe()}; "
                f"{len(self.train_data)} train / {len(self.eval_data)} eval prompts; "
                f"{cfg.prompts_per_step} prompts x {cfg.group_size} completions per step"
                + (f" over {world.size} processes" if world.size > 1 else "")
            )
        if main and not eval_before:
            eval_before = self.evaluate(0)
            history.append({"step": 0, **eval_before})  # the report's eval panel starts here
            self._log(f"eval before training: {_fmt(eval_before)}")
            for r in reporters:
                r.log(0, eval_before)

        self.health = HealthMonitor(log_warnings=False)
        self.unscored_steps = 0
        loss_and_grad = self._make_loss()
        sampling = sampling_from(cfg)
        interrupted = False
        step = start_step
        try:
            with GracefulStop(self._log) as signals:
                for step in range(start_step + 1, cfg.num_steps + 1):
                    metrics = self._train_step(step, sampler, sampling, loss_and_grad, group_advantages, rollout_log)
                    history.append({"step": step, **metrics})
                    if main and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
                        ev = self.evaluate(step)
                        metrics.update(ev)
                        history[-1].update(ev)
                    if main:
                        for alarm in self.health.update(step, metrics):
                            self._log(f"health alarm: {alarm}")
                        metrics.update(self.health.metrics())
                        for r in reporters:
                            r.log(step, metrics)
                        if step % cfg.log_every == 0 or step == cfg.num_steps:
                            self._log(format_step_line(step, cfg.num_steps, metrics))
                    # Every rank stops at the same step when any of them got a stop signal.
                    stop = world.sum_floats(float(signals.requested))[0] > 0
                    last = step == cfg.num_steps
                    if main and (stop or last or step % cfg.save_every == 0):
                        self._save(run_dir, step, sampler, eval_before, history)
                    if stop:
                        interrupted = True
                        break
        finally:
            if rollout_log is not None:
                rollout_log.close()
        exit_code = signals.exit_code if interrupted else 0
        eval_after: dict[str, float] = {}
        if not main:
            return TrainResult(run_dir, step, eval_before, eval_after, history, interrupted, exit_code)
        if not interrupted:
            eval_after = self.evaluate(step)
            history.append({"step": step, **eval_after})
            for r in reporters:
                r.log(step, eval_after)
            self._log(f"eval before training: {_fmt(eval_before)}")
            self._log(f"eval after training:  {_fmt(eval_after)}")
        for r in reporters:
            r.close()
        summary = {
            "model": str(self.model_dir), "steps": step, "finetune_type": cfg.finetune_type,
            "loss_type": cfg.loss_type, **{f"before {k}": v for k, v in eval_before.items()},
            **{f"after {k}": v for k, v in eval_after.items()},
        }
        report = write_report(run_dir, history, summary)
        if not interrupted:
            run_folder.write_summary(
                run_dir, {"steps": step, "eval_before": eval_before, "eval_after": eval_after}
            )
        self._log(f"run folder {run_dir}: checkpoints/, metrics.jsonl, rollouts.jsonl, {report.name}")
        return TrainResult(run_dir, step, eval_before, eval_after, history, interrupted, exit_code)

    def _save(self, run_dir, step, sampler, eval_before, history) -> None:
        state = {
            "sampler": sampler.state_dict(), "eval_before": eval_before, "history": history,
            "model_fingerprint": self.fingerprint,
        }
        ckpt.save_checkpoint(
            run_dir / "checkpoints", step, self.model, self.optimizer, self.cfg, state,
            adapter_cfg=self.adapter_cfg, base_model_dir=self.model_dir,
        )

    def _train_step(self, step, sampler, sampling, loss_and_grad, group_advantages, rollout_log) -> dict:
        cfg = self.cfg
        G = cfg.group_size
        t_start = time.perf_counter()
        mx.reset_peak_memory()
        # Dropout and any other global-PRNG use start from a per-step seed: resume replays exactly.
        mx.random.seed(step_seed(cfg.seed, step, salt=1))
        world = self.world
        examples = [self.train_data[i] for i in next(sampler)]
        n_local = len(examples) * G

        t0 = time.perf_counter()
        # Rows are numbered globally so each sample's random draws match the single-process run.
        rollouts = self.generate(
            examples, G, sampling, seed=step_seed(cfg.seed, step),
            row_offset=world.rank * n_local, total_rows=world.size * n_local,
        )
        mx.eval(rollouts.completion_ids, rollouts.logprobs)
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        rewards = self.score(self.rewards, examples, rollouts)
        t_rew = time.perf_counter() - t0
        self._check_scored(step, rewards)

        batch_stats = None
        if world.size > 1 and cfg.scale_rewards == "batch":
            from ..algo.advantages import RewardMoments

            moments = RewardMoments.from_array(world.sum_floats(*RewardMoments.of(rewards.total).as_array()))
            batch_stats = moments.mean_std()
        adv = group_advantages(rewards.total, G, scale=cfg.scale_rewards, batch_stats=batch_stats)
        mask = rollouts.completion_mask
        keep = adv.row_mask(drop_zero_std=cfg.drop_zero_std_groups)
        if cfg.mask_truncated_completions:
            keep *= np.array([r != "length" for r in rollouts.finish_reasons], dtype=np.float32)
        mask = mask * mx.array(keep)[:, None]
        advantages = mx.array(np.asarray(adv.advantages, dtype=np.float32))
        prompts = [e.prompt_ids for e in examples]

        t0 = time.perf_counter()
        ref_lp = None
        if cfg.beta > 0:
            from ..policy.logprobs import sequence_logprobs

            ref_lp, _ = self.reference.run(
                lambda m: sequence_logprobs(m, prompts, rollouts.completion_ids, mask, G, cfg.temperature)
            )
            ref_lp = mx.stop_gradient(ref_lp)
            mx.eval(ref_lp)
        t_lp = time.perf_counter() - t0

        # Groups that cannot change the gradient stay out of the gradient pass: rows whose mask is
        # all zero, and, when the loss is exactly 0 at advantage 0 (no KL term, no entropy-quantile
        # masking, which ranks all tokens), rows with advantage 0. The step's normalisers still
        # count every row, and the optimizer still steps (with zero gradient if nothing is left),
        # so the update is the one the full batch gives.
        row_live = keep > 0
        if cfg.skip_zero_advantage and cfg.beta == 0 and cfg.top_entropy_quantile >= 1.0:
            row_live &= np.asarray(adv.advantages) != 0
        live_groups = row_live.reshape(-1, G).any(axis=1)
        rows = np.flatnonzero(np.repeat(live_groups, G))
        # Micro-batches of whole groups when they fit, so each prompt is run once per micro-batch.
        micro = []
        for sl in self._micro_slices(len(rows), G):
            a, b = sl.start, sl.stop
            idx = mx.array(rows[a:b])
            if a % G == 0 and b % G == 0:
                p, g = [prompts[r // G] for r in rows[a:b:G]], G
            else:
                p, g = [prompts[r // G] for r in rows[a:b]], 1
            micro.append((
                p, g, rollouts.completion_ids[idx], mask[idx], rollouts.logprobs[idx],
                None if ref_lp is None else ref_lp[idx], advantages[idx],
            ))
        n = len(rollouts.texts)
        # Normalise by the whole step's counts over all processes, then sum gradients: exact.
        global_tokens = world.sum_floats(float(mask.sum().item()))[0]
        totals = {"num_sequences": n * world.size, "global_token_count": max(global_tokens, 1.0)}

        t0 = time.perf_counter()
        # With several updates per step the step's change is not their sum: keep references to
        # the weights before them (they cost the weights' size once replaced). One update reports
        # its own change and keeps nothing.
        before = dict(tree_flatten(self.model.trainable_parameters())) if cfg.num_iterations > 1 else None
        upd: dict[str, float] = {}
        for _ in range(cfg.num_iterations):
            upd = self._update(loss_and_grad, micro, totals)
        if before is not None:
            upd["update_norm"] = math.sqrt(sum(
                squared_distance(v, before[k])
                for k, v in tree_flatten(self.model.trainable_parameters())
            ).item())
            del before
        t_upd = time.perf_counter() - t0
        t_step = time.perf_counter() - t_start

        lengths = np.asarray(rollouts.completion_mask.sum(axis=1))
        gen_tokens = float(lengths.sum())
        m: dict[str, Any] = {
            **rewards.summary(),
            "advantage/mean": float(np.mean(adv.advantages)),
            "advantage/std": float(np.std(adv.advantages)),
            "advantage/abs_max": float(np.max(np.abs(adv.advantages))),
            "frac_zero_std_groups": adv.num_zero_std_groups / len(examples),
            "completion/mean_length": float(lengths.mean()),
            "completion/min_length": float(lengths.min()),
            "completion/max_length": float(lengths.max()),
            "completion/truncated_frac": float(np.mean([r == "length" for r in rollouts.finish_reasons])),
            "tokens_per_sec/generate": gen_tokens / max(t_gen, 1e-9),
            "tokens_per_sec/train": cfg.num_iterations * (
                float(lengths[rows].sum()) + sum(len(prompts[r // G]) for r in rows[::G])
            ) / max(t_upd, 1e-9),
            "update/rows": len(rows),
            "time/generate": t_gen, "time/reward": t_rew, "time/logprobs": t_lp,
            "time/update": t_upd, "time/step": t_step,
            "memory/peak_gb": mx.get_peak_memory() / 1e9,
            "lr": _current_lr(self.optimizer),
            **upd,
            "tokens/completion": gen_tokens,  # all generated tokens, not only those in the update
        }
        if world.size > 1:  # the step's reward statistics over all processes
            everything = world.gather(np.asarray(rewards.total, dtype=np.float32))
            finite = everything[np.isfinite(everything)]
            m["reward/mean"] = float(finite.mean()) if finite.size else float("nan")
            m["reward/std"] = float(finite.std()) if finite.size else float("nan")
        if rollout_log is not None and cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            import json

            for i in range(len(rollouts.texts)):
                rollout_log.write(json.dumps({
                    "step": step, "prompt": examples[i // G].prompt, "completion": rollouts.texts[i],
                    "reward": _num(rewards.total[i]), "advantage": float(adv.advantages[i]),
                    "finish_reason": rollouts.finish_reasons[i],
                    **{f"reward/{k}": _num(v[i]) for k, v in rewards.per_func.items()},
                }) + "\n")
            rollout_log.flush()
        return m


def _current_lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.item() if isinstance(lr, mx.array) else lr)


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items() if not k.endswith("time"))
