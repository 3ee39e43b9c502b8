"""A run's episode setup from its config: the environment, its rows and prompts, the rewards.

    --env arithmetic|guess|module:Class    rows from the environment's `make_rows` (or the task)
    --tools calculator,python              the task's rows, the default tool-calling environment

Each row's prompt is its environment's opening messages (`reset`), rendered once with the tools'
schemas (a template that ignores `tools=` gets them in a system message instead, unless the
opening already describes them). The reward: the environment's own `reward` when it has one
(`environment_reward`), else the task's reward functions on the last turn.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..data import PromptDataset
from ..data.prompts import render_prompt, row_messages
from ..errors import MlxRftError
from ..types import PromptExample
from .envs import Environment, resolve_env
from .parsing import CLOSE
from .render import ReplyRenderer
from .runner import Episode, EpisodeLimits, EpisodeRunner, make_envs
from .tools import as_tool, resolve_tools

EVAL_SEED = 1_000_003  # held-out rows of an environment: a seed no training seed is likely to be


@dataclass
class EpisodeSetup:
    """What the trainer needs to run episodes: a fresh environment per episode, the limits."""

    factory: Callable[[], Any]
    renderer: ReplyRenderer
    limits: EpisodeLimits
    name: str
    stop: tuple[str, ...] = ()  # stop strings that end a turn: a tool call's closing tag
    schemas: tuple[dict, ...] = ()  # every tool's schema (the template gets them, or a system message)

    def sampling(self, sampling):
        """`sampling` with the episodes' stop strings added."""
        extra = [s for s in self.stop if s not in sampling.stop]
        return dataclasses.replace(sampling, stop=[*sampling.stop, *extra]) if extra else sampling

    def runner(self, examples: list[PromptExample], group_size: int) -> EpisodeRunner:
        envs, openings = make_envs(self.factory, [e.columns for e in examples], group_size)
        return EpisodeRunner(envs, openings, self.renderer, self.limits)

    def rollouts(self, model, tokenizer, examples: list[PromptExample], group_size: int, sampling, **kw):
        """`group_size` episodes of each example in one `generate_rollouts` call (fresh
        environments, the episodes' stop strings), their records in `.episodes`."""
        from ..rollout import generate_rollouts

        runner = self.runner(list(examples), group_size)
        out = generate_rollouts(model, tokenizer, [e.prompt_ids for e in examples], group_size,
                                self.sampling(sampling), turns=runner, **kw)
        out.episodes = runner.episodes
        return out


def tool_system_text(schemas: list[dict]) -> str:
    """How to call tools, for chat templates that do not render `tools=` themselves."""
    listing = "\n".join(json.dumps(s) for s in schemas)
    return (
        f"You can call these tools:\n<tools>\n{listing}\n</tools>\n"
        'To call one, write <tool_call>{"name": "TOOL", "arguments": {...}}</tool_call> and wait '
        "for its result in the next message."
    )


def template_renders_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def episode_setup(cfg, tokenizer) -> EpisodeSetup:
    """The environment factory from --env / --tools (tools join an environment's own)."""
    env_cls = resolve_env(cfg.env) if cfg.env else Environment
    extra = resolve_tools(list(cfg.tools)) if cfg.tools else []
    own = [as_tool(t, timeout=cfg.tool_timeout) for t in getattr(env_cls(), "tools", ()) or ()]
    tools = own + [dataclasses.replace(t, timeout=cfg.tool_timeout) for t in extra]

    def factory():
        env = env_cls()
        if tools:
            try:  # the tools with --tool-timeout applied (an env whose tools are a property keeps its own)
                env.tools = tuple(tools)
            except AttributeError:
                pass
        return env

    schemas = [t.schema for t in tools]
    renderer = ReplyRenderer(tokenizer, schemas if template_renders_tools(tokenizer) else None)
    limits = EpisodeLimits(max_turns=cfg.max_turns, max_tokens=cfg.max_episode_tokens)
    # A turn that calls a tool ends at the call: the result comes from the tool, not the model.
    stop = tuple(getattr(env_cls, "stop", ()) or ()) + ((CLOSE,) if tools else ())
    return EpisodeSetup(factory, renderer, limits, cfg.env or "tools", stop, tuple(schemas))


def episode_dataset(rows: list[dict], tokenizer, setup: EpisodeSetup, *, source: str,
                    max_prompt_length: int) -> PromptDataset:
    """Rows -> prompts rendered from their environment's opening messages."""
    schemas = setup.renderer.tools  # None when the template does not render tools itself
    env = setup.factory()
    examples = []
    for i, row in enumerate(rows):
        opening = env.reset(dict(row))
        if setup.schemas and schemas is None and not any("<tools>" in m["content"] for m in opening):
            opening = _with_system(opening, tool_system_text(list(setup.schemas)))
            row = {**row, "messages": opening}
            row.pop("prompt", None)
        text, ids = render_prompt(tokenizer, opening, tools=schemas)
        if len(ids) > max_prompt_length:
            raise MlxRftError(
                f"{source}[{i}]: the opening is {len(ids)} tokens, over max_prompt_length="
                f"{max_prompt_length}; raise --max-prompt-length or shorten the environment's opening"
            )
        examples.append(PromptExample(prompt=text, prompt_ids=ids, columns=dict(row)))
    if not examples:
        raise MlxRftError(f"{source} has no rows; give the environment rows (--task-size >= 1)")
    return PromptDataset(examples, source=source)


def with_system_prompt(row: dict, system_prompt: str | None) -> dict:
    """A task row as "messages" led by the system prompt its prompt was rendered with (the default
    environment's opening is then the prompt the task would have given)."""
    if not system_prompt:
        return row
    messages = row_messages(row)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    out = {k: v for k, v in row.items() if k != "prompt"}
    return {**out, "messages": messages}


def _with_system(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + list(messages)


def environment_rows(cfg, env_cls) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows from the environment's `make_rows` (no question on both sides)."""
    make = getattr(env_cls, "make_rows", None)
    if make is None:
        raise MlxRftError(
            f"{env_cls.__name__} has no make_rows(n, seed); give rows with --task or --train-file"
        )
    train = make(cfg.task_size, cfg.seed)
    seen = {_key(r) for r in train}
    drawn = make(cfg.eval_size * 2, EVAL_SEED)
    held = [r for r in drawn if _key(r) not in seen][: cfg.eval_size]
    if len(held) < cfg.eval_size:
        # A small space of rows (a game's secrets) cannot give unseen ones: the held-out rows then
        # test the strategy on the same kind of rows, not new questions.
        held = drawn[: cfg.eval_size]
    return train, held


def _key(row: dict) -> str:
    if "question" in row:
        return str(row["question"])
    return json.dumps(row, sort_keys=True, default=str)


# Columns that are the episode itself or the engine's, not the row's.
_NOT_COLUMNS = {"completion_ids", "messages", "prompt"}


class environment_reward:
    """Reward function: each episode's environment scores its own messages (`reward`)."""

    __name__ = "environment"

    def __call__(self, prompts, completions, *, episode: list[Episode], **columns) -> list[float | None]:
        out = []
        for i, ep in enumerate(episode):
            row = {k: v[i] for k, v in columns.items() if k not in _NOT_COLUMNS}
            out.append(ep.env.reward(list(ep.messages), **row))
        return out


def has_own_reward(env_cls) -> bool:
    return getattr(env_cls, "reward", Environment.reward) is not Environment.reward
