"""SFT rows -> encoded examples: a built-in UCR task, time-series JSONL, or chat JSONL.

Every source ends as `Encoded` (prompt pieces + answer ids, timeseries/prompts.py), so one
trainer serves text and series rows. A time-series row's target is `<answer>label</answer>`
(what the RL rewards parse); a chat row's target is its last assistant turn.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.prompts import render_prompt, row_messages
from ..data.readers import BadRow, read_raw_rows
from ..errors import MlxRftError
from ..timeseries.prompts import Encoded, encode_row
from ..timeseries.rows import TSRow, is_series_jsonl, read_ts_jsonl, ucr_rows
from .config import SFTConfig


@dataclass
class SFTData:
    name: str
    train: list[Encoded]
    test: list[Encoded]
    has_series: bool
    classes: tuple[str, ...] = ()  # the answers to rank, when the task is classification
    baselines: dict[str, float] = field(default_factory=dict)  # accuracy of simple classifiers
    test_rows: list[TSRow] = field(default_factory=list)  # for the shuffle control


def _chat_example(tokenizer, value, where: str) -> Encoded:
    if isinstance(value, BadRow):
        raise MlxRftError(f"{where}: {value}; fix the row")
    try:
        if isinstance(value, dict) and "completion" in value and "prompt" in value:
            content, target = row_messages({"prompt": value["prompt"]}), value["completion"]
        else:
            msgs = row_messages(value)
            if isinstance(msgs, str) or msgs[-1]["role"] != "assistant":
                raise BadRow("must end with an assistant message (the target), or have "
                             "'prompt' and 'completion'")
            content, target = msgs[:-1], msgs[-1]["content"]
    except BadRow as e:
        raise MlxRftError(f"{where}: {e}") from None
    if not isinstance(target, str) or not target.strip():
        raise MlxRftError(f"{where}: the target (assistant turn or completion) is empty; fill it in")
    _, ids = render_prompt(tokenizer, content)
    answer = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    return Encoded((np.asarray(ids, np.int32),), np.asarray(answer, np.int32), target)


def _chat_file(tokenizer, path: Path) -> list[Encoded]:
    return [_chat_example(tokenizer, r.value, r.where) for r in read_raw_rows(path)]


def _majority(train: list[str], test: list[str]) -> float:
    common = Counter(train).most_common(1)[0][0]
    return float(np.mean([a == common for a in test]))


def load_sft_data(cfg: SFTConfig, tokenizer) -> SFTData:
    as_text = cfg.prompt_format == "text"
    encode = lambda rows: [encode_row(tokenizer, r, as_text) for r in rows]  # noqa: E731
    if cfg.task_name:
        from ..timeseries.baselines import majority_accuracy, one_nn_accuracy
        from ..timeseries.ucr import load_ucr

        train, test = load_ucr(cfg.task_name)
        test_rows = ucr_rows(test)
        baselines = {"1nn_euclidean": one_nn_accuracy(train, test),
                     "majority": majority_accuracy(train, test)}
        if cfg.eval_file:
            test_rows = read_ts_jsonl(cfg.eval_file)
            baselines = {}
        return SFTData(cfg.task_name, encode(ucr_rows(train)), encode(test_rows), True,
                       tuple(train.classes), baselines, test_rows)
    path = Path(cfg.train_file)
    if not path.is_file():
        raise MlxRftError(f"--train-file {path} does not exist; pass a JSONL file of rows")
    if is_series_jsonl(path):
        rows = read_ts_jsonl(path)
        test_rows = read_ts_jsonl(cfg.eval_file) if cfg.eval_file else []
        answers = sorted({r.answer for r in rows})
        # Few distinct answers make a classification task: rank them, and compare with majority.
        classes = tuple(answers) if len(answers) <= 20 else ()
        baselines = {"majority": _majority([r.answer for r in rows], [r.answer for r in test_rows])} \
            if test_rows and classes else {}
        return SFTData(path.stem, encode(rows), encode(test_rows), True, classes, baselines, test_rows)
    train = _chat_file(tokenizer, path)
    test = _chat_file(tokenizer, Path(cfg.eval_file)) if cfg.eval_file else []
    return SFTData(path.stem, train, test, False)
