"""Rows -> rendered prompts: validation, the chat template, length limits, `PromptDataset`.

A row is an object with either a `prompt` string or a chat `messages` list
(`[{"role": ..., "content": ...}, ...]`), plus any extra columns (e.g. `answer`), which travel
with the rendered prompt in `PromptExample.columns` so reward functions can receive them by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MlxRftError
from ..types import PromptExample
from .hf import TRAIN_SPLITS, plain_rows
from .readers import BadRow, RawRow, read_raw_rows

log = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")
ON_LONG_PROMPT = ("error", "skip", "truncate")
ROLES = ("system", "user", "assistant", "tool")



# ---------------------------------------------------------------------------------------------
# Validating and rendering rows


def row_messages(row: Any) -> list[dict[str, str]] | str:
    """The chat messages of a row, or its plain prompt string; raises BadRow if it has neither."""
    if not isinstance(row, dict):
        raise BadRow(f"is a {type(row).__name__}, not an object with a prompt or messages")
    has_prompt = row.get("prompt") is not None
    has_messages = row.get("messages") is not None
    if has_prompt and has_messages:
        raise BadRow("has both 'prompt' and 'messages'; keep one of them (rename the other column)")
    if has_messages:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadRow("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise BadRow(f"messages[{j}] must be an object with a string 'content'")
            if m.get("role") not in ROLES:
                raise BadRow(f"messages[{j}] has role {m.get('role')!r}; use one of {ROLES}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if has_prompt:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRow("'prompt' must be a non-empty string")
        return prompt
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise BadRow(f"has no 'prompt' or 'messages' column (columns: {keys})")


def _has_chat_template(tokenizer) -> bool:
    if hasattr(tokenizer, "has_chat_template"):  # mlx-lm TokenizerWrapper
        return bool(tokenizer.has_chat_template)
    return getattr(tokenizer, "chat_template", None) is not None


def render_prompt(
    tokenizer,
    content: list[dict[str, str]] | str,
    *,
    system_prompt: str | None = None,
    use_chat_template: bool | None = None,
    tools: list[dict] | None = None,
) -> tuple[str, list[int]]:
    """(text, token ids) of a prompt ready for generation.

    With a chat template (the default when the tokenizer has one) the messages are rendered with
    the generation prompt appended; `system_prompt` is prepended unless the messages already start
    with a system message. The rendered text already holds any BOS the template writes, so it is
    encoded without adding special tokens (adding them again would give a double BOS).
    Without a template a plain prompt string is encoded as-is, with the tokenizer's own specials.
    `tools` (function schemas) go to the template's `tools=` argument (templates that do not use
    it ignore them).
    """
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if use_chat_template:
        if not _has_chat_template(tokenizer):
            raise MlxRftError(
                "the tokenizer has no chat template; add one to tokenizer_config.json, or use plain "
                "'prompt' rows without a chat template"
            )
        messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        kw = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return text, list(ids)
    if not isinstance(content, str):
        raise MlxRftError(
            "chat 'messages' rows need a chat template, but it is turned off (or the tokenizer has "
            "none); turn it on, or use plain 'prompt' rows"
        )
    text = f"{system_prompt}\n\n{content}" if system_prompt else content
    return text, list(tokenizer.encode(text))


# ---------------------------------------------------------------------------------------------
# The dataset


@dataclass
class PromptDataset(Sequence[PromptExample]):
    """Rendered prompts in file order, plus what loading dropped or changed."""

    examples: list[PromptExample]
    source: str = "<rows>"  # file path, or a name for in-memory rows
    skipped_bad: int = 0  # malformed rows skipped (on_bad_row="skip")
    skipped_long: int = 0  # over-long prompts skipped (on_long_prompt="skip")
    truncated: int = 0  # over-long prompts cut to max_prompt_length (on_long_prompt="truncate")
    skipped_where: list[str] = field(default_factory=list)  # locations of skipped rows (first 20)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # int -> PromptExample; slice -> list
        return self.examples[i]

    def __iter__(self) -> Iterator[PromptExample]:
        return iter(self.examples)

    def subset(self, indices: Iterable[int]) -> PromptDataset:
        """A dataset of the given rows (same source; the skip counts stay with the parent)."""
        return PromptDataset([self.examples[i] for i in indices], source=self.source)

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Any],
        tokenizer,
        *,
        source: str = "<rows>",
        system_prompt: str | None = None,
        max_prompt_length: int | None = None,
        on_long_prompt: str = "error",
        on_bad_row: str = "error",
        use_chat_template: bool | None = None,
    ) -> PromptDataset:
        """Render in-memory rows (dicts, e.g. `Task.rows` or a `datasets.Dataset`)."""
        raw = (
            r if isinstance(r, RawRow) else RawRow(f"{source}[{i}]", r)
            for i, r in enumerate(plain_rows(rows))
        )
        return _build(
            raw, tokenizer, source=source, system_prompt=system_prompt,
            max_prompt_length=max_prompt_length, on_long_prompt=on_long_prompt,
            on_bad_row=on_bad_row, use_chat_template=use_chat_template,
        )


# No tokenizer makes tokens longer than this many characters on average over a whole prompt.
CHARS_PER_TOKEN_MAX = 64


def _chars(content: list[dict[str, str]] | str) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(str(m.get("content", ""))) for m in content)


def _build(
    raw_rows: Iterable[RawRow],
    tokenizer,
    *,
    source: str,
    system_prompt: str | None,
    max_prompt_length: int | None,
    on_long_prompt: str,
    on_bad_row: str,
    use_chat_template: bool | None,
) -> PromptDataset:
    if on_bad_row not in ON_BAD_ROW:
        raise MlxRftError(f"on_bad_row is {on_bad_row!r}; use one of {ON_BAD_ROW}")
    if on_long_prompt not in ON_LONG_PROMPT:
        raise MlxRftError(f"on_long_prompt is {on_long_prompt!r}; use one of {ON_LONG_PROMPT}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise MlxRftError(f"max_prompt_length is {max_prompt_length}; it must be a positive number of tokens")
    ds = PromptDataset([], source=source)

    def skip(where: str) -> None:
        if len(ds.skipped_where) < 20:
            ds.skipped_where.append(where)

    for raw in raw_rows:
        try:
            if isinstance(raw.value, BadRow):
                raise raw.value
            content = row_messages(raw.value)
        except BadRow as e:
            if on_bad_row == "error":
                raise MlxRftError(
                    f"{raw.where}: row {e}; fix or remove the row, or skip malformed rows with "
                    "on_bad_row='skip'"
                ) from None
            ds.skipped_bad += 1
            skip(raw.where)
            continue
        if (
            max_prompt_length is not None and on_long_prompt != "truncate"
            and _chars(content) > CHARS_PER_TOKEN_MAX * max_prompt_length
        ):
            # Far too long to fit whatever the tokenizer does: say so without tokenizing it all.
            if on_long_prompt == "error":
                raise MlxRftError(
                    f"{raw.where}: the prompt has {_chars(content):,} characters, far over "
                    f"max_prompt_length={max_prompt_length} tokens; shorten it, or set "
                    "on_long_prompt to 'skip' or 'truncate'"
                )
            ds.skipped_long += 1
            skip(raw.where)
            continue
        text, ids = render_prompt(
            tokenizer, content, system_prompt=system_prompt, use_chat_template=use_chat_template
        )
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if on_long_prompt == "error":
                raise MlxRftError(
                    f"{raw.where}: the prompt is {len(ids)} tokens, over max_prompt_length="
                    f"{max_prompt_length}; raise max_prompt_length, shorten the prompt, or set "
                    "on_long_prompt to 'skip' or 'truncate'"
                )
            if on_long_prompt == "skip":
                ds.skipped_long += 1
                skip(raw.where)
                continue
            # Keep the end: the generation prompt (assistant header) must stay last.
            ids = ids[-max_prompt_length:]
            text = tokenizer.decode(ids)
            ds.truncated += 1
        ds.examples.append(PromptExample(prompt=text, prompt_ids=ids, columns=dict(raw.value)))
    if ds.skipped_bad or ds.skipped_long or ds.truncated:
        log.warning(
            "%s: %d rows loaded; skipped %d malformed and %d over-long rows, truncated %d%s",
            source, len(ds), ds.skipped_bad, ds.skipped_long, ds.truncated,
            f" (skipped e.g. {', '.join(ds.skipped_where[:3])})" if ds.skipped_where else "",
        )
    if not ds.examples:
        raise MlxRftError(
            f"{source} has no usable rows; each row needs a 'prompt' string or a 'messages' list"
        )
    return ds


def load_prompt_dataset(
    path: str | Path,
    tokenizer,
    *,
    system_prompt: str | None = None,
    max_prompt_length: int | None = None,
    on_long_prompt: str = "error",
    on_bad_row: str = "error",
    use_chat_template: bool | None = None,
    splits: Sequence[str] = TRAIN_SPLITS,
) -> PromptDataset:
    """Read a JSONL / JSON / CSV / TSV / Parquet file (or a `save_to_disk` folder) of prompt rows
    and render every prompt.

    on_bad_row: "error" raises MlxRftError naming the file and row (1-based line for JSONL/CSV,
    0-based index for JSON/Parquet); "skip" drops such rows and counts them (`skipped_bad`).
    on_long_prompt (prompts over max_prompt_length tokens): "error", "skip" (counted), or
    "truncate" (keeps the last max_prompt_length tokens, so the generation prompt survives).
    splits: of a saved DatasetDict folder, read the first of these splits it holds.
    """
    return _build(
        read_raw_rows(path, splits), tokenizer, source=str(path), system_prompt=system_prompt,
        max_prompt_length=max_prompt_length, on_long_prompt=on_long_prompt,
        on_bad_row=on_bad_row, use_chat_template=use_chat_template,
    )
