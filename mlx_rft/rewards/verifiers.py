"""Built-in verifiable rewards: answer accuracy, output format, length, repetition (and `code`).

Each built-in is a ready function plus the factory that makes variants of it, so a spec string can
tune it: `accuracy(extract=boxed)`, `overlong(max_length=512, cache_length=128)`. All follow the
reward API of `base.py`: `f(prompts, completions, **columns) -> list[float | None]`.

Lengths are counted in tokens when the caller passes the `completion_ids` column (N token-id
sequences), or in characters / whitespace words when a factory is asked for that unit.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from ..errors import MlxRftError
from .code import code, make_code_reward

EXTRACTORS = ("answer_tag", "boxed", "last_number", "last_line", "answer_tag_or_number",
              "answer_tag_or_line", "auto")
UNITS = ("tokens", "chars", "words")

# ---------------------------------------------------------------------------------------------
# Answer extraction

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# Plain numbers, thousands separators, decimals, simple fractions ("3/4"), signs.
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")


def extract_answer_tag(text: str) -> str | None:
    """Content of the last <answer>...</answer> (a \\boxed{} inside it is unwrapped)."""
    matches = _ANSWER_TAG_RE.findall(text)
    if not matches:
        return None
    content = matches[-1].strip()
    return extract_boxed(content) or content


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, braces balanced (nested braces allowed)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
        j += 1
    return None  # unbalanced: the completion was cut off inside the box


def extract_last_number(text: str) -> str | None:
    """The last number in the text ("1,000", "-2.5", "3/4")."""
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def extract_last_line(text: str) -> str | None:
    """The last non-empty line, stripped."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


# Each extraction tries these in order and takes the first answer found.
_EXTRACTION_ORDER = {
    "answer_tag": (extract_answer_tag,),
    "boxed": (extract_boxed,),
    "last_number": (extract_last_number,),
    "last_line": (extract_last_line,),
    "answer_tag_or_number": (extract_answer_tag, extract_last_number),
    "answer_tag_or_line": (extract_answer_tag, extract_last_line),
    "auto": (extract_answer_tag, extract_boxed, extract_last_number, extract_last_line),
}


def check_extract(extract: str) -> str:
    if extract not in _EXTRACTION_ORDER:
        raise MlxRftError(
            f"unknown answer extraction {extract!r}; choose one of {', '.join(EXTRACTORS)}"
        )
    return extract


def extract_final_answer(text: str, extract: str = "auto") -> str | None:
    """The final answer in a completion; "auto" tries the tag, then \\boxed{}, then the last number,
    then the last non-empty line. "answer_tag_or_number" / "answer_tag_or_line": the tag, else
    the last number / line."""
    for f in _EXTRACTION_ORDER[check_extract(extract)]:
        found = f(text)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# Answer comparison

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_text(s: str) -> str:
    """Casefolded, whitespace-collapsed, without $...$, \\text{}, markdown bold, trailing period."""
    s = _TEXT_WRAP_RE.sub(r"\1", str(s))
    s = s.replace("**", "").strip().strip("$").strip()
    s = " ".join(s.split()).casefold()
    return s.rstrip(".").strip().strip("\"'`").strip()


def as_number(s: str) -> Fraction | None:
    """An exact rational for a plain numeric string ("1,000", "+2.50", "3/4", "1e3", "50%" -> 50)."""
    t = str(s).strip().strip("$").strip().rstrip(".")
    t = t.replace("\\!", "")
    if "," in t:  # only as a thousands separator: "1,2" is a pair, not 12
        if not re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?%?", t):
            return None
        t = t.replace(",", "")
    # A trailing % is a unit, as in most graders: "50%" matches 50 (not 0.5).
    t = t.removesuffix("%").removesuffix("\\")
    if not t or not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?(/\d+)?", t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_equal(pred: str, gold: str) -> bool | None:
    """math-verify's verdict on two isolated answers, None when it cannot parse the gold."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # math-verify times out with signal.alarm, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parse_answer(s: str):
        # An isolated answer is one expression: wrap it as LaTeX math so that "(1, 2)" stays a
        # tuple and "2\sqrt{2}" a product (unwrapped, math-verify grabs the last number).
        if "$" in s or "\\boxed" in s:
            return parse(s, parsing_timeout=timeout)
        return parse(f"${s}$", parsing_timeout=timeout) or parse(s, parsing_timeout=timeout)

    try:
        gold_parsed = parse_answer(gold)
        if not gold_parsed:
            return None
        pred_parsed = parse_answer(pred)
        if not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # sympy can raise almost anything on odd input
        return None


def answers_equal(pred: str | None, gold: Any) -> bool:
    """Whether an extracted answer matches the reference.

    Order: normalized text; exact rational compare of plain numbers (also when the prediction is
    a number with a unit, "5 dollars"); math-verify for LaTeX / symbolic answers (fractions, roots,
    tuples, intervals, equations like "x = 4"); a list/tuple reference matches any of its items.
    """
    if pred is None or gold is None:
        return False
    if isinstance(gold, (list, tuple)):
        return any(answers_equal(pred, g) for g in gold)
    gold = str(gold)
    if normalize_text(pred) == normalize_text(gold):
        return True
    g_num = as_number(gold)
    if g_num is not None:
        p_num = as_number(pred)
        if p_num is not None:
            return p_num == g_num
        numbers = _NUMBER_RE.findall(pred)
        if len(numbers) == 1 and not re.search(r"[\\^_{}()\[\]=]", pred):
            # One number plus words ("5 dollars", "72 apples"): compare the number.
            return as_number(numbers[0]) == g_num
    if not re.search(r"[\d\\^_=]", gold) and len(gold.split()) > 0 and gold.replace(" ", "").isalpha():
        return False  # plain words: only the text comparison applies
    verdict = _math_verify_equal(pred, gold)
    return bool(verdict)


# ---------------------------------------------------------------------------------------------
# Reward factories


def _named(func: Callable, name: str) -> Callable:
    func.__name__ = func.__qualname__ = name
    return func


def make_accuracy(extract: str = "auto", *, column: str = "answer", name: str = "accuracy") -> Callable:
    """1.0 when the completion's final answer equals the row's `column` value, else 0.0.

    extract: one of EXTRACTORS, e.g. "answer_tag" or "auto" (tag, boxed, last number, last line).
    Rows whose reference is None score None (nothing to compare against).
    """
    check_extract(extract)

    def accuracy(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        if column not in columns:
            raise MlxRftError(
                f"reward {name!r} compares with the dataset column {column!r}, which the batch lacks "
                f"(columns: {', '.join(sorted(columns)) or 'none'}); add it or pick another reward"
            )
        return [
            None if gold is None else float(answers_equal(extract_final_answer(c, extract), gold))
            for c, gold in zip(completions, columns[column])
        ]

    return _named(accuracy, name)


def make_format(
    pattern: str | None = None,
    *,
    tags: Sequence[str] | None = None,
    match: str = "search",
    name: str = "format",
) -> Callable:
    """1.0 when the completion has the required structure, else 0.0.

    pattern: a regex (DOTALL), found anywhere (`match="search"`) or covering the whole stripped
        completion (`match="full"`).
    tags: alternatively, tag names that must appear in order and make up the whole completion,
        e.g. ["think", "answer"] -> "<think>...</think> <answer>...</answer>" and nothing else.
    """
    if (pattern is None) == (tags is None):
        raise MlxRftError("make_format needs exactly one of pattern= or tags=")
    if match not in ("search", "full"):
        raise MlxRftError(f"make_format match must be 'search' or 'full', got {match!r}")
    if tags is not None:
        if isinstance(tags, str) or not tags or not all(re.fullmatch(r"[A-Za-z_][\w-]*", t) for t in tags):
            raise MlxRftError(f"make_format tags must be a list of tag names, got {tags!r}")
        pattern = r"\s*".join(rf"<{t}>(?:(?!<{t}>).)*?\S(?:(?!<{t}>).)*?</{t}>" for t in tags)
        match = "full"
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise MlxRftError(f"bad format regex {pattern!r}: {e}") from None
    check = regex.fullmatch if match == "full" else regex.search

    def format_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        return [1.0 if check(c.strip() if match == "full" else c) else 0.0 for c in completions]

    return _named(format_reward, name)


def _lengths(completions: list[str], columns: dict, unit: str, name: str) -> list[int]:
    if unit == "tokens":
        ids = columns.get("completion_ids")
        if ids is None:
            raise MlxRftError(
                f"reward {name!r} counts tokens and needs the completion_ids column; pass it, or use "
                f"unit='chars' or unit='words' (e.g. {name}(unit=words))"
            )
        return [int(x) if isinstance(x, int) else len(x) for x in ids]
    if unit == "chars":
        return [len(c) for c in completions]
    if unit == "words":
        return [len(c.split()) for c in completions]
    raise MlxRftError(f"unknown length unit {unit!r}; choose one of {', '.join(UNITS)}")


def make_length_reward(
    target_min: int = 16,
    target_max: int = 128,
    *,
    falloff: float | None = None,
    unit: str = "tokens",
    name: str = "length",
) -> Callable:
    """1.0 inside the band [target_min, target_max], falling linearly to 0.0 at `falloff` outside.

    falloff defaults to the band's width (or target_max for an empty band).
    """
    if unit not in UNITS:
        raise MlxRftError(f"unknown length unit {unit!r}; choose one of {', '.join(UNITS)}")
    if not 0 <= target_min <= target_max:
        raise MlxRftError(f"length band needs 0 <= target_min <= target_max, got [{target_min}, {target_max}]")
    width = float(falloff if falloff is not None else (target_max - target_min) or target_max or 1)
    if width <= 0:
        raise MlxRftError(f"length falloff must be positive, got {width}")

    def length(prompts: list[str], completions: list[str], **columns) -> list[float]:
        out = []
        for n in _lengths(completions, columns, unit, name):
            dist = target_min - n if n < target_min else (n - target_max if n > target_max else 0)
            out.append(max(0.0, 1.0 - dist / width))
        return out

    return _named(length, name)


def make_overlong_penalty(
    max_length: int = 256, cache_length: int = 64, *, unit: str = "tokens", name: str = "overlong"
) -> Callable:
    """DAPO's soft overlong punishment: 0 up to max_length - cache_length, then linear to -1 at
    max_length, and -1 beyond (set max_length to the generation budget, max_new_tokens)."""
    if unit not in UNITS:
        raise MlxRftError(f"unknown length unit {unit!r}; choose one of {', '.join(UNITS)}")
    if not 0 < cache_length <= max_length:
        raise MlxRftError(
            f"overlong penalty needs 0 < cache_length <= max_length, got {cache_length} and {max_length}"
        )
    start = max_length - cache_length

    def overlong(prompts: list[str], completions: list[str], **columns) -> list[float]:
        out = []
        for n in _lengths(completions, columns, unit, name):
            if n <= start:
                out.append(0.0)
            elif n <= max_length:
                out.append((start - n) / cache_length)
            else:
                out.append(-1.0)
        return out

    return _named(overlong, name)


def repetition_fraction(items: Sequence[Any], n: int) -> float:
    """Fraction of the n-grams of `items` that repeat an earlier one (0 when there are none)."""
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def make_repetition_penalty(
    n: int = 3, *, unit: str = "words", max_penalty: float = 1.0, name: str = "repetition"
) -> Callable:
    """-max_penalty x the fraction of repeated n-grams (words, or tokens from completion_ids)."""
    if n < 1:
        raise MlxRftError(f"repetition n-gram size must be >= 1, got {n}")
    if unit not in ("words", "tokens"):
        raise MlxRftError(f"repetition unit must be 'words' or 'tokens', got {unit!r}")

    def repetition(prompts: list[str], completions: list[str], **columns) -> list[float]:
        if unit == "tokens":
            ids = columns.get("completion_ids")
            if ids is None:
                raise MlxRftError(
                    f"reward {name!r} counts token n-grams and needs the completion_ids column; "
                    "pass it or use unit='words'"
                )
            seqs = [list(x) for x in ids]
        else:
            seqs = [c.casefold().split() for c in completions]
        return [-max_penalty * repetition_fraction(s, n) for s in seqs]

    return _named(repetition, name)


# ---------------------------------------------------------------------------------------------
# Built-ins

accuracy = make_accuracy("auto")
format_reward = make_format(r"<answer>\s*\S.*?</answer>", name="format")
think_format = make_format(tags=["think", "answer"], name="think_format")
length = make_length_reward()
overlong = make_overlong_penalty()
repetition = make_repetition_penalty()


def _think_format_factory(tags: Sequence[str] = ("think", "answer"), name: str = "think_format") -> Callable:
    return make_format(tags=list(tags), name=name)


def _judge_factory(**kwargs) -> Callable:
    from .judge import judge_from_spec

    return judge_from_spec(**kwargs)


# name -> (ready function, factory for variants)
BUILTINS: dict[str, tuple[Callable | None, Callable | None]] = {
    "accuracy": (accuracy, make_accuracy),
    "format": (format_reward, make_format),
    "think_format": (think_format, _think_format_factory),
    "length": (length, make_length_reward),
    "overlong": (overlong, make_overlong_penalty),
    "repetition": (repetition, make_repetition_penalty),
    "code": (code, make_code_reward),
    "judge": (None, _judge_factory),  # needs a rubric and a back end: no ready-made default
}
