"""The multimodal row: a prompt of text and series pieces in order, and the answer text.

Rows come from a UCR/UEA dataset (`ucr_rows`) or from the user's JSONL file (`read_ts_jsonl`).
`series_text` writes a series as numbers, for a text-only baseline that puts the values into the
prompt instead of soft tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MlxRftError
from .ucr import TSData


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays field by field is ambiguous
class SeriesPart:
    """One series in a prompt; each channel becomes one block of soft tokens."""

    name: str
    values: np.ndarray  # float32 [channels, length], finite


@dataclass(frozen=True, eq=False)
class TSRow:
    """A prompt made of text pieces and series pieces in order, plus the answer text."""

    parts: tuple[str | SeriesPart, ...]
    answer: str

    @property
    def series(self) -> tuple[SeriesPart, ...]:
        return tuple(p for p in self.parts if isinstance(p, SeriesPart))


# ---------------------------------------------------------------------------------------------
# Rows from a UCR/UEA dataset


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def ucr_rows(data: TSData) -> list[TSRow]:
    """One classification row per series, with one SeriesPart per channel ("channel 1", ...).

    Series with missing values are refused rather than filled: a made-up value would be shown
    to the model as if it had been measured.
    """
    if not data.classes:
        raise MlxRftError(
            f"{data.name} has no class labels, so it cannot make classification rows; use a "
            "classification dataset (see ucr_names())"
        )
    if data.has_missing:
        raise MlxRftError(
            f"{data.name} has missing values (NaN), which rows cannot hold; pick a dataset "
            "without missing values, or fill them (e.g. by linear interpolation) before making rows"
        )
    question = (
        f"Which class is it? Answer with one of: {', '.join(data.classes)}, "
        "inside <answer></answer> tags."
    )
    rows = []
    for values, label in zip(data.series, data.labels, strict=True):
        C = values.shape[0]
        # Lengths go with each channel (prompts.py), so variable-length rows share this text.
        intro = f"This is a time series from the {data.name} dataset ({_plural(C, 'channel')})."
        channels = tuple(SeriesPart(f"channel {c + 1}", values[c:c + 1]) for c in range(C))
        # The question before the series: rows of one dataset then share their text up to the
        # first channel, and that shared prefix runs through the LLM once (sft/forward.py).
        rows.append(TSRow((f"{intro} {question}", *channels), label))
    return rows


# ---------------------------------------------------------------------------------------------
# Rows from a user's JSONL file


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _inline_series(value: list, what: str) -> np.ndarray:
    """A JSON list (1-D: one channel; 2-D: [channels][length]) as float64 [C, T]."""
    if not value:
        raise ValueError(f"{what} is an empty series; give at least one value")
    if all(isinstance(v, list) for v in value):
        lengths = sorted({len(v) for v in value})
        if len(lengths) > 1:
            raise ValueError(
                f"{what} is a ragged 2-D array (channel lengths {', '.join(map(str, lengths))}); "
                "every channel needs the same number of values"
            )
        if lengths == [0]:
            raise ValueError(f"{what} is an empty series (its channels have no values)")
        flat = [x for channel in value for x in channel]
    elif any(isinstance(v, list) for v in value):
        raise ValueError(
            f"{what} mixes numbers and lists; give a list of numbers (one channel) or a list of "
            "equal-length lists ([channels][length])"
        )
    else:
        flat, value = value, [value]
    for x in flat:
        if not _is_number(x):
            raise ValueError(
                f"{what} has a non-numeric value {json.dumps(x)[:40]}; use numbers only"
            )
    try:
        return np.asarray(value, dtype=np.float64)
    except OverflowError:  # a JSON integer too large for a float
        raise ValueError(f"{what} has a value beyond float range; use smaller numbers") from None


def _npy_series(value: str, base: Path, what: str) -> np.ndarray:
    if not value.endswith(".npy"):
        raise ValueError(
            f"{what} is the string {value[:60]!r}; give a list of numbers or the path of a "
            ".npy file"
        )
    path = base / value
    if not path.is_file():
        raise ValueError(
            f"{what}: the .npy file {value!r} is missing (paths are relative to the JSONL file's "
            "folder); fix the path or add the file"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{what}: {value!r} is not a readable .npy file ({e}); re-save it"
        ) from None
    if array.dtype.kind not in "iuf" or array.ndim not in (1, 2):
        raise ValueError(
            f"{what}: {value!r} holds a {array.ndim}-D {array.dtype} array; save a 1-D or "
            "[channels, length] 2-D array of numbers"
        )
    if array.size == 0:
        raise ValueError(f"{what}: {value!r} is an empty series; give at least one value")
    return np.atleast_2d(array).astype(np.float64)


def _series_values(value: Any, base: Path, what: str) -> np.ndarray:
    if isinstance(value, list):
        array = _inline_series(value, what)
    elif isinstance(value, str):
        array = _npy_series(value, base, what)
    else:
        raise ValueError(
            f"{what} is a {type(value).__name__}; give a list of numbers or the path of a .npy file"
        )
    values = array.astype(np.float32)
    if not np.isfinite(values).all():  # after the cast: values beyond float32 range become inf
        raise ValueError(
            f"{what} has NaN or infinite values (or ones beyond float32 range); fill or drop them"
        )
    return values


def _series_part(piece: dict, index: int, base: Path) -> SeriesPart:
    what = f"series {index}"
    extra = sorted(set(piece) - {"series", "name"})
    if "series" not in piece or extra:
        raise ValueError(
            f"prompt object {json.dumps(piece)[:60]} needs a \"series\" key (and optionally "
            f"\"name\"){'; unknown keys: ' + ', '.join(extra) if extra else ''}"
        )
    if "name" not in piece:
        return SeriesPart(what, _series_values(piece["series"], base, what))
    name = piece["name"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what}'s \"name\" must be a non-empty string")
    return SeriesPart(name, _series_values(piece["series"], base, f"{what} ({name!r})"))


def _prompt_parts(prompt: Any, base: Path) -> tuple[str | SeriesPart, ...]:
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(
            "\"prompt\" must be a non-empty list of text pieces and {\"series\": ...} objects"
        )
    parts: list[str | SeriesPart] = []
    n_series = 0
    for piece in prompt:
        if isinstance(piece, str):
            parts.append(piece)
        elif isinstance(piece, dict):
            n_series += 1
            parts.append(_series_part(piece, n_series, base))
        else:
            raise ValueError(
                f"prompt piece {json.dumps(piece)[:40]} is a {type(piece).__name__}; give text "
                "or a {\"series\": ...} object"
            )
    if not n_series:
        raise ValueError(
            "the prompt has no {\"series\": ...} piece; a time-series row needs at least one"
        )
    return tuple(parts)


def _answer(obj: dict) -> str:
    if "answer" not in obj:
        raise ValueError("the row has no \"answer\"; add the answer text")
    answer = obj["answer"]
    if not isinstance(answer, str):
        raise ValueError(
            f"\"answer\" is a {type(answer).__name__}; write it as text (e.g. \"{answer}\")"
        )
    if not answer.strip():
        raise ValueError("\"answer\" is empty; give the answer text")
    return answer


def _parse_row(obj: Any, base: Path) -> TSRow:
    if not isinstance(obj, dict):
        raise ValueError(
            f"the row is a JSON {type(obj).__name__}, not an object with \"prompt\" and \"answer\""
        )
    if "prompt" not in obj:
        raise ValueError(
            "the row has no \"prompt\"; add a list of text pieces and {\"series\": ...} objects"
        )
    return TSRow(_prompt_parts(obj["prompt"], base), _answer(obj))


def _check_like_first(row: TSRow, first: TSRow, first_where: str) -> None:
    """Every row has the first row's series slots, with the same channel count in each."""
    mine, theirs = row.series, first.series
    if len(mine) != len(theirs):
        raise ValueError(
            f"the prompt has {_plural(len(mine), 'series piece')} but the first row "
            f"({first_where}) has {len(theirs)}; every row needs the same series slots"
        )
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True), start=1):
        if a.values.shape[0] != b.values.shape[0]:
            what = f"series {i}" if a.name == f"series {i}" else f"series {i} ({a.name!r})"
            raise ValueError(
                f"wrong channel count: {what} has "
                f"{_plural(a.values.shape[0], 'channel')} but the first row ({first_where}) has "
                f"{b.values.shape[0]} there; every row needs the same channels at each position"
            )


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"the line is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}); "
            "re-save it as UTF-8"
        ) from None


def _line_row(raw: bytes, base: Path) -> TSRow | None:
    """The row on one JSONL line, None for a blank line; a ValueError says what is wrong."""
    line = _decode(raw).strip()
    if not line:
        return None  # blank lines (often a trailing newline) are not rows
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"invalid JSON ({e.msg} at column {e.colno}); write one JSON object per line"
        ) from None
    return _parse_row(obj, base)


def is_series_jsonl(path: Path) -> bool:
    """A time-series JSONL row has a list prompt; chat rows have messages or a string prompt."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw).get("prompt"), list)
                except (ValueError, AttributeError):
                    return False
    raise MlxRftError(f"{path} has no rows; write one JSON object per line")


def read_ts_jsonl(path: str | Path) -> list[TSRow]:
    """Rows of a JSONL file, one {"prompt": [...], "answer": "..."} object per line.

    A prompt is a list of text pieces and {"series": ..., "name": ...} objects; a series is an
    inline list (1-D: one channel, 2-D: [channels][length]) or a .npy path relative to the JSONL
    file's folder. Any bad row stops the read with "file:line: what is wrong; how to fix it".
    """
    path = Path(path)
    if not path.is_file():
        raise MlxRftError(f"time-series data file {str(path)!r} does not exist; pass a .jsonl file")
    rows: list[TSRow] = []
    first_where = ""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                row = _line_row(raw, path.parent)
                if row is None:
                    continue
                if rows:
                    _check_like_first(row, rows[0], first_where)
            except ValueError as e:
                raise MlxRftError(f"{path}:{lineno}: {e}") from None
            first_where = first_where or f"line {lineno}"
            rows.append(row)
    if not rows:
        raise MlxRftError(f"{path} has no rows; write one JSON object per line")
    return rows


# ---------------------------------------------------------------------------------------------
# Series as text


def _number(x: float, digits: int) -> str:
    if math.isnan(x):
        return "NaN"
    # Positional (never 1e+02) and rounded to significant digits, so any scale stays short.
    text = np.format_float_positional(
        x + 0.0, precision=digits, unique=True, fractional=False, trim="-"
    )
    return "0" if text in ("-0", "0") else text


def series_text(values: np.ndarray, decimals: int = 2) -> str:
    """The values as compact text: `decimals` significant digits each, channels joined by " | ".

    E.g. [[0.1234, 0.98, -1.2833]] -> "0.12 0.98 -1.3"; a 1-D array is one channel.
    """
    if decimals < 1:
        raise MlxRftError(f"series_text needs decimals >= 1 (significant digits), not {decimals}")
    array = np.atleast_2d(np.asarray(values, dtype=np.float64))
    return " | ".join(" ".join(_number(float(x), decimals) for x in channel) for channel in array)
