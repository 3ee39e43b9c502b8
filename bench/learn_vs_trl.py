"""Learning at equal wall time: TRL's GRPOTrainer on mlx-rft's job, scored on mlx-rft's held-out set.

Runs under a separate environment with torch, TRL and mlx-rft's reward code (bench/README.md,
"Learning against TRL", sets it up), on the rows `export_task.py` wrote:

    .venv/bin/python bench/export_task.py                   # the default job's rows -> runs/learn_vs_trl/task
    .venv/bin/mlx-rft train --output-dir runs/learn_vs_trl/mlx   # our run: the default job
    ../trl-env/bin/python bench/learn_vs_trl.py --minutes-from runs/learn_vs_trl/mlx
    ../trl-env/bin/python bench/learn_vs_trl.py --minutes 12.5       # or a budget in minutes
    ../trl-env/bin/python bench/learn_vs_trl.py --max-steps 1 --eval-limit 4   # smoke test

TRL trains for the budget's minutes of wall time, counted from the start of its first step (model
loading and evaluation are outside it): a callback stops it at the end of the first step that
reaches the budget, so it gets the budget plus at most one step. Then the trained policy is
evaluated greedily on the held-out prompts, as before training.

What is matched to the exported mlx-rft config (meta.json), and how:
  - data: the exported chats in file order (mlx-rft's draw order; TRL's shuffling is off), so
    both see the same prompts at every step; the prompt tokens are checked to be mlx-rft's.
  - rewards: mlx-rft's own `RewardSet`s from `build_run_data` (the task's exact-answer scorer),
    called on TRL's completions; the held-out score uses the first reward, NaN counted as 0.
  - model: the same HF-format folder, float32, LoRA (PEFT) with the same rank, alpha, dropout and
    modules (every linear layer of every block unless lora_keys / lora_layers say otherwise).
  - algorithm: B prompts x G completions per step (one generation per update), max_new_tokens,
    temperature, top-p/k, min-p, repetition penalty, loss_type, epsilon(_high), delta, beta,
    scale_rewards, importance_sampling_level, num_iterations, entropy settings, grad clipping,
    learning rate and schedule, seed; no gradient checkpointing unless the config asks for it.
    `--accumulation N` splits TRL's update into N micro-batches (the same update from one
    generation, normalised over the whole step) when its memory is too much.
  - optimizer: `--optimizer mlx` (the default) is MLX's AdamW update, which mlx-rft uses: Adam
    without bias correction (mlx.optimizers default). `--optimizer torch` is TRL's own
    AdamW (bias-corrected): its first steps are several times smaller at the same learning rate.
  - evaluation: greedy, max_new_tokens, all held-out prompts in one batch (left-padded), the
    completion's text decoded as mlx-rft decodes it (up to the first EOS, specials kept).
Prints one JSON object (and writes it to --json): steps, training minutes, step times, held-out
accuracy before and after, and the mlx-rft run's figures when --minutes-from names it.
"""

from __future__ import annotations

import os

# Only local files: the model folder and the exported rows.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# mlx-rft is imported for its reward code only: keep MLX on its bundled BLAS, so that no second
# BLAS library is loaded into the torch process.
os.environ.setdefault("MLX_RFT_BLAS", "none")

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch  # before mlx_rft (and so mlx.core)

from timing import max_rss_gb

SUPPORTED_FINETUNE = ("lora",)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mlx_run_minutes(run_dir: Path) -> tuple[float, dict]:
    """Training minutes of an `mlx-rft train` run (the sum of its steps' time/step, evaluation left
    out) and its summary (steps, held-out scores before and after)."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "time/step" in r]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no training steps")
    seconds = sum(r["time/step"] for r in rows)
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    return seconds / 60, {
        "run": str(run_dir), "steps": len(rows), "train_minutes": round(seconds / 60, 3),
        "step_s_median": round(statistics.median(r["time/step"] for r in rows), 2),
        "eval_before": summary.get("eval_before"), "eval_after": summary.get("eval_after"),
    }


def check_supported(cfg) -> None:
    """Refuse config fields this script does not map onto TRL (rather than silently differ)."""
    problems = []
    if cfg.finetune_type not in SUPPORTED_FINETUNE:
        problems.append(f"finetune_type={cfg.finetune_type}")
    if cfg.optimizer != "adamw":
        problems.append(f"optimizer={cfg.optimizer}")
    if cfg.lr_schedule != "constant":
        problems.append(f"lr_schedule={cfg.lr_schedule} (a time budget has no step count to decay over)")
    for name in ("quantize_bits", "warmup_steps"):
        if getattr(cfg, name):
            problems.append(f"{name}={getattr(cfg, name)}")
    for name in ("dynamic_sampling", "drop_zero_std_groups", "freeze", "stop"):
        if getattr(cfg, name):
            problems.append(f"{name}={getattr(cfg, name)}")
    if cfg.eval_k != 1 or cfg.eval_temperature != 0:
        problems.append("eval_k / eval_temperature (only greedy pass@1 is evaluated)")
    if problems:
        raise SystemExit("learn_vs_trl.py does not map these config fields onto TRL: " + ", ".join(problems))


def lora_config(cfg, model):
    """PEFT LoRA on the modules mlx-lm's `linear_to_lora_layers` adapts: every linear layer of the
    last `lora_layers` blocks, or those whose path inside a block is in `lora_keys`."""
    from peft import LoraConfig

    layers = model.model.layers
    n = len(layers) if cfg.lora_layers < 0 else min(cfg.lora_layers, len(layers))
    keys = list(cfg.lora_keys) or sorted(
        {name for name, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    )
    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules=keys, layers_to_transform=list(range(len(layers) - n, len(layers))),
        task_type="CAUSAL_LM",
    )


class MlxAdamW(torch.optim.Optimizer):
    """mlx.optimizers.AdamW as mlx-rft builds it: decoupled weight decay, no bias correction.

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  p <- p - lr m / (sqrt(v) + eps)
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                m, v, g = state["m"], state["v"], p.grad
                if wd:
                    p.mul_(1 - lr * wd)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)
        return loss


def greedy_eval(model, tokenizer, rows, reward_set, max_new_tokens: int, batch: int) -> dict:
    """Held-out pass@1 as mlx-rft's `evaluate_prompts` computes it, with transformers' generate."""
    import numpy as np
    from transformers import GenerationConfig

    from mlx_rft.evaluate import columns_per_row
    from mlx_rft.types import PromptExample

    declared = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *([declared] if isinstance(declared, int) else declared or [])}
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos),
        pad_token_id=tokenizer.pad_token_id,
    )
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    texts = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            enc = tokenizer.pad({"input_ids": [r["prompt_ids"] for r in chunk]}, return_tensors="pt")
            out = model.generate(**enc, generation_config=gen)
            for ids in out[:, enc["input_ids"].shape[1]:].tolist():
                # Up to the first EOS, which is left out of the text (mlx-rft's rollout decoding).
                end = next((k for k, t in enumerate(ids) if t in eos), len(ids))
                texts.append(tokenizer.decode(ids[:end]))
    if was_training:
        model.train()
    examples = [PromptExample(r["prompt_text"], r["prompt_ids"], task_columns(r)) for r in rows]
    result = reward_set([e.prompt for e in examples], texts, columns_per_row(examples, 1))
    scores = np.nan_to_num(np.asarray(result.total, dtype=np.float64), nan=0.0)
    return {"accuracy": float(scores.mean()), "unscored": int(result.num_unscored),
            "prompts": len(rows), "seconds": round(time.perf_counter() - t0, 1),
            "samples": [{"answer": r.get("answer"), "completion": t} for r, t in zip(rows[:3], texts[:3])]}


EXPORT_ONLY = ("messages", "prompt_text", "prompt_ids", "index")


def task_columns(row: dict) -> dict:
    """A row's dataset columns as mlx-rft's rewards receive them (its chat included)."""
    return {k: v for k, v in row.items() if k not in ("prompt_text", "prompt_ids", "index")}


def check_rows(rows, examples, tokenizer, what: str) -> None:
    """The exported rows must be the prompts mlx-rft's data code builds here, token for token."""
    ours = sorted(r["prompt_text"] for r in rows)
    if ours != sorted(e.prompt for e in examples):
        raise SystemExit(f"{what}: the exported prompts differ from the ones build_run_data makes here")
    ids = tokenizer.apply_chat_template([r["messages"] for r in rows], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    bad = sum(list(a) != r["prompt_ids"] for a, r in zip(ids, rows))
    if bad:
        raise SystemExit(f"{what}: {bad} prompts tokenize differently under TRL's chat template")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/learn_vs_trl/task", help="folder export_task.py wrote")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training budget in wall-clock minutes")
    budget.add_argument("--minutes-from", type=Path, metavar="RUN_DIR",
                        help="an `mlx-rft train` run folder: its training minutes are the budget")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    ap.add_argument("--model", default=None, help="model folder (default: the one meta.json names)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--optimizer", choices=("mlx", "torch"), default="mlx",
                    help="mlx: MLX's AdamW update, as mlx-rft; torch: TRL's AdamW (bias-corrected)")
    ap.add_argument("--accumulation", type=int, default=None,
                    help="TRL micro-batches per update (default: the config's gradient_accumulation_steps); "
                    "the same update from one generation, for less memory")
    ap.add_argument("--eval-limit", type=int, default=None, help="score only the first N held-out prompts")
    ap.add_argument("--eval-batch", type=int, default=64, help="held-out prompts per generate call")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    if args.minutes is None and args.minutes_from is None and args.max_steps is None:
        ap.error("give a budget: --minutes M, --minutes-from RUN_DIR, or --max-steps N")

    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    import trl
    from trl import GRPOConfig as TrlConfig
    from trl import GRPOTrainer

    from mlx_rft.config import GRPOConfig
    from mlx_rft.train.run_data import build_run_data

    torch.set_num_threads(args.threads)
    data_dir = Path(args.data)
    meta = json.loads((data_dir / "meta.json").read_text())
    cfg = GRPOConfig(**meta["config"])
    check_supported(cfg)
    model_dir = args.model or meta["model"]
    train_rows = read_jsonl(data_dir / "train.jsonl")
    eval_rows = read_jsonl(data_dir / "eval.jsonl")[: args.eval_limit]

    budget_min, mlx_run = args.minutes, None
    if args.minutes_from is not None:
        budget_min, mlx_run = mlx_run_minutes(args.minutes_from)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left", truncation_side="left")
    # mlx-rft's own data and rewards, built here from the same config (the task is regenerated
    # from its seed): the exported rows are checked against them.
    run_data = build_run_data(cfg, tokenizer)
    check_rows(train_rows, run_data.train, tokenizer, "train")
    check_rows(read_jsonl(data_dir / "eval.jsonl"), run_data.eval, tokenizer, "eval")

    dtype = {None: torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[cfg.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    eval_before = greedy_eval(model, tokenizer, eval_rows, run_data.eval_reward, cfg.max_new_tokens, args.eval_batch)
    print(f"eval before: {eval_before['accuracy']:.3f} on {eval_before['prompts']} prompts "
          f"({eval_before['seconds']} s)", flush=True)

    reward_set = run_data.rewards

    def mlx_rft_reward(prompts, completions, completion_ids, **kw):
        # Conversational prompts give completions as message lists; score their text.
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        columns = {k: kw[k] for k in kw if k in task_keys}
        columns["completion_ids"] = [list(ids) for ids in completion_ids]
        total = reward_set(kw["prompt_text"], texts, columns).total
        return [None if math.isnan(x) else float(x) for x in total]

    mlx_rft_reward.__name__ = "+".join(reward_set.names)
    # TRL reads the chat from "prompt" and hands every other column to the reward function.
    task_keys = {k for k in train_rows[0] if k not in EXPORT_ONLY}
    dataset = Dataset.from_list([
        {"prompt": r["messages"], "prompt_text": r["prompt_text"], **{k: r[k] for k in task_keys}}
        for r in train_rows
    ])
    # The wiring, as TRL calls it: the reference answers must score 1.
    probe = dataset.select(range(8))
    ok = mlx_rft_reward(probe["prompt"], [[{"role": "assistant", "content": f"<answer>{a}</answer>"}]
                                          for a in probe["answer"]], [[0]] * 8,
                        **{k: probe[k] for k in probe.column_names if k != "prompt"})
    if ok != [1.0] * 8:
        raise SystemExit(f"the reward gives the reference answers {ok}, not 1.0 each")

    steps: list[float] = []
    history: list[dict] = []
    clock: dict[str, float] = {}

    class Budget(TrainerCallback):
        """Times each step; stops at the end of the first one that reaches the budget."""

        def on_step_begin(self, targs, state, control, **kw):
            clock["step"] = time.perf_counter()
            clock.setdefault("first", clock["step"])

        def on_step_end(self, targs, state, control, **kw):
            now = clock["last"] = time.perf_counter()
            steps.append(now - clock["step"])
            if budget_min is not None and now - clock["first"] >= budget_min * 60:
                control.should_training_stop = True

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                history.append({"step": state.global_step, "minutes": round((time.perf_counter() - clock["first"]) / 60, 3),
                                **{k: logs[k] for k in ("reward", "reward_std", "frac_reward_zero_std", "loss",
                                                        "grad_norm", "completions/mean_length") if k in logs}})
                h = history[-1]
                print(f"step {h['step']}: {steps[-1]:.1f} s, {h['minutes']:.2f} min, reward {h['reward']:.3f}",
                      flush=True)

    rows_per_step = cfg.prompts_per_step * cfg.group_size
    ga = args.accumulation or cfg.gradient_accumulation_steps
    if rows_per_step % ga:
        raise SystemExit(f"--accumulation {ga} must divide the {rows_per_step} completions of a step")
    trl_cfg = TrlConfig(
        output_dir=str(data_dir / "trl_out"), report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=False, seed=cfg.seed, data_seed=cfg.seed,
        max_steps=args.max_steps or 10**6,
        # B prompts x G completions per update, generated once per update.
        per_device_train_batch_size=rows_per_step // ga, gradient_accumulation_steps=ga,
        num_generations=cfg.group_size, shuffle_dataset=False,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, min_p=cfg.min_p or None, repetition_penalty=cfg.repetition_penalty,
        loss_type=cfg.loss_type, beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
        delta=cfg.delta, scale_rewards=cfg.scale_rewards, num_iterations=cfg.num_iterations,
        importance_sampling_level=cfg.importance_sampling_level,
        mask_truncated_completions=cfg.mask_truncated_completions,
        top_entropy_quantile=cfg.top_entropy_quantile, entropy_coef=cfg.entropy_coef,
        learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or 0.0,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )

    class Trainer(GRPOTrainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None and args.optimizer == "mlx":
                params = [p for p in self.model.parameters() if p.requires_grad]
                self.optimizer = MlxAdamW(params, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
            return super().create_optimizer(model)

    trainer = Trainer(
        model=model, reward_funcs=[mlx_rft_reward], args=trl_cfg, train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora_config(cfg, model), callbacks=[Budget()],
    )
    trainer.remove_callback(PrinterCallback)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"TRL {trl.__version__}, torch {torch.__version__}, {args.threads} threads; {trainable:,} trainable "
          f"parameters; budget {'-' if budget_min is None else f'{budget_min:.2f}'} min"
          + (f", max {args.max_steps} steps" if args.max_steps else ""), flush=True)
    trainer.train()
    train_minutes = (clock["last"] - clock["first"]) / 60

    eval_after = greedy_eval(trainer.model, tokenizer, eval_rows, run_data.eval_reward, cfg.max_new_tokens,
                             args.eval_batch)
    print(f"eval after: {eval_after['accuracy']:.3f} on {eval_after['prompts']} prompts", flush=True)
    from importlib.metadata import version

    result = {
        "setup": {
            "trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": version("peft"), "threads": args.threads, "optimizer": args.optimizer, "accumulation": ga,
            "model": str(model_dir), "data": str(data_dir), "trainable_params": trainable,
        },
        "budget_minutes": None if budget_min is None else round(budget_min, 3),
        "max_steps": args.max_steps,
        "steps": len(steps),
        "train_minutes": round(train_minutes, 3),
        "step_s": [round(s, 2) for s in steps],
        "step_s_median": round(statistics.median(steps), 2),
        "eval_before": eval_before,
        "eval_after": eval_after,
        "max_rss_gb": max_rss_gb(),
        "history": history,
    }
    if mlx_run is not None:
        result["mlx_rft"] = mlx_run
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
