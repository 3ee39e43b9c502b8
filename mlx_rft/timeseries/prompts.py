"""Rows -> model inputs: the chat template around text and series pieces.

A row's prompt is a list of text and `SeriesPart` pieces. Each series part becomes, per channel,
a line of text with its name, mean and standard deviation, then that channel's soft tokens: the
encoder sees only the z-normalised shape, and the scale it removed is written in words for the
LLM to read. The chat template is applied to the whole user turn with a marker where each
channel goes, and the text between markers is tokenized piece by piece.

The text-only baseline (`as_text=True`) writes the same numbers into the prompt instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MlxRftError
from .rows import SeriesPart, TSRow, series_text

MARKER = "\u241e{}\u241e"  # a symbol no prompt text uses; replaced by soft tokens
STD_FLOOR = 1e-8


@dataclass(frozen=True)
class Encoded:
    """One row as model input: pieces (token-id arrays and z-normalised channels) + answer ids."""

    pieces: tuple[np.ndarray, ...]
    answer_ids: np.ndarray  # the answer's tokens and the end-of-turn token
    answer: str


def answer_text(answer: str) -> str:
    return f"<answer>{answer}</answer>"


def znorm(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    mean = float(values.mean())
    std = float(values.std())
    return ((values - mean) / max(std, STD_FLOOR)).astype(np.float32), mean, std


def _channels(part: SeriesPart):
    C = part.values.shape[0]
    for c in range(C):
        name = part.name if C == 1 else f"{part.name}, channel {c + 1}"
        yield name, part.values[c]


def user_turn(row: TSRow, as_text: bool = False) -> tuple[str, list[np.ndarray]]:
    """The user message with a MARKER per channel, and the z-normalised channels in order."""
    text, channels = [], []
    for part in row.parts:
        if isinstance(part, str):
            text.append(part)
            continue
        for name, values in _channels(part):
            x, mean, std = znorm(values)
            head = f"{name} ({len(values)} values), mean {mean:.4g}, std {std:.4g}:"
            if as_text:
                text.append(f"{head} {series_text(x[None, :])}")
            else:
                text.append(f"{head} {MARKER.format(len(channels))}")
                channels.append(x)
    return "\n".join(text), channels


def answer_ids(tokenizer, answer: str) -> np.ndarray:
    ids = tokenizer.encode(answer_text(answer), add_special_tokens=False)
    return np.asarray(ids + [tokenizer.eos_token_id], np.int32)


def encode_row(tokenizer, row: TSRow, as_text: bool = False) -> Encoded:
    content, channels = user_turn(row, as_text)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    pieces: list[np.ndarray] = []
    rest = prompt
    for i, channel in enumerate(channels):
        before, sep, rest = rest.partition(MARKER.format(i))
        if not sep:
            raise MlxRftError(
                "the chat template dropped a series marker from the prompt; use a model whose "
                "template keeps the user's text as written"
            )
        pieces.append(_tokens(tokenizer, before))
        pieces.append(channel)
    pieces.append(_tokens(tokenizer, rest))
    return Encoded(tuple(pieces), answer_ids(tokenizer, row.answer), row.answer)


def _tokens(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
