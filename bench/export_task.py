"""Write the training job's prompts as mlx-rft sees them, for a peer trainer (`learn_vs_trl.py`).

    .venv/bin/python bench/export_task.py                        # the default job (`mlx-rft train`)
    .venv/bin/python bench/export_task.py --out DIR --task-size 500   # any `mlx-rft train` flag

Builds the run's data with mlx-rft's own code (`build_run_data`, the trainer's tokenizer) and
writes into --out (default runs/learn_vs_trl/task):

  train.jsonl  the training rows in the order mlx-rft's sampler draws them in its first epoch
               (seed `seed`, `prompts_per_step` per step), so a peer that reads them in file
               order sees the same prompts at every step
  eval.jsonl   the held-out rows, in mlx-rft's order
  meta.json    the resolved config, the model folder, the system prompt, the rewards' names and
               weights, and row counts

Each row holds `messages` (the system prompt, the few-shot turns and the question: the chat the
trainer renders), `answer` and the task's other columns (reward functions get them by name),
`prompt_text` and `prompt_ids` (the prompt after the chat template, and its tokens), and
`index` (the row's position in mlx-rft's dataset).
"""

from __future__ import annotations

import mlx_rft  # noqa: F401  (loads the fast BLAS before mlx.core)

import argparse
import json
import sys
from pathlib import Path

from mlx_rft.config import add_config_arguments, config_from_args
from mlx_rft.data import PromptSampler, row_messages
from mlx_rft.models import load_model, resolve_model_path
from mlx_rft.train.run_data import build_run_data


def chat(columns: dict, system_prompt: str | None) -> list[dict[str, str]]:
    """The messages `render_prompt` renders for a row: the system prompt goes first unless the
    row brings its own."""
    content = row_messages(columns)
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def export_rows(examples, order, system_prompt: str | None, tokenizer) -> list[dict]:
    rows = []
    for i in order:
        e = examples[i]
        messages = chat(e.columns, system_prompt)
        # The chat must render to exactly the prompt the trainer generates from.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text != e.prompt:
            raise SystemExit(f"row {i}: the exported messages render differently from the trainer's prompt")
        extra = {k: v for k, v in e.columns.items() if k not in ("messages", "prompt")}
        rows.append({"messages": messages, **extra, "prompt_text": e.prompt,
                     "prompt_ids": list(e.prompt_ids), "index": i})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/learn_vs_trl/task", help="folder to write into")
    add_config_arguments(ap)  # the job: the same flags (and --config YAML) as `mlx-rft train`
    args = ap.parse_args()
    cfg = config_from_args(args)

    model_dir = resolve_model_path(cfg.model)
    _, tokenizer = load_model(model_dir, dtype=cfg.dtype, lazy=True)  # the trainer's tokenizer
    data = build_run_data(cfg, tokenizer)
    system = cfg.system_prompt
    if system is None and cfg.train_file is None:
        from mlx_rft.data.tasks import DEFAULT_TASK, load_task

        # build_run_data takes the system prompt from the task; read it the same way.
        name = cfg.task or DEFAULT_TASK.name
        system = load_task(name, size=1, seed=cfg.seed, eval_size=0, **cfg.task_kwargs()).system_prompt

    # The trainer's sampler, single process: the first epoch's order.
    sampler = PromptSampler(len(data.train), cfg.prompts_per_step, seed=cfg.seed)
    train_order = sampler.next_global(len(data.train))
    train = export_rows(data.train, train_order, system, tokenizer)
    evals = export_rows(data.eval, range(len(data.eval)), system, tokenizer)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    meta = {
        "config": cfg.to_dict(),
        "model": str(model_dir),
        "system_prompt": system,
        "rewards": {"train": data.rewards.names, "train_weights": data.rewards.weights,
                    "eval": data.eval_reward.names},
        "train_rows": len(train),
        "eval_rows": len(evals),
        "train_order": "the first epoch of mlx-rft's PromptSampler (file order = draw order)",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    print(json.dumps({"out": str(out), "train_rows": len(train), "eval_rows": len(evals),
                      "model": str(model_dir), "rewards": meta["rewards"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
