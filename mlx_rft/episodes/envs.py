"""Environments for multi-turn episodes: what the model sees first, what answers each turn, and
(optionally) the episode's reward.

An episode alternates: the model writes a turn, the environment's `step` answers it (tool results,
game feedback), until `step` returns None. The base `Environment` is a tool-use environment: its
`step` runs the tool calls it finds in the model's turn. Two small built-ins show the two kinds of
task (each is meant to be copied and changed):

- `Arithmetic`: a verifiable answer that needs a tool (large multiplications, with `calculator`);
- `GuessNumber`: an interactive game that is won by using the feedback of earlier turns.

`resolve_env` turns a CLI spec (a built-in name or `package.module:Class`) into a class; the
trainer makes one instance per episode.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence

from ..data.prompts import row_messages
from ..data.readers import BadRow
from ..data.tasks import extract_answer
from ..errors import MlxRftError
from .parsing import ToolCall, scan_tool_calls
from ..user_code import load_object
from .tools import ToolBox, as_tool, calculator


class Environment:
    """One episode's state. The trainer makes one instance per episode (so state never leaks between
    the G episodes of a prompt); reset must return the same opening messages for the same row.

    Subclasses set `tools` (functions with type hints and Google-style docstrings; bound methods
    work too, e.g. a property returning [self.lookup]) and may override reset, step and reward.
    `tool_calls` and `tool_errors` are counters the trainer reads after each episode.
    """

    tools: Sequence[Callable] = ()
    max_calls_per_turn: int = 8  # calls beyond this in one turn are answered with an error, not run
    # Class-level defaults, so subclasses with their own __init__ need not call super().__init__.
    tool_calls: int = 0  # every call the model wrote, well-formed or not
    tool_errors: int = 0  # malformed calls plus calls whose tool reported an error
    _toolbox: ToolBox | None = None

    @property
    def toolbox(self) -> ToolBox:
        """The ToolBox of `tools`, built on first use (once per instance)."""
        if self._toolbox is None:
            self._toolbox = ToolBox(list(self.tools))
        return self._toolbox

    def reset(self, row: dict) -> list[dict]:
        """The opening messages: the row's "messages", or its "prompt" as one user message."""
        try:
            found = row_messages(row)
        except BadRow as e:
            raise MlxRftError(f"episode row {e}") from None
        if isinstance(found, str):
            return [{"role": "user", "content": found}]
        return found

    def step(self, messages: list[dict]) -> list[dict] | None:
        """Answer the assistant's last turn: one "tool" message per call in it (a malformed call's
        message has name "error"), in text order; None when the turn has no call (the episode ends)."""
        if not messages:
            raise MlxRftError("Environment.step needs the episode's messages, ending with the assistant's turn")
        items = scan_tool_calls(messages[-1].get("content") or "")
        if not items:
            return None
        replies = []
        for number, item in enumerate(items, 1):
            self.tool_calls += 1
            if number > self.max_calls_per_turn:
                self.tool_errors += 1
                replies.append(_tool_message("error", (
                    f"error: tool call {number} was not run; at most {self.max_calls_per_turn} calls "
                    "are run per turn, so wait for the results before calling again"
                )))
            elif isinstance(item, ToolCall):
                result = self.toolbox.call(item)
                self.tool_errors += result.error
                replies.append(_tool_message(item.name, result.content))
            else:
                self.tool_errors += 1
                replies.append(_tool_message("error", item))
        return replies

    # `messages` is positional-only so that a row's own "messages" column (the opening) may also
    # arrive among the columns, as the trainer passes every column of the row by name.
    def reward(self, messages: list[dict], /, **columns) -> float | None:
        """The episode's reward; None (the default): the task's reward functions score the final answer."""
        return None


def _tool_message(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}


def _last_assistant(messages: list[dict]) -> str | None:
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return message.get("content") or ""
    return None


# ---------------------------------------------------------------------------------------------
# Arithmetic: a verifiable answer that needs a tool

_CALL_EXAMPLE = '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>'


# Word problems: the model must turn the text into an expression and call the tool with it.
_PROBLEMS = (
    ("A farmer plants {a} rows of {b} trees. How many trees does he plant?", "{a} * {b}"),
    ("A library has {a} shelves with {b} books on each. How many books are there?", "{a} * {b}"),
    ("Each of {a} boxes holds {b} pens, and {c} more pens are loose. How many pens are there in all?",
     "{a} * {b} + {c}"),
    ("A train carries {a} passengers on each of {b} trips, then {c} more on a last trip. How many "
     "passengers does it carry in total?", "{a} * {b} + {c}"),
)


class Arithmetic(Environment):
    """Word problems over multi-digit integers, solved with a calculator tool.

    It teaches the tool-use loop: turn the question into an expression, write a well-formed call,
    wait for the result, and copy it into the final answer. Products of several-digit numbers are
    beyond what a small model can do in its head, so the reward is earned through the tool. The
    tool's schema is written into the system message because many chat templates (SmolLM2's, for
    one) ignore `tools=`, and one solved exchange comes before the question: small models copy a
    worked example of the loop far more reliably than they follow a description of it.
    """

    tools = (calculator,)

    @staticmethod
    def system_prompt() -> str:
        schema = json.dumps(as_tool(calculator).schema)
        return (
            "You have a calculator tool. Its description:\n"
            f"<tools>\n{schema}\n</tools>\n"
            f"To call it, write exactly\n{_CALL_EXAMPLE}\n"
            "and wait: the result comes back in the next message. Use the calculator for every "
            "multiplication and addition. When you have the result, finish with <answer>NUMBER</answer>."
        )

    @staticmethod
    def demonstration() -> list[dict]:
        """The solved exchange shown before the question."""
        return [
            {"role": "user", "content": "A school has 123 classes of 45 pupils. How many pupils are there? "
                                        "Use the calculator."},
            {"role": "assistant", "content": _CALL_EXAMPLE},
            {"role": "tool", "content": "5535"},
            {"role": "assistant", "content": "<answer>5535</answer>"},
        ]

    @classmethod
    def make_rows(cls, n: int, seed: int, digits: int = 3) -> list[dict]:
        """n rows {"messages", "answer", "question", "expression"}; the same seed gives the same rows."""
        if n < 0 or digits < 1:
            raise MlxRftError(f"Arithmetic.make_rows needs n >= 0 and digits >= 1, got n={n}, digits={digits}")
        rng = random.Random(seed)
        low, high = 10 ** (digits - 1), 10**digits - 1
        opening = [{"role": "system", "content": cls.system_prompt()}, *cls.demonstration()]
        rows = []
        for _ in range(n):
            text, expression = rng.choice(_PROBLEMS)
            values = {k: rng.randint(low, high) for k in "abc"}
            question, expression = text.format(**values), expression.format(**values)
            a, b, c = values["a"], values["b"], values["c"]
            result = a * b + c if "+" in expression else a * b
            rows.append({
                "messages": [
                    *(dict(m) for m in opening),
                    {"role": "user", "content": f"{question} Use the calculator."},
                ],
                "answer": str(result),
                "question": question,
                "expression": expression,
            })
        return rows

    def reward(self, messages: list[dict], /, answer, **columns) -> float:
        """1.0 when the last assistant turn's <answer> is the result (spaces and commas ignored)."""
        last = _last_assistant(messages)
        found = extract_answer(last) if last is not None else None
        if found is None:
            return 0.0
        return float(_plain_number(found) == _plain_number(str(answer)))


def _plain_number(text: str) -> str:
    return text.replace(",", "").replace(" ", "").strip()


# ---------------------------------------------------------------------------------------------
# GuessNumber: an interactive game won through feedback

_GUESS_RE = re.compile(r"<guess>(.*?)</guess>", re.DOTALL)
_INTEGER_RE = re.compile(r"[+-]?\d+")


class GuessNumber(Environment):
    """Find a secret number from "too low" / "too high" feedback, in at most max_guesses turns.

    It teaches using what earlier turns revealed: a model that halves the range each turn (binary
    search) wins within 7 guesses for numbers up to 100, one that guesses at random rarely does.
    Every turn uses one guess, including a turn without a valid <guess> (otherwise a model that
    never writes the format would never end the game). The reward is 1.0 for a first-turn win,
    down to 0.5 for a win on the last allowed turn, and 0.0 when the secret is not found.

    Row columns: "secret" (int in 1..high), optional "high" (default 100) and "max_guesses"
    (default 7). The opening messages are always built from high and max_guesses, so the rules the
    model reads are the ones step enforces.
    """

    format_errors: int = 0  # turns without a usable <guess>N</guess>
    guesses: int = 0  # turns used so far
    solved: bool = False

    def reset(self, row: dict) -> list[dict]:
        if not isinstance(row, dict):
            raise MlxRftError(f"GuessNumber rows are objects with a 'secret' column, got {type(row).__name__}")
        high, max_guesses, secret = row.get("high", 100), row.get("max_guesses", 7), row.get("secret")
        for name, value in (("high", high), ("max_guesses", max_guesses), ("secret", secret)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MlxRftError(
                    f"GuessNumber row column {name!r} must be a positive integer, got {value!r}; "
                    "make rows with GuessNumber.make_rows"
                )
        if secret > high:
            raise MlxRftError(f"GuessNumber row: secret {secret} is above high={high}; use a secret in 1..high")
        self.secret, self.high, self.max_guesses = secret, high, max_guesses
        self.guesses, self.format_errors, self.solved = 0, 0, False
        return self.opening(high, max_guesses)

    @staticmethod
    def opening(high: int = 100, max_guesses: int = 7) -> list[dict]:
        return [
            {"role": "system", "content": "You are playing a number guessing game."},
            {"role": "user", "content": (
                f"I am thinking of a whole number from 1 to {high}. Find it in at most {max_guesses} "
                "guesses. Write each guess as <guess>N</guess>. After each guess I reply that N is "
                "too low (guess higher) or too high (guess lower); when N is correct the game ends."
            )},
        ]

    @classmethod
    def make_rows(cls, n: int, seed: int, high: int = 100, max_guesses: int = 7) -> list[dict]:
        """n rows {"messages", "secret", "high", "max_guesses"}; the same seed gives the same rows."""
        if n < 0 or high < 1 or max_guesses < 1:
            raise MlxRftError(
                f"GuessNumber.make_rows needs n >= 0, high >= 1 and max_guesses >= 1, got n={n}, "
                f"high={high}, max_guesses={max_guesses}"
            )
        rng = random.Random(seed)
        opening = cls.opening(high, max_guesses)
        return [
            {"messages": [dict(m) for m in opening], "secret": rng.randint(1, high), "high": high,
             "max_guesses": max_guesses}
            for _ in range(n)
        ]

    def _judge(self, content: str) -> tuple[str, int | str]:
        """("correct" | "low" | "high", guess) or ("format", the reply explaining the format)."""
        found = _GUESS_RE.findall(content)
        usage = f"write your guess as <guess>N</guess>, with N a whole number from 1 to {self.high}."
        if not found or not _INTEGER_RE.fullmatch(found[-1].strip()):
            return "format", f"I found no guess. Please {usage}"
        guess = int(found[-1].strip())
        if not 1 <= guess <= self.high:
            return "format", f"{guess} is outside 1 to {self.high}; {usage}"
        if guess == self.secret:
            return "correct", guess
        return ("low" if guess < self.secret else "high"), guess

    def step(self, messages: list[dict]) -> list[dict] | None:
        self._need_reset()
        # The turn count comes from the messages, so step and reward agree on it.
        self.guesses = sum(1 for m in messages if m.get("role") == "assistant")
        verdict, detail = self._judge(_last_assistant(messages) or "")
        if verdict == "correct":
            self.solved = True
            return None
        if verdict == "format":
            self.format_errors += 1
            reply = detail
        elif verdict == "low":
            reply = f"{detail} is too low; guess higher."
        else:
            reply = f"{detail} is too high; guess lower."
        if self.guesses >= self.max_guesses:
            return None  # out of guesses
        return [{"role": "user", "content": reply}]

    def reward(self, messages: list[dict], /, **columns) -> float:
        """1.0 - 0.5 * (turn - 1) / (max_guesses - 1) for a win on that turn, else 0.0."""
        self._need_reset()
        turns = [m.get("content") or "" for m in messages if m.get("role") == "assistant"]
        for turn, content in enumerate(turns[: self.max_guesses], 1):
            if self._judge(content)[0] == "correct":
                if self.max_guesses == 1:
                    return 1.0
                return 1.0 - 0.5 * (turn - 1) / (self.max_guesses - 1)
        return 0.0

    def _need_reset(self) -> None:
        if not hasattr(self, "secret"):
            raise MlxRftError(
                "GuessNumber.reset(row) must be called before step or reward (it sets the secret)"
            )


# ---------------------------------------------------------------------------------------------
# Specs

BUILTIN_ENVS: dict[str, type[Environment]] = {"arithmetic": Arithmetic, "guess": GuessNumber}


def resolve_env(spec: str | type) -> type[Environment]:
    """An environment class from a built-in name (arithmetic, guess), a `package.module:Class` or
    `path/to/file.py:Class` reference, or a class."""
    if isinstance(spec, str):
        name = spec.strip()
        if name in BUILTIN_ENVS:
            return BUILTIN_ENVS[name]
        if ":" not in name:
            raise MlxRftError(
                f"unknown environment {spec!r}; use a built-in ({', '.join(BUILTIN_ENVS)}), a "
                "package.module:Class or a path/to/file.py:Class"
            )
        cls = load_object(name, "environment")
    else:
        cls = spec
    if not isinstance(cls, type):
        raise MlxRftError(
            f"environment {spec!r} is a {type(cls).__name__}, not a class; point it at a subclass of "
            "mlx_rft.episodes.envs.Environment"
        )
    missing = [m for m in ("reset", "step", "reward") if not callable(getattr(cls, m, None))]
    if missing:
        raise MlxRftError(
            f"environment {spec!r} has no {', '.join(missing)} method; subclass "
            "mlx_rft.episodes.envs.Environment, which provides all three"
        )
    return cls
