"""A tiny training job for the data-parallel test: run alone or under `mlx.launch -n 2`."""

import os
import re
import signal
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


class FailOnRank:
    """digit_share, but it raises from its second call on in the process of rank `rank`."""

    def __init__(self, rank: str):
        self.rank, self.calls, self.__name__ = rank, 0, "digit_share"

    def __call__(self, prompts, completions, **columns):
        self.calls += 1
        if os.environ.get("MLX_RANK") == self.rank and self.calls > 1:
            raise RuntimeError(f"reward broke on rank {self.rank}")
        return digit_share(prompts, completions)


class StopsItself(GRPOTrainer):
    """A trainer that sends itself SIGTERM after step `after` (a job scheduler stopping it)."""

    after = 0

    def train_step(self, step, *args):
        out = super().train_step(step, *args)
        if step == self.after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    model, out, loss_type, scale, steps = sys.argv[1:6]
    extra = sys.argv[6:]
    dynamic = "dynamic" in extra  # dynamic sampling against half-constant rewards
    episodes = "episodes" in extra  # two-turn episodes
    # key=value settings, e.g. rollout_workers=1 max_staleness=0 optimizer=adamw
    options = dict(x.split("=", 1) for x in extra if "=" in x)
    fail_rank = options.pop("fail_rank", None)  # that rank's reward breaks after its first call
    StopsItself.after = int(options.pop("sigterm_after", 0))  # the trainer stops after that step
    typed = {k: _value(v) for k, v in options.items()}
    rows = [{"prompt": f"Question {i}: say something"} for i in range(64)]
    settings = dict(
        model=model, output_dir=out, loss_type=loss_type, scale_rewards=scale, num_steps=int(steps),
        max_new_tokens=8, group_size=4, prompts_per_step=4, eval_size=4, learning_rate=0.5,
        save_every=100, seed=5, gradient_accumulation_steps=2, optimizer="sgd",
        dynamic_sampling=dynamic, env=f"{__file__}:Twice" if episodes else None, max_turns=2,
    )
    cfg = GRPOConfig(**{**settings, **typed})
    reward = half_constant if dynamic else FailOnRank(fail_rank) if fail_rank else digit_share
    result = StopsItself(cfg, reward_funcs=[reward], train_dataset=rows).train()
    sys.exit(result.exit_code)
