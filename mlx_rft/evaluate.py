"""Scoring a model on held-out prompts (pass@1, pass@k), and the `mlx-rft eval` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from .types import PromptExample, SamplingConfig


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if num_samples - num_correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def columns_per_row(examples: Sequence[PromptExample], group_size: int) -> dict[str, list]:
    """Dataset columns repeated per completion row (row n belongs to prompt n // group_size)."""
    keys = sorted({k for e in examples for k in e.columns})
    return {k: [e.columns.get(k) for e in examples for _ in range(group_size)] for k in keys}


def evaluate_prompts(
    model,
    tokenizer,
    examples: Sequence[PromptExample],
    reward_set,
    *,
    k: int = 1,
    sampling: SamplingConfig,
    seed: int = 0,
    batch_rows: int = 64,
    progress: Callable[[int], None] | None = None,
    generate: Callable[..., Any] | None = None,
) -> dict[str, float]:
    """Mean score of `reward_set` over k samples per prompt, and pass@k (a sample is correct when
    its score is >= 1). k = 1 with temperature 0 is greedy pass@1.

    A sample no reward could score counts as 0 in the mean and is counted in `eval/unscored`, so
    an unscorable eval set is visible as such rather than as a bad model.

    With an `answer` column (and a reward that is not an LLM judge) it also reports what a fake
    gain would look like: `eval/distinct_answers` (how many different final answers the first
    samples of the prompts hold) and `eval/constant_baseline` (the best mean score of answering
    every prompt with one and the same answer; see `constant_answer_baseline`).

    progress(n), when given, is called after each batch of prompts with the n prompts it scored
    (a progress bar's advance). generate(examples, k, sampling, seed=...), when given, makes the
    RolloutBatch instead of `generate_rollouts` on the prompt ids (the trainer's: prompts with soft
    tokens, multi-turn episodes, whose records reach the rewards as the `episode` column)."""
    from .rollout import generate_rollouts

    scores, t0 = [], time.perf_counter()
    unscored, first_texts, first_episodes = 0, [], []
    per_call = max(1, batch_rows // k)
    for i in range(0, len(examples), per_call):
        chunk = list(examples[i : i + per_call])
        if generate is not None:
            ro = generate(chunk, k, sampling, seed=seed + i)
        else:
            ro = generate_rollouts(model, tokenizer, [e.prompt_ids for e in chunk], k, sampling,
                                   seed=seed + i)
        prompts = [e.prompt for e in chunk for _ in range(k)]
        columns = columns_per_row(chunk, k)
        if ro.episodes is not None:
            columns["episode"] = ro.episodes
        result = reward_set(prompts, ro.texts, columns)
        unscored += result.num_unscored
        scores.append(np.nan_to_num(np.asarray(result.total, dtype=np.float64), nan=0.0))
        first_texts += ro.texts[::k]
        if ro.episodes is not None:
            first_episodes += ro.episodes[::k]
        if progress is not None:
            progress(len(chunk))
    s = np.concatenate(scores).reshape(-1, k)
    out = {"eval/accuracy": float(s.mean()), "eval/unscored": float(unscored)}
    if k > 1:
        correct = (s >= 1.0 - 1e-6).sum(axis=1)
        out[f"eval/pass@{k}"] = float(np.mean([pass_at_k(k, int(c), k) for c in correct]))
    if all("answer" in e.columns for e in examples) and not reward_set.has_judge:
        answers = [final_answer(t) for t in first_texts]
        out["eval/distinct_answers"] = float(len({a for a in answers if a is not None}))
        out["eval/constant_baseline"] = constant_answer_baseline(
            reward_set, examples, answers, episodes=first_episodes or None
        )
    out["eval/time"] = time.perf_counter() - t0
    return out


def final_answer(text: str) -> str | None:
    """A completion's final answer as the built-in accuracy finds it, normalised for counting."""
    from .rewards.verifiers import extract_final_answer, normalize_text

    found = extract_final_answer(text, "auto")
    return None if found is None else normalize_text(found)


def constant_answer_baseline(
    reward_set, examples: Sequence[PromptExample], model_answers: Sequence[str | None], limit: int = 16,
    episodes: Sequence[Any] | None = None,
) -> float:
    """The best mean score one prompt-independent answer gets on these prompts.

    Candidates: the `limit` most common reference answers and the `limit` most common answers the
    model gave, each written as `<answer>c</answer>` for every prompt and scored by reward_set.
    A held-out score at or below this is no gain over always giving the most common answer.
    With `episodes` (one per prompt, multi-turn), each is scored as an episode of one turn that
    gives the answer at once, by its own environment."""
    refs = Counter(str(e.columns["answer"]) for e in examples if e.columns.get("answer") is not None)
    mine = Counter(a for a in model_answers if a)
    candidates = dict.fromkeys([a for a, _ in refs.most_common(limit)] + [a for a, _ in mine.most_common(limit)])
    prompts, columns = [e.prompt for e in examples], columns_per_row(examples, 1)
    best = 0.0
    for c in candidates:
        text = f"<answer>{c}</answer>"
        if episodes is not None:
            columns["episode"] = [
                dataclasses.replace(e, messages=[*e.messages[: e.opening], {"role": "assistant", "content": text}])
                for e in episodes
            ]
        result = reward_set(prompts, [text] * len(examples), columns)
        best = max(best, float(np.nan_to_num(result.total, nan=0.0).mean()))
    return best


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-rft eval",
        description="Score a model (optionally with LoRA adapters from a checkpoint) on a task or "
        "prompts file: mean score (pass@1) and pass@k.",
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--adapter-path", default=None, help="LoRA checkpoint folder from `mlx-rft train`")
    p.add_argument("--task", default=None, help="built-in task name (default: the default task)")
    p.add_argument(
        "--data", default=None,
        help="prompts file (JSONL/JSON/CSV/Parquet) or save_to_disk folder (of a DatasetDict: its "
        "test/validation split) instead of a task",
    )
    p.add_argument("--reward-funcs", nargs="*", default=None, help="rewards for --data (first one scores)")
    p.add_argument("--limit", type=int, default=64, help="number of prompts to score")
    p.add_argument("--k", type=int, default=1, help="samples per prompt for pass@k")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (k must be 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit")
    p.add_argument(
        "--stop", nargs="*", default=[],
        help="stop strings that end a completion, kept at the end of the text (e.g. --stop "
        "'</answer>'; default none, as in training)",
    )
    p.add_argument("--system-prompt", default=None, help="system message (default: the task's)")
    p.add_argument(
        "--env", default=None,
        help="score multi-turn episodes with this environment (a built-in: arithmetic, guess; or "
        "module:Class) on its held-out rows, as `mlx-rft train --env` does",
    )
    p.add_argument("--tools", nargs="*", default=[], help="tools for multi-turn episodes (calculator, python, module:function)")
    p.add_argument("--max-turns", type=int, default=4, help="multi-turn episodes: model turns per episode")
    p.add_argument(
        "--max-episode-tokens", type=int, default=768,
        help="multi-turn episodes: model + environment tokens per episode",
    )
    p.add_argument(
        "--max-prompt-length", type=int, default=2048,
        help="multi-turn episodes: longest opening in tokens (tool schemas and demonstrations are long)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and the task's held-out split")
    p.add_argument(
        "--reward-timeout", type=float, default=300.0,
        help="seconds the scoring reward may take per batch (0 = no limit)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from . import cpu
    from .data import PromptDataset, load_prompt_dataset
    from .data.hf import EVAL_SPLITS
    from .errors import MlxRftError
    from .models import load_model
    from .rewards import RewardSet, resolve_reward
    from .data.tasks import DEFAULT_TASK, load_task
    from rich.console import Console

    from .train.console import RunConsole

    if args.limit < 1:
        raise MlxRftError(f"--limit {args.limit}: score at least one prompt (--limit 1 or more)")
    if args.k < 1:
        raise MlxRftError(f"--k {args.k}: take at least one sample per prompt")
    if args.k > 1 and args.temperature <= 0:
        raise MlxRftError(f"--k {args.k} needs sampling; pass --temperature > 0 (e.g. 1.0)")
    if not args.reward_timeout >= 0:
        raise MlxRftError(f"--reward-timeout {args.reward_timeout} must be >= 0 (0 = no limit)")
    sampling = SamplingConfig(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, stop=list(args.stop),
        include_stop=True,
    ).validate()  # the same sampling rules as training, before the model loads
    model, tokenizer = load_model(args.model, adapter_path=args.adapter_path)
    generate = scorer = None
    if args.env or args.tools:
        data, scorer, generate = _episode_eval(args, tokenizer, model)
    elif args.data:
        if not args.reward_funcs:
            raise MlxRftError("--data needs --reward-funcs (e.g. accuracy) to score completions")
        data = load_prompt_dataset(
            args.data, tokenizer, system_prompt=args.system_prompt, splits=EVAL_SPLITS
        )
        funcs = [resolve_reward(s) for s in args.reward_funcs]
    else:
        task = load_task(args.task or DEFAULT_TASK.name, seed=args.seed)
        rows = getattr(task, "eval_rows", None) or task.rows
        system = args.system_prompt if args.system_prompt is not None else task.system_prompt
        data = PromptDataset.from_rows(rows, tokenizer, system_prompt=system)
        funcs = list(task.reward_funcs)
    examples = list(data)[: args.limit]
    # The bar goes to stderr (when it is a terminal), so stdout holds only the JSON.
    bars = RunConsole(Console(stderr=True))
    with cpu.speedups(model), bars.eval_progress(len(examples)) as advance:
        out = evaluate_prompts(
            model, tokenizer, examples,
            scorer or RewardSet(funcs[:1], on_error="none", timeout=args.reward_timeout),
            k=args.k, sampling=sampling, seed=args.seed, progress=advance, generate=generate,
        )
    print(json.dumps({"prompts": len(examples), **out}, indent=2))
    if out["eval/unscored"]:
        print(
            f"warning: {out['eval/unscored']:.0f} of {len(examples) * args.k} samples could not be "
            "scored and count as 0", file=sys.stderr,
        )


def _episode_eval(args, tokenizer, model):
    """Held-out rows, reward and a generate function for multi-turn episodes (--env / --tools): the
    rows, prompts and reward `mlx-rft train` evaluates with the same settings."""
    from .config import GRPOConfig
    from .train.run_data import build_run_data

    cfg = GRPOConfig(
        model=args.model, env=args.env, tools=list(args.tools), task=args.task, train_file=args.data,
        reward_funcs=list(args.reward_funcs or []), eval_size=args.limit, seed=args.seed,
        system_prompt=args.system_prompt, max_turns=args.max_turns,
        max_episode_tokens=args.max_episode_tokens, max_new_tokens=args.max_new_tokens,
        reward_timeout=args.reward_timeout, max_prompt_length=args.max_prompt_length,
    ).validate()
    data = build_run_data(cfg, tokenizer)

    def generate(examples, k, sampling_, seed):
        return data.episodes.rollouts(model, tokenizer, examples, k, sampling_, seed=seed)

    return data.eval, data.eval_reward, generate

