"""A tiny training job for the data-parallel test: run alone or under `mlx.launch -n 2`."""

import re
import sys

import mlx_rft  # noqa: F401  (fast BLAS before mlx.core)
from mlx_rft import GRPOConfig, GRPOTrainer
from mlx_rft.episodes import Environment


class Twice(Environment):
    """Two-turn episodes: the first turn is answered with a fixed message."""

    def step(self, messages):
        return [{"role": "user", "content": "say more"}] if len(messages) < 3 else None


def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def half_constant(prompts, completions, **columns):
    """digit_share for even-numbered questions, a constant for odd ones (zero-variance groups)."""
    return [s if int(re.search(r"Question (\d+)", p).group(1)) % 2 == 0 else 0.5
            for p, s in zip(prompts, digit_share(prompts, completions))]


if __name__ == "__main__":
    model, out, loss_type, scale, steps = sys.argv[1:6]
    dynamic = sys.argv[6:] == ["dynamic"]  # dynamic sampling against half-constant rewards
    episodes = sys.argv[6:] == ["episodes"]  # two-turn episodes
    rows = [{"prompt": f"Question {i}: say something"} for i in range(64)]
    cfg = GRPOConfig(
        model=model, output_dir=out, loss_type=loss_type, scale_rewards=scale, num_steps=int(steps),
        max_new_tokens=8, group_size=4, prompts_per_step=4, eval_size=4, learning_rate=0.5,
        save_every=100, seed=5, gradient_accumulation_steps=2, optimizer="sgd",
        dynamic_sampling=dynamic, env=f"{__file__}:Twice" if episodes else None, max_turns=2,
    )
    reward = half_constant if dynamic else digit_share
    GRPOTrainer(cfg, reward_funcs=[reward], train_dataset=rows).train()
