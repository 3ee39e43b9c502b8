"""Multi-turn episodes: the model writes, a tool or an environment answers, the model writes again.

    envs.py     the Environment protocol (reset / step / reward) and the built-in environments
    tools.py    tools from typed, documented functions; the calculator and the sandboxed python
    parsing.py  tool calls from the model's text (Hermes/Qwen tags, Llama JSON)
    render.py   an environment's reply as the token ids the chat template gives it
    runner.py   one rollout call's episodes: the rollout engine's turn handler, Episode records
    data.py     a run's environment, prompts and rewards from its config

The rollout engine (rollout/engine.py, rollout/turns.py) keeps every row's tokens exactly as the
model saw them, and masks the environment's tokens out of the loss.
"""

from .envs import BUILTIN_ENVS, Arithmetic, Environment, GuessNumber, resolve_env
from .runner import Episode, EpisodeLimits, EpisodeRunner, episode_metrics, make_envs
from .tools import BUILTIN_TOOLS, Tool, ToolBox, as_tool, calculator, resolve_tools

__all__ = [
    "Arithmetic", "BUILTIN_ENVS", "BUILTIN_TOOLS", "Environment", "Episode", "EpisodeLimits",
    "EpisodeRunner", "GuessNumber", "Tool", "ToolBox", "as_tool", "calculator", "episode_metrics",
    "make_envs", "resolve_env", "resolve_tools",
]
