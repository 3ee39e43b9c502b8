"""Reading rows from JSONL / JSON / CSV / TSV / Parquet files and saved datasets, unvalidated.

Each record comes with where it was found (`data.jsonl:12`); a record that cannot be parsed
is a `BadRow`, so the caller decides (`on_bad_row`) whether it stops the run or is skipped.
JSONL and CSV are read with the standard library (fast, no extra dependency); Parquet needs pyarrow;
a folder is a Hugging Face `save_to_disk` dataset (hf.py, which imports `datasets` only then).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MlxRftError
from .hf import saved_rows

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


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


def read_raw_rows(path: str | Path, splits: Sequence[str] = ("train",)) -> Iterator[RawRow]:
    """Records of a JSONL / JSON / CSV / TSV / Parquet file (chosen by suffix), unvalidated.

    A folder is read as a `save_to_disk` dataset; of a saved DatasetDict, the first of `splits`.
    """
    path = Path(path)
    if path.is_dir():
        return (RawRow(where, row) for where, row in saved_rows(path, splits))
    if not path.is_file():
        raise MlxRftError(
            f"data file {str(path)!r} does not exist; pass a .jsonl/.json/.csv/.parquet file or a "
            "save_to_disk folder"
        )
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
