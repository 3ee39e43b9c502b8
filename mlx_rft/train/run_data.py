"""A run's data and rewards from its config: the task or files, the held-out split, the rewards.

Rows given in Python (lists of dicts, or Hugging Face datasets) win over `train_file` (a file
or a `save_to_disk` folder), which wins over `task`; with neither, the default task. Held-out
prompts come from `eval_dataset`, `eval_file`, the test/validation split of a DatasetDict given
for training, or the task's own held-out set, or are split off the training rows (never a prompt
on both sides). Rewards come from the given functions or specs, else the task's own; evaluation
scores with the first one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..config import GRPOConfig
from ..data import PromptDataset, load_prompt_dataset, train_eval_split
from ..data.hf import EVAL_SPLITS, first_split, saved_splits, take_splits
from ..data.tasks import DEFAULT_TASK, load_task
from ..errors import MlxRftError
from ..rewards import RewardSet, resolve_reward
from ..episodes.data import (
    EpisodeSetup, environment_reward, environment_rows, episode_dataset, episode_setup, has_own_reward,
    with_system_prompt,
)
from ..episodes.envs import resolve_env
from ..timeseries.prompt_data import (
    encoder_patch_size, held_out_subset, is_series_source, series_datasets,
)

# The answer tag against the row's label: what `mlx-rft sft` scores by generation.
SERIES_REWARD = "accuracy(extract=answer_tag)"


@dataclass
class RunData:
    train: PromptDataset
    eval: PromptDataset
    rewards: RewardSet  # the training reward (weighted sum of the functions)
    eval_reward: RewardSet  # the first function alone: the held-out score (pass@k counts >= 1)
    episodes: EpisodeSetup | None = None  # multi-turn episodes (--env / --tools)
    system_prompt: str | None = None  # the system message the prompts were rendered with


def build_run_data(
    cfg: GRPOConfig,
    tokenizer,
    train_rows: Iterable[dict] | None = None,
    eval_rows: Iterable[dict] | None = None,
    reward_specs: Sequence[Callable | str] = (),
) -> RunData:
    """train_rows / eval_rows: row dicts, a `datasets.Dataset`, or a `DatasetDict` (its splits)."""
    if train_rows is None and eval_rows is None and is_series_source(cfg.task, cfg.train_file):
        return _series_run_data(cfg, tokenizer, reward_specs)
    if cfg.env or cfg.tools:
        return _episode_run_data(cfg, tokenizer, train_rows, eval_rows, reward_specs)
    task = None
    train_rows, train_src, eval_rows, eval_src = take_splits(train_rows, eval_rows)
    rows = train_rows
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
        train = PromptDataset.from_rows(rows, tokenizer, source=train_src, **opts)
    else:
        train = load_prompt_dataset(cfg.train_file, tokenizer, **opts)
    if eval_rows is not None:
        evals = PromptDataset.from_rows(eval_rows, tokenizer, source=eval_src, **opts)
    elif cfg.eval_file:
        evals = load_prompt_dataset(cfg.eval_file, tokenizer, splits=EVAL_SPLITS, **opts)
    elif rows is None and first_split(saved_splits(cfg.train_file), EVAL_SPLITS):
        # A saved DatasetDict brings its own held-out split, as it does in memory.
        evals = load_prompt_dataset(cfg.train_file, tokenizer, splits=EVAL_SPLITS, **opts)
    elif task is not None and getattr(task, "eval_rows", None):
        evals = PromptDataset.from_rows(task.eval_rows, tokenizer, **opts)
    else:
        held_out = min(cfg.eval_size, len(train) - 1)
        train, evals = train_eval_split(train, eval_size=held_out, seed=cfg.seed)
        if len(train) < max(cfg.prompts_per_step, held_out):
            total = len(train) + len(evals)
            raise MlxRftError(
                f"{total} distinct prompts leave {len(train)} for training once {len(evals)} "
                f"are held out (eval_size {cfg.eval_size}); give more rows, a separate "
                f"--eval-file, or a smaller --eval-size (e.g. {max(1, total // 4)})"
            )

    return RunData(train, evals, *_reward_sets(cfg, reward_specs, task), system_prompt=system)


def _series_run_data(cfg: GRPOConfig, tokenizer, reward_specs) -> RunData:
    """Time-series rows (a ucr:<Name> task or a series JSONL file): prompts with soft tokens."""
    train, evals = series_datasets(cfg.task, cfg.train_file, cfg.eval_file, tokenizer,
                                   encoder_patch_size(cfg.encoder))
    if evals is None:
        train, evals = train_eval_split(train, eval_size=min(cfg.eval_size, len(train) - 1),
                                        seed=cfg.seed)
    elif cfg.eval_size and len(evals) > cfg.eval_size:
        evals = evals.subset(held_out_subset(len(evals), cfg.eval_size))
    specs = list(reward_specs) or list(cfg.reward_funcs) or [SERIES_REWARD]
    return RunData(train, evals, *_reward_sets(cfg, specs, None))


def _episode_run_data(cfg: GRPOConfig, tokenizer, train_rows, eval_rows, reward_specs) -> RunData:
    """Multi-turn episodes: prompts from each row's environment opening (episodes/data.py)."""
    setup = episode_setup(cfg, tokenizer)
    env_cls = resolve_env(cfg.env) if cfg.env else None
    plain = train_rows is None and cfg.task is None and cfg.train_file is None
    if plain and env_cls is not None:
        rows, held = environment_rows(cfg, env_cls)
        base = None
    else:
        # The task's (or given) rows, rendered as usual first, so bad rows get the usual errors.
        base = build_run_data(
            dataclasses.replace(cfg, env=None, tools=[]), tokenizer, train_rows, eval_rows, reward_specs
        )
        rows = [with_system_prompt(e.columns, base.system_prompt) for e in base.train]
        held = [with_system_prompt(e.columns, base.system_prompt) for e in base.eval]
    opts = dict(max_prompt_length=cfg.max_prompt_length)
    train = episode_dataset(rows, tokenizer, setup, source=setup.name, **opts)
    evals = episode_dataset(held, tokenizer, setup, source=f"{setup.name} (held out)", **opts)
    specs = list(reward_specs) or list(cfg.reward_funcs)
    if not specs and env_cls is not None and has_own_reward(env_cls):
        specs = [environment_reward()]
    if specs or base is None:
        rewards, eval_reward = _reward_sets(cfg, specs, None)
    else:  # the task's own rewards score the last turn
        rewards, eval_reward = base.rewards, base.eval_reward
    return RunData(train, evals, rewards, eval_reward, episodes=setup)


def _reward_sets(cfg: GRPOConfig, reward_specs, task) -> tuple[RewardSet, RewardSet]:
    specs = list(reward_specs) or list(cfg.reward_funcs)
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
    rewards = RewardSet(funcs, weights=weights, on_error=cfg.reward_on_error, timeout=cfg.reward_timeout)
    eval_reward = RewardSet(funcs[:1], on_error="none", timeout=cfg.reward_timeout)
    return rewards, eval_reward
