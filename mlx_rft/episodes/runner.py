"""Episodes for one rollout call: an environment per row, the conversation so far, the limits.

`EpisodeRunner` is the rollout engine's `TurnHandler` (rollout/turns.py): at the end of each
model turn it appends the turn to the row's messages, asks the row's environment for its reply,
renders the reply into token ids (render.py) and checks the limits. What each episode did is kept
in an `Episode` record: the messages, turn and tool counts, how it ended.

One environment instance per row (B prompts x G episodes), so no state leaks between the G
episodes of a prompt; the prompt itself (the opening messages) is rendered once per prompt and
shared by its G episodes, so `reset` must give the same opening messages for the same row.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import MlxRftError
from .render import ReplyRenderer

# How an episode ended: the environment ended it / a limit cut it / the environment raised.
ENDINGS = ("done", "turns", "tokens", "length", "error")


@dataclass
class EpisodeLimits:
    """Bounds on one episode (the per-tool time limit lives with the tools)."""

    max_turns: int = 4  # model turns
    max_tokens: int = 768  # model + environment tokens after the prompt

    def __post_init__(self):
        if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise MlxRftError(f"max_turns={self.max_turns!r} is invalid; set it to an integer >= 1")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise MlxRftError(f"max_episode_tokens={self.max_tokens!r} is invalid; set it to an integer >= 2")


@dataclass
class Episode:
    """What one episode did; `env` is its environment (its `reward` scores the episode)."""

    messages: list[dict]  # opening messages, then assistant turns and environment replies
    env: Any = None
    turns: int = 0  # model turns
    tool_calls: int = 0
    tool_errors: int = 0
    env_tokens: int = 0  # tokens of environment replies fed to the model
    end: str = "done"  # one of ENDINGS
    error: str | None = None  # the environment's exception, when end == "error"
    opening: int = field(default=0, repr=False)  # how many of `messages` the prompt holds

    @property
    def truncated(self) -> bool:
        return self.end in ("turns", "tokens", "length")

    def as_record(self) -> dict[str, Any]:
        """JSON-ready: the episode's own messages (not the prompt's) and its counts."""
        return {
            "messages": self.messages[self.opening :], "turns": self.turns, "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors, "env_tokens": self.env_tokens, "end": self.end,
            **({"error": self.error} if self.error else {}),
        }


def check_messages(reply: Any, where: str) -> list[dict]:
    """An environment's messages: a list of {"role": str, "content": str} dicts."""
    if not isinstance(reply, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in reply
    ):
        raise MlxRftError(
            f"{where} returned {type(reply).__name__} {str(reply)[:80]!r}; return a list of "
            '{"role": ..., "content": ...} dicts (or None from step to end the episode)'
        )
    return reply


class EpisodeRunner:
    """Turn handler for one `generate_rollouts` call over N = len(envs) rows.

    envs[n]: row n's environment, already `reset`; openings[n]: the messages its prompt holds.
    """

    def __init__(
        self, envs: Sequence[Any], openings: Sequence[list[dict]], renderer: ReplyRenderer,
        limits: EpisodeLimits,
    ) -> None:
        if len(envs) != len(openings):
            raise ValueError("one opening per environment")
        self.renderer = renderer
        self.limits = limits
        self.max_tokens = limits.max_tokens
        self.episodes = [
            Episode(messages=list(o), env=e, opening=len(o)) for e, o in zip(envs, openings)
        ]

    def end_turn(self, row: int, token_ids: list[int], text: str, reason: str, used: int) -> list[int] | None:
        ep = self.episodes[row]
        ep.messages.append({"role": "assistant", "content": text})
        ep.turns += 1
        if reason == "tokens":
            return self._end(ep, "tokens")
        # A turn cut at max_new_tokens still goes to the environment (a game can tell the model
        # to be brief); if the environment ends the episode there, it ends truncated.
        try:
            reply = ep.env.step(list(ep.messages))
            if reply is not None:
                reply = check_messages(reply, f"{type(ep.env).__name__}.step")
        except Exception as exc:  # an environment bug ends this episode, not the run
            ep.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return self._end(ep, "error")
        if not reply:
            return self._end(ep, "length" if reason == "length" else "done")
        if ep.turns >= self.limits.max_turns:
            return self._end(ep, "turns")
        ids = self.renderer.reply_ids(reply, token_ids[-1] if token_ids else None)
        if used + len(ids) >= self.max_tokens:
            return self._end(ep, "tokens")
        ep.messages.extend(reply)
        ep.env_tokens += len(ids)
        return ids

    def _end(self, ep: Episode, how: str) -> None:
        ep.end = how
        ep.tool_calls = int(getattr(ep.env, "tool_calls", 0) or 0)
        ep.tool_errors = int(getattr(ep.env, "tool_errors", 0) or 0)
        return None


def make_envs(factory: Callable[[], Any], rows: Sequence[dict], group_size: int) -> tuple[list, list[list[dict]]]:
    """`group_size` fresh environments per row, reset on it; and each row's opening messages.

    Raises if reset is not deterministic for a row (its G episodes share one prompt)."""
    envs, openings = [], []
    for b, row in enumerate(rows):
        first = None
        for _ in range(group_size):
            env = factory()
            opening = check_messages(env.reset(dict(row)), f"{type(env).__name__}.reset")
            if first is None:
                first = opening
            elif opening != first:
                raise MlxRftError(
                    f"{type(env).__name__}.reset gave different opening messages for the same row "
                    f"{b}; make reset depend on the row only (keep per-episode randomness in step)"
                )
            envs.append(env)
            openings.append(first)
    return envs, openings


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Per-step means over the step's episodes (counts per episode; fractions of episodes)."""
    n = max(len(episodes), 1)
    mean = lambda f: sum(f(e) for e in episodes) / n  # noqa: E731
    out = {
        "episode/turns": mean(lambda e: e.turns),
        "episode/tool_calls": mean(lambda e: e.tool_calls),
        "episode/tool_errors": mean(lambda e: e.tool_errors),
        "episode/env_tokens": mean(lambda e: e.env_tokens),
        "episode/env_errors": mean(lambda e: e.end == "error"),
    }
    for how in ("turns", "tokens", "length"):
        out[f"episode/truncated_{how}"] = mean(lambda e: e.end == how)
    return out
