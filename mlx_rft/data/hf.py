"""Hugging Face `datasets` input: in-memory `Dataset` / `DatasetDict`, and `save_to_disk` folders.

Rows leave here as plain dicts (with their location, for saved folders), so the row checks in prompts.py
judge them exactly as they judge JSONL rows. `datasets` is imported only when a saved folder is
read: an in-memory dataset means the user already imported it, so `sys.modules` is enough to
recognise one, and startup without such input stays fast. Nothing here downloads from the hub.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import MlxRftError

TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("test", "validation")

# The files `save_to_disk` writes (the same names `datasets.load_from_disk` looks for).
DICT_MARKER = "dataset_dict.json"
DATASET_MARKERS = ("dataset_info.json", "state.json")


def _hf():
    return sys.modules.get("datasets")


def is_dataset_dict(obj: Any) -> bool:
    hf = _hf()
    return hf is not None and isinstance(obj, (hf.DatasetDict, hf.IterableDatasetDict))


def plain_rows(rows: Iterable[Any]) -> Iterable[Any]:
    """Rows as Python objects: a dataset formatted for numpy/torch would yield arrays instead."""
    hf = _hf()
    if hf is not None and isinstance(rows, (hf.Dataset, hf.IterableDataset)):
        return rows.with_format(None)  # a view: no data is copied
    return rows


def _spell(splits: Sequence[str]) -> str:
    return " or ".join(repr(s) for s in splits)


def first_split(available: Iterable[str], wanted: Sequence[str]) -> str | None:
    available = list(available)
    return next((s for s in wanted if s in available), None)


def pick_split(available: Iterable[str], wanted: Sequence[str], what: str, fix: str) -> str:
    """The first of `wanted` that `what` (a DatasetDict) has; else a one-line error naming its splits."""
    available = list(available)
    name = first_split(available, wanted)
    if name is None:
        raise MlxRftError(
            f"{what} is a DatasetDict with splits {available} but no {_spell(wanted)} split; {fix}"
        )
    return name


def take_splits(train: Any, eval_: Any) -> tuple[Any, str, Any, str]:
    """(train rows, their name, eval rows, their name) with in-memory DatasetDicts taken apart.

    A DatasetDict as train_dataset gives its "train" split, and its "test" (else "validation")
    split as eval unless eval_dataset is given; a DatasetDict as eval_dataset gives test/validation.
    """
    train_src = eval_src = "<rows>"
    if is_dataset_dict(train):
        fix = "name the training split 'train' (DatasetDict({'train': ...})), or pass that Dataset itself"
        name = pick_split(train, TRAIN_SPLITS, "train_dataset", fix)
        held_out = first_split(train, EVAL_SPLITS)
        if eval_ is None and held_out is not None:
            eval_, eval_src = train[held_out], f"train_dataset[{held_out!r}]"
        train, train_src = train[name], f"train_dataset[{name!r}]"
    if is_dataset_dict(eval_):
        fix = "name the held-out split 'test', or pass that Dataset itself"
        name = pick_split(eval_, EVAL_SPLITS, "eval_dataset", fix)
        eval_, eval_src = eval_[name], f"eval_dataset[{name!r}]"
    return train, train_src, eval_, eval_src


# ---------------------------------------------------------------------------------------------
# save_to_disk folders


def saved_splits(path: str | Path) -> list[str]:
    """The splits of a saved DatasetDict folder ([] for anything else), without importing datasets."""
    marker = Path(path) / DICT_MARKER
    if not marker.is_file():
        return []
    try:
        return [str(s) for s in json.loads(marker.read_text())["splits"]]
    except (ValueError, KeyError, TypeError) as e:
        raise MlxRftError(f"{marker} is damaged ({e}); re-save the dataset with save_to_disk") from e


def saved_rows(path: Path, splits: Sequence[str] = TRAIN_SPLITS) -> Iterator[tuple[str, Any]]:
    """Rows of a `save_to_disk` folder; for a DatasetDict, of the first of `splits` it holds."""
    is_dict = (path / DICT_MARKER).is_file()
    if not is_dict and not all((path / m).is_file() for m in DATASET_MARKERS):
        raise MlxRftError(
            f"data file {str(path)!r} is a directory but not a saved Hugging Face dataset (it has no "
            f"{DICT_MARKER}, or no {' and '.join(DATASET_MARKERS)}); pass a .jsonl/.json/.csv/.parquet "
            "file or a folder written by Dataset.save_to_disk"
        )
    split = None
    if is_dict:
        available = saved_splits(path)
        fix = (
            f"point at one split's folder instead (e.g. {path / available[0]})" if available
            else "re-save it with save_to_disk"
        )
        split = pick_split(available, splits, str(path), fix)
    try:
        import datasets
    except ImportError as e:
        raise MlxRftError(f"reading {path} needs the datasets package; `pip install datasets`") from e
    try:
        data = datasets.load_from_disk(str(path))  # memory-mapped: rows are read as they are used
    except Exception as e:  # datasets/pyarrow raise several types for damaged folders
        raise MlxRftError(
            f"{path} is not a readable saved dataset ({type(e).__name__}: {' '.join(str(e).split())}); "
            "re-save it with save_to_disk"
        ) from e
    if split is not None:
        data, path = data[split], path / split
    return ((f"{path}[{i}]", row) for i, row in enumerate(plain_rows(data)))
