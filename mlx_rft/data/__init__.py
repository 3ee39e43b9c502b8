"""Data: files -> rows -> rendered prompts -> the prompts each step sees; built-in tasks.

    readers.py   JSONL / JSON / CSV / TSV / Parquet records, unvalidated (`read_raw_rows`)
    hf.py        Hugging Face datasets: in-memory Dataset / DatasetDict, save_to_disk folders
    prompts.py   row checks, the chat template, length limits (`PromptDataset`, `load_prompt_dataset`)
    split.py     the seeded, resumable, rank-sharded sampler and the held-out split
    tasks.py     built-in tasks (reasoning-gym, answer-column files) with their rewards
"""

from .prompts import (
    ON_BAD_ROW, ON_LONG_PROMPT, PromptDataset, load_prompt_dataset, render_prompt, row_messages,
)
from .readers import FORMATS, BadRow, RawRow, read_raw_rows
from .split import PromptSampler, train_eval_split

__all__ = [
    "FORMATS", "ON_BAD_ROW", "ON_LONG_PROMPT", "BadRow", "PromptDataset", "PromptSampler", "RawRow",
    "load_prompt_dataset", "read_raw_rows", "render_prompt", "row_messages", "train_eval_split",
]
