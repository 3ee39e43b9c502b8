"""Rewards: the reward-function API, built-in verifiers, a sandboxed code reward, an LLM judge.

    from mlx_rft.rewards import RewardSet, resolve_reward
    rewards = RewardSet(["accuracy", "format"], weights=[1.0, 0.2])
    result = rewards(prompts, completions, {"answer": answers})   # RewardResult; result.total [N]

Heavier pieces load on use: `rewards.code` (sandbox), `rewards.judge` / `rewards.rubric` (RLAIF),
`rewards.judge_calibrate` (is a judge any use? `mlx-rft judge-check`).
"""

from .base import RewardOutput, RewardResult
from .registry import builtin_rewards, resolve_reward
from .reward_set import RewardSet
from .code import CodeSandbox, SandboxConfig, make_code_reward
from .judge import MLXJudge, OpenAIJudge, make_judge_reward
from .rubric import Rubric, load_rubric
from .verifiers import (
    answers_equal,
    extract_final_answer,
    make_accuracy,
    make_format,
    make_length_reward,
    make_overlong_penalty,
    make_repetition_penalty,
)

__all__ = [
    "CodeSandbox",
    "MLXJudge",
    "OpenAIJudge",
    "RewardOutput",
    "RewardResult",
    "RewardSet",
    "Rubric",
    "SandboxConfig",
    "answers_equal",
    "builtin_rewards",
    "extract_final_answer",
    "load_rubric",
    "make_accuracy",
    "make_code_reward",
    "make_format",
    "make_judge_reward",
    "make_length_reward",
    "make_overlong_penalty",
    "make_repetition_penalty",
    "resolve_reward",
]
