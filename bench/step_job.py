"""The GRPO step benchmark's job, shared by `bench_step.py` (mlx-rft) and `bench_trl.py` (TRL), so
both time the same prompts and reward. No MLX or torch import."""

from __future__ import annotations


def prompts(n: int = 200) -> list[str]:
    return [f"Write a short story about the number {i}, in two sentences." for i in range(n)]


def long_answer(prompts, completions, **columns):
    """Rewards completions for approaching 200 characters: varied within every group."""
    return [-abs(200 - len(c)) / 200 for c in completions]
