"""Time-series rows as prompts for `mlx-rft train` (GRPO): the same rows `mlx-rft sft` reads.

Each prompt keeps its pieces (text ids and z-normalised channels) for the encoder, and its
`prompt_ids` hold placeholders where the soft tokens go, so the rollout engine, the batching and
the log-prob pass handle it like any prompt of that length. The reward is the accuracy of the
`<answer>` tag against the row's answer, as in `mlx-rft sft`'s generation score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import PromptDataset
from ..errors import MlxRftError
from ..types import PromptExample
from .encoder import EncoderConfig
from .model import read_config
from .prompts import MARKER, encode_row, user_turn
from .rows import TSRow, is_series_jsonl, read_ts_jsonl, ucr_rows
from .model import placeholder_ids


def is_series_source(task: str | None, train_file: str | None) -> bool:
    """A ucr:<Name> task, or a JSONL file whose first row has a list prompt (text + series)."""
    if train_file:
        path = Path(train_file)
        return path.is_file() and path.suffix == ".jsonl" and is_series_jsonl(path)
    return bool(task) and task.startswith("ucr:")


def encoder_patch_size(encoder: str | None) -> int:
    if encoder:
        meta = read_config(Path(encoder))
        if not meta.get("encoder"):
            raise MlxRftError(
                f"{encoder} holds no series encoder (it was trained on text); pass the model "
                "folder of a time-series `mlx-rft sft` run"
            )
        return int(meta["encoder"]["patch_size"])
    return EncoderConfig(hidden_size=1).patch_size


def held_out_subset(n: int, size: int) -> list[int]:
    """Which held-out rows to score: all, or `size` of them drawn with a fixed seed in file
    order (test files are often sorted by class, so the first rows would be one class)."""
    if not size or size >= n:
        return list(range(n))
    return sorted(np.random.default_rng(0).choice(n, size, replace=False).tolist())


def series_prompts(rows: list[TSRow], tokenizer, patch_size: int, source: str) -> PromptDataset:
    examples = []
    for row in rows:
        enc = encode_row(tokenizer, row)
        text, _ = user_turn(row)
        for i in range(text.count(MARKER[0]) // 2):
            text = text.replace(MARKER.format(i), "<series>")
        examples.append(PromptExample(
            prompt=text, prompt_ids=placeholder_ids(enc.pieces, patch_size),
            columns={"answer": row.answer}, pieces=enc.pieces,
        ))
    return PromptDataset(examples, source=source)


def series_datasets(task: str | None, train_file: str | None, eval_file: str | None, tokenizer,
                    patch_size: int) -> tuple[PromptDataset, PromptDataset | None]:
    """(train, held-out) prompts; held-out is None when it must be split off the train rows."""
    if train_file:
        train = read_ts_jsonl(train_file)
        test = read_ts_jsonl(eval_file) if eval_file else None
        src = str(train_file)
    else:
        from .ucr import load_ucr

        tr, te = load_ucr(task)
        train, test, src = ucr_rows(tr), ucr_rows(te), task
        if eval_file:
            test = read_ts_jsonl(eval_file)
    evals = series_prompts(test, tokenizer, patch_size, f"{src} (held out)") if test else None
    return series_prompts(train, tokenizer, patch_size, src), evals


def series_policy(llm, encoder: str | None):
    """The trained module of a GRPO run on series rows: the (adapted) LLM plus an encoder and
    projector, loaded from an `mlx-rft sft` model folder when `encoder` names one."""
    from .model import TimeSeriesLM

    if encoder:
        meta = read_config(Path(encoder))
        cfg = EncoderConfig.from_dict(meta["encoder"])
        if cfg.hidden_size != llm.args.hidden_size:
            raise MlxRftError(
                f"{encoder} was trained for a model of width {cfg.hidden_size}, this one has "
                f"{llm.args.hidden_size}; pass the --model that run used"
            )
        policy = TimeSeriesLM(llm, cfg)
        policy.load_series_weights(Path(encoder))
        return policy
    return TimeSeriesLM(llm, EncoderConfig(hidden_size=llm.args.hidden_size))
