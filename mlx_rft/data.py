"""Prompt datasets: read rows from JSONL / JSON / CSV / Parquet, render them with the chat template,
and sample them in seeded, resumable, rank-sharded batches.

A row is an object with either a `prompt` string or a chat `messages` list
(`[{"role": ..., "content": ...}, ...]`), plus any extra columns (e.g. `answer`), which travel
with the rendered prompt in `PromptExample.columns` so reward functions can receive them by name.

JSONL and CSV are read with the standard library (fast, no extra dependency); Parquet needs pyarrow.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import MlxRftError
from .types import PromptExample

log = logging.getLogger(__name__)

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
ON_BAD_ROW = ("error", "skip")
ON_LONG_PROMPT = ("error", "skip", "truncate")
ROLES = ("system", "user", "assistant", "tool")


class BadRow(ValueError):
    """A row that cannot be used; the message says why (the caller adds where)."""


# ---------------------------------------------------------------------------------------------
# Reading raw rows


@dataclass
class RawRow:
    """One record as read from a file, before validation."""

    where: str  # "data.jsonl:12" (1-based line) or "data.json[3]" (0-based index)
    value: Any  # the parsed object (a dict when well formed), or a BadRow when it did not parse


def _not_utf8(e: UnicodeDecodeError) -> BadRow:
    return BadRow(f"is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})")


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as f:  # decoded line by line, so one bad line is one bad row
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(where, _not_utf8(e))
                continue
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                yield RawRow(where, json.loads(line))
            except json.JSONDecodeError as e:
                yield RawRow(where, BadRow(f"invalid JSON ({e.msg} at column {e.colno})"))


def _read_text(path: Path) -> str:
    """A whole-file format's text; a file that is not UTF-8 is unusable as a whole."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise MlxRftError(
            f"{path}:{line}: the file is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}); "
            "re-save it as UTF-8"
        ) from None


def _json_rows(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        # The whole file is unusable, so this is an error even with on_bad_row="skip".
        raise MlxRftError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the "
            "file, or write one JSON object per line to a .jsonl file"
        ) from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise MlxRftError(
            f"{path} must hold a JSON list of row objects, or an object with a \"data\" list; "
            f"it holds a {type(data).__name__}"
        )
    for i, value in enumerate(data):
        yield RawRow(f"{path}[{i}]", value)


def _csv_rows(path: Path, delimiter: str) -> Iterator[RawRow]:
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        if len(set(header)) != len(header) or any(not h.strip() for h in header):
            raise MlxRftError(
                f"{path}:1: the header row has empty or duplicate column names {header}; "
                "give every column a unique name"
            )
        start = reader.line_num + 1  # first physical line of the next record (fields may span lines)
        for values in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not values:
                continue
            if len(values) != len(header):
                yield RawRow(
                    where,
                    BadRow(f"has {len(values)} fields but the header has {len(header)}"),
                )
                continue
            row: dict[str, Any] = dict(zip(header, values, strict=True))
            # CSV cannot leave a cell out, so an empty prompt/messages cell means "absent" (a file
            # may mix plain-prompt and chat rows); a chat in a CSV cell is JSON text.
            for key in ("prompt", "messages"):
                if row.get(key) == "":
                    row[key] = None
            if isinstance(row.get("messages"), str):
                try:
                    row["messages"] = json.loads(row["messages"])
                except json.JSONDecodeError as e:
                    yield RawRow(where, BadRow(f"the messages cell is not valid JSON ({e.msg})"))
                    continue
            yield RawRow(where, row)


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MlxRftError(
            f"reading {path} needs pyarrow; install it with `pip install pyarrow`, or convert the "
            "data to JSONL"
        ) from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise MlxRftError(f"{path} is not a readable Parquet file ({e}); re-write it") from e
    for i, value in enumerate(table.to_pylist()):
        yield RawRow(f"{path}[{i}]", value)


def read_raw_rows(path: str | Path) -> Iterator[RawRow]:
    """Records of a JSONL / JSON / CSV / TSV / Parquet file (chosen by suffix), unvalidated."""
    path = Path(path)
    if path.is_dir():
        raise MlxRftError(f"data file {str(path)!r} is a directory; pass a .jsonl/.json/.csv/.parquet file")
    if not path.is_file():
        raise MlxRftError(f"data file {str(path)!r} does not exist; pass a .jsonl/.json/.csv/.parquet file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MlxRftError(
            f"cannot tell the format of {path} from its suffix {path.suffix!r}; use one of "
            f"{', '.join(sorted(FORMATS))}"
        )
    if fmt == "jsonl":
        return _jsonl_rows(path)
    if fmt == "json":
        return _json_rows(path)
    if fmt in ("csv", "tsv"):
        return _csv_rows(path, "," if fmt == "csv" else "\t")
    return _parquet_rows(path)


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
) -> tuple[str, list[int]]:
    """(text, token ids) of a prompt ready for generation.

    With a chat template (the default when the tokenizer has one) the messages are rendered with
    the generation prompt appended; `system_prompt` is prepended unless the messages already start
    with a system message. The rendered text already holds any BOS the template writes, so it is
    encoded without adding special tokens (adding them again would give a double BOS).
    Without a template a plain prompt string is encoded as-is, with the tokenizer's own specials.
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
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
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
            r if isinstance(r, RawRow) else RawRow(f"{source}[{i}]", r) for i, r in enumerate(rows)
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
) -> PromptDataset:
    """Read a JSONL / JSON / CSV / TSV / Parquet file of prompt rows and render every prompt.

    on_bad_row: "error" raises MlxRftError naming the file and row (1-based line for JSONL/CSV,
    0-based index for JSON/Parquet); "skip" drops such rows and counts them (`skipped_bad`).
    on_long_prompt (prompts over max_prompt_length tokens): "error", "skip" (counted), or
    "truncate" (keeps the last max_prompt_length tokens, so the generation prompt survives).
    """
    return _build(
        read_raw_rows(path), tokenizer, source=str(path), system_prompt=system_prompt,
        max_prompt_length=max_prompt_length, on_long_prompt=on_long_prompt,
        on_bad_row=on_bad_row, use_chat_template=use_chat_template,
    )


# ---------------------------------------------------------------------------------------------
# Sampling and splitting


class PromptSampler:
    """Endless seeded batches of prompt indices, resumable exactly, sharded over ranks.

    Each epoch is a fresh permutation of range(n) drawn from numpy's Generator seeded with
    (seed, epoch), so any epoch can be rebuilt from the state alone. A step takes the next
    `batch_size` positions of the permutation (the global batch); a batch that runs past the end of
    an epoch continues in the next one, so every prompt is used exactly once per epoch. Rank r of
    world_size gets the r-th contiguous slice of the global batch: shards of one step are disjoint
    and together they are the global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise MlxRftError("cannot sample batches from an empty dataset; give it at least one row")
        if batch_size < 1:
            raise MlxRftError(f"batch_size is {batch_size}; it must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise MlxRftError(f"rank {rank} is outside world_size {world_size}")
        if batch_size % world_size:
            raise MlxRftError(
                f"the global batch size {batch_size} does not split evenly over {world_size} ranks; "
                f"use a multiple of {world_size}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0  # epoch of the next index to hand out
        self.position = 0  # its position within that epoch's permutation
        self.steps = 0  # batches handed out so far
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch `epoch` (a permutation of range(n))."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_global(self) -> list[int]:
        """The next global batch (all ranks' indices, in rank order), advancing the state."""
        out: list[int] = []
        while len(out) < self.batch_size:
            perm = self.permutation(self.epoch)
            take = min(self.batch_size - len(out), self.n - self.position)
            out.extend(int(i) for i in perm[self.position : self.position + take])
            self.position += take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        self.steps += 1
        return out

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[int]:
        """This rank's indices for the next step."""
        per_rank = self.batch_size // self.world_size
        batch = self.next_global()
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    @property
    def steps_per_epoch(self) -> float:
        return self.n / self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue with the exact next batch (JSON-serialisable)."""
        return {
            "n": self.n,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "position": self.position,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()` output. The dataset size and seed must match; the batch
        size may differ (the position counts prompts, not batches)."""
        if int(state["n"]) != self.n or int(state["seed"]) != self.seed:
            raise MlxRftError(
                f"the sampler state was saved for {state['n']} prompts with seed {state['seed']}, "
                f"but this run has {self.n} prompts with seed {self.seed}; resume with the same "
                "data and seed, or start a fresh run"
            )
        position = int(state["position"])
        if not 0 <= position < self.n:
            raise MlxRftError(
                f"the sampler state has position {position} outside 0..{self.n - 1}; it is corrupt, "
                "so resume from another checkpoint"
            )
        self.epoch, self.position = int(state["epoch"]), position
        self.steps = int(state.get("steps", 0))


T = TypeVar("T")


def _split_key(item: Any) -> str:
    if isinstance(item, PromptExample):
        return item.prompt
    if isinstance(item, dict):
        content = item.get("messages", item.get("prompt"))
        if content is not None:
            return json.dumps(content, sort_keys=True, default=str)
    return json.dumps(item, sort_keys=True, default=str)


def train_eval_split(
    dataset: PromptDataset | Sequence[T],
    *,
    eval_size: int | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """(train, eval) with no prompt in both: rows with identical prompts go to the same side.

    Give eval_size (rows) or eval_fraction (of all rows). Rows keep their original order on each
    side. A PromptDataset gives PromptDatasets, any other sequence gives lists.
    """
    n = len(dataset)
    if (eval_size is None) == (eval_fraction is None):
        raise MlxRftError("give exactly one of eval_size or eval_fraction for the held-out split")
    if eval_fraction is not None:
        if not 0.0 < eval_fraction < 1.0:
            raise MlxRftError(f"eval_fraction is {eval_fraction}; it must be between 0 and 1")
        eval_size = max(1, round(n * eval_fraction))
    if not 0 < eval_size < n:
        raise MlxRftError(
            f"eval_size {eval_size} must be between 1 and {n - 1} for a dataset of {n} rows, so "
            "both splits have rows"
        )
    groups: dict[str, list[int]] = {}
    for i in range(n):
        groups.setdefault(_split_key(dataset[i]), []).append(i)
    members = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(members))
    eval_idx: list[int] = []
    for g in order:
        if len(eval_idx) + len(members[g]) <= eval_size:
            eval_idx.extend(members[g])
        if len(eval_idx) == eval_size:
            break
    if len(members) < 2:
        raise MlxRftError(
            f"all {n} rows have the same prompt, so none can be held out for evaluation without "
            "also being trained on; give different prompts, or pass held-out rows yourself "
            "(eval_dataset= in Python, --eval-file on the command line)"
        )
    if not eval_idx:
        smallest = min(len(m) for m in members)
        raise MlxRftError(
            f"every prompt appears more than eval_size={eval_size} times (the rarest {smallest} "
            f"times), and a prompt's copies stay on one side; set eval_size to at least "
            f"{smallest} (below {n}), or pass held-out rows (eval_dataset= / --eval-file)"
        )
    in_eval = set(eval_idx)
    train_idx = [i for i in range(n) if i not in in_eval]
    eval_idx.sort()
    if isinstance(dataset, PromptDataset):
        return dataset.subset(train_idx), dataset.subset(eval_idx)
    return [dataset[i] for i in train_idx], [dataset[i] for i in eval_idx]
