"""The `mlx-rft sft` config: supervised fine-tuning on answer tokens, for text and series rows.

Same rules as the GRPO config (mlx_rft/config.py): each field carries its help text, and a CLI
flag beats the YAML file (`--config`), which beats the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import FINETUNE_TYPES, SCHEDULES, _f
from ..errors import MlxRftError

DEFAULT_TASK = "ucr:ItalyPowerDemand"
PROMPT_FORMATS = ("soft", "text")


@dataclass
class SFTConfig:
    # --- model ---
    model: str | None = _f(None, "HF-format model folder; empty = the embedded SmolLM2-135M-Instruct")
    dtype: str | None = _f(None, "float32 | bfloat16 | float16; empty = float32 on CPU, bfloat16 on GPU")
    finetune_type: str | None = _f(
        None, "none (LLM frozen) | lora | dora | full; empty = none for series rows (only the "
        "encoder and projector train), lora for text rows"
    )
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    lora_layers: int = _f(-1, "number of final transformer blocks that get adapters (-1 = all)")

    # --- series encoder ---
    patch_size: int = _f(4, "series values per soft token (the encoder's Conv1d kernel and stride)")
    encoder_dim: int = _f(128, "width of the series encoder")
    encoder_layers: int = _f(2, "transformer layers in the series encoder")
    encoder_heads: int = _f(4, "attention heads in the series encoder")
    prompt_format: str = _f(
        "soft", "soft (series as soft tokens through the encoder) | text (the same numbers written "
        "into the prompt: the text-only baseline)"
    )

    # --- data ---
    task: str | None = _f(
        None, f"built-in task: ucr:<Name> (a UCR/UEA dataset shipped in the aeon package); empty "
        f"with no train_file = {DEFAULT_TASK}"
    )
    train_file: str | None = _f(
        None, "JSONL rows: time-series rows ({prompt: [text, {series, name}, ...], answer}) or chat "
        "rows ({messages: [...]}, the last assistant turn is the target)"
    )
    eval_file: str | None = _f(None, "held-out rows in the same format (empty = the task's test split)")
    eval_size: int = _f(0, "held-out rows scored at the end (0 = all of them)")
    max_new_tokens: int = _f(24, "token limit when scoring by generation")

    # --- optimisation ---
    num_steps: int = _f(150, "optimizer steps")
    batch_size: int = _f(16, "rows per step")
    max_batch_tokens: int = _f(
        2048, "positions per forward pass (rows x longest row); a larger batch runs in several "
        "micro-batches with the same gradient, which bounds memory"
    )
    learning_rate: float = _f(1e-3, "peak learning rate of the series encoder and projector")
    llm_learning_rate: float = _f(1e-4, "peak learning rate of the LLM's trainable weights (LoRA or full)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_schedule: str = _f("cosine", "constant | cosine | linear (decay after warmup)")
    warmup_steps: int = _f(10, "linear warmup steps")
    max_grad_norm: float = _f(1.0, "clip gradients to this global norm (0 = off)")
    seed: int = _f(0, "random seed for initialisation and data order")

    # --- output ---
    output_dir: str = _f("runs/sft", "run folder: checkpoints, metrics, the trained model, summary")
    save_every: int = _f(50, "checkpoint every N steps (and always at the end)")
    keep_last: int = _f(2, "keep only the newest K checkpoints")
    resume: str | None = _f(
        None, "continue a run: 'latest', 'auto' (latest if there is one, else start fresh), or a "
        "checkpoint folder"
    )
    overwrite: bool = _f(False, "replace the run already in output_dir")
    log_every: int = _f(10, "print a metrics line every N steps")
    controls: bool = _f(
        True, "also score the held-out rows with their series shuffled between rows (accuracy "
        "should fall to chance if the model reads the series)"
    )

    def validate(self) -> "SFTConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise MlxRftError(msg)

        if self.finetune_type is not None:
            options = ("none", *FINETUNE_TYPES)
            need(self.finetune_type in options,
                 f"finetune_type={self.finetune_type!r} is not valid; choose one of {', '.join(options)}")
        need(self.prompt_format in PROMPT_FORMATS,
             f"prompt_format={self.prompt_format!r} is not valid; choose soft or text")
        need(self.lr_schedule in SCHEDULES,
             f"lr_schedule={self.lr_schedule!r} is not valid; choose one of {', '.join(SCHEDULES)}")
        for name in ("num_steps", "batch_size", "max_batch_tokens", "patch_size", "encoder_dim", "encoder_layers",
                     "encoder_heads", "lora_rank", "save_every", "keep_last", "log_every",
                     "max_new_tokens"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        need(self.encoder_dim % self.encoder_heads == 0,
             f"encoder_dim={self.encoder_dim} must be a multiple of encoder_heads={self.encoder_heads}")
        need(self.learning_rate > 0 and self.llm_learning_rate > 0,
             "learning_rate and llm_learning_rate must be > 0")
        need(0 <= self.warmup_steps < self.num_steps,
             f"warmup_steps={self.warmup_steps} must be >= 0 and below num_steps={self.num_steps}")
        need(self.eval_size >= 0, f"eval_size={self.eval_size} must be >= 0 (0 = all rows)")
        need(not (self.task and self.train_file),
             "give either --task or --train-file, not both")
        return self

    @property
    def task_name(self) -> str | None:
        return None if self.train_file else (self.task or DEFAULT_TASK)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
