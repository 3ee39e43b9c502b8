"""GRPO step benchmark: time split, stability over many steps, peak memory, compute floor.

Default job (issue figures): the embedded SmolLM2-135M-Instruct, 4 prompts x 4 completions, 64 new
tokens (EOS ignored is not possible in training, so a length-shaped reward keeps completions long and
every group's rewards varied), temperature 1.0, full fine-tuning, float32.

    python bench/bench_step.py                       # 20 steps of the default model
    python bench/bench_step.py --finetune-type lora
    python bench/bench_step.py --accumulation 2      # two micro-batches per update: less memory
    python bench/bench_step.py --gradient-checkpointing  # recompute blocks: much less memory
    python bench/bench_step.py --qwen3-0.6b --steps 1  # random Qwen3-0.6B-shaped model, peak memory

The compute floor is the FLOPs of the step (generation 2*P per token, the gradient pass 6*P per
token for full fine-tuning or 4*P for LoRA, over prompt-shared tokens) divided by the float32 GEMM
rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import mlx_rft  # noqa: F401  (fast BLAS before mlx.core)
from mlx.utils import tree_flatten

import step_job
from timing import max_rss_gb
from mlx_rft import GRPOConfig, GRPOTrainer, cpu
from mlx_rft.doctor import measure_gemm_gflops
from mlx_rft.models import load_model

QWEN3_06B = dict(
    hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
    rope_theta=1_000_000.0, tie_word_embeddings=True,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--finetune-type", default="full")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--accumulation", type=int, default=1,
                    help="gradient_accumulation_steps: micro-batches per update (less memory)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute blocks in the backward pass (less memory)")
    ap.add_argument("--qwen3-0.6b", dest="qwen", action="store_true", help="random Qwen3-0.6B-shaped model")
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args()

    gemm = measure_gemm_gflops()
    with tempfile.TemporaryDirectory() as folder:  # the run's checkpoints: GBs for large models
        run(args, gemm, Path(folder))


def run(args, gemm: float, tmp: Path) -> None:
    model = None
    if args.qwen:
        from mlx_rft.testing import write_tiny_model

        model = str(write_tiny_model(tmp / "qwen3-0.6b-shape", "qwen3", **QWEN3_06B))
    rows = [{"prompt": p} for p in step_job.prompts()]
    cfg = GRPOConfig(
        model=model, finetune_type=args.finetune_type, num_steps=args.steps, prompts_per_step=4,
        group_size=4, max_new_tokens=args.max_new_tokens, temperature=1.0, learning_rate=1e-6,
        output_dir=str(tmp / "run"), save_every=10**6, eval_size=1, sample_every=0, log_every=1,
        gradient_accumulation_steps=args.accumulation, gradient_checkpointing=args.gradient_checkpointing,
        # The random model's completions decode to text that scores the same in every group: keep
        # those groups in the gradient pass so the step's memory is that of a real update.
        skip_zero_advantage=not args.qwen,
    )
    trainer = GRPOTrainer(cfg, reward_funcs=[step_job.long_answer], train_dataset=rows)
    trainer.evaluate = lambda step: {}  # benchmark the steps only
    # The CPU speed-ups for the whole run, as training has them. The trainer loads its own copy of
    # the model; a lazily loaded one names the same mlx-lm modules (a block the trainer enters
    # itself nests inside this one).
    with cpu.speedups(load_model(model, lazy=True)[0]):
        result = trainer.train()
    steps = [h for h in result.history if "time/step" in h]
    params = sum(v.size for _, v in tree_flatten(trainer.model.parameters()))
    trainable = trainer.param_counts.trainable
    prompt_tokens = sum(len(trainer.train_data[0].prompt_ids) for _ in range(cfg.prompts_per_step))

    def floor_seconds(h) -> float:
        completion_tokens = h["tokens/completion"] / cfg.num_iterations
        gen = 2 * params * (prompt_tokens + completion_tokens)
        per_token = 6 if cfg.finetune_type == "full" else 4
        upd = per_token * params * (prompt_tokens + completion_tokens)
        return (gen + upd) / (gemm * 1e9)

    times = [h["time/step"] for h in steps]
    later = times[1:] if len(times) > 1 else times
    summary = {
        "model": "qwen3-0.6b-shaped (random)" if args.qwen else "SmolLM2-135M-Instruct",
        "finetune_type": cfg.finetune_type, "accumulation": cfg.gradient_accumulation_steps,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "params": params, "trainable": trainable,
        "gemm_gflops": round(gemm, 1), "steps": len(steps),
        "step_s": [round(t, 2) for t in times],
        "step_s_median": round(statistics.median(times), 2),
        "step_s_median_after_2": round(statistics.median(times[2:] or times), 2),
        "step2_s": round(later[0], 2),
        "max_later_vs_step2": round(max(later) / later[0], 3),
        "median_later_vs_step2": round(statistics.median(later) / later[0], 3),
        "split_median_s": {k: round(statistics.median(h[f"time/{k}"] for h in steps), 2)
                           for k in ("generate", "reward", "logprobs", "update")},
        "gen_tok_s_median": round(statistics.median(h["tokens_per_sec/generate"] for h in steps), 1),
        "train_tok_s_median": round(statistics.median(h["tokens_per_sec/train"] for h in steps), 1),
        "completion_tokens_median": statistics.median(h["tokens/completion"] for h in steps),
        "peak_memory_gb_max": round(max(h["memory/peak_gb"] for h in steps), 2),
        "floor_s_median": round(statistics.median(floor_seconds(h) for h in steps), 2),
    }
    summary["step_over_floor"] = round(summary["step_s_median"] / summary["floor_s_median"], 2)
    summary["max_rss_gb"] = max_rss_gb()
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
