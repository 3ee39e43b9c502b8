"""TRL's GRPOTrainer on the GRPO step benchmark's job, for a ratio taken on the same machine.

Runs under a separate environment with torch and TRL (mlx-rft does not depend on them):

    python -m venv trl-env
    trl-env/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    trl-env/bin/pip install trl
    trl-env/bin/python bench/bench_trl.py --model ~/.cache/mlx-rft/models/SmolLM2-135M-Instruct
    trl-env/bin/python bench/bench_trl.py --model ... --gradient-checkpointing

The job is `bench_step.py`'s (same prompts and reward from `step_job.py`): 4 prompts x 4
completions per step, 64 new tokens, temperature 1.0, full fine-tuning in float32 on the CPU,
beta 0, learning rate 1e-6. The model folder is the one `mlx-rft` imports from the embedded GGUF
(`mlx-rft doctor` prints it). TRL turns gradient checkpointing on by default; this script turns it
off unless asked, to match `bench_step.py`'s default. Prints the median step time over the steps
after the first two (the first ones include one-off start-up costs), the median time spent in
TRL's generate-and-score phase, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import step_job
from timing import max_rss_gb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face-format folder of SmolLM2-135M-Instruct")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    steps: list[float] = []
    generate: list[float] = []

    def long_answer(prompts, completions, **columns):
        # Conversational prompts give completions as message lists; score their text.
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return step_job.long_answer(prompts, texts, **columns)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, per_device_train_batch_size=16, num_generations=4,
            max_completion_length=64, temperature=1.0, learning_rate=1e-6, beta=0.0,
            max_steps=args.steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
            gradient_checkpointing=args.gradient_checkpointing, save_strategy="no", seed=0,
            model_init_kwargs={"dtype": torch.float32},
        )
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in step_job.prompts()])
        trainer = GRPOTrainer(model=args.model, reward_funcs=[long_answer], args=cfg,
                              train_dataset=data, callbacks=[StepTimer()])
        phase = trainer._generate_and_score_completions  # generation, rewards, advantages

        def timed(*a, **k):
            t = time.perf_counter()
            result = phase(*a, **k)
            generate.append(time.perf_counter() - t)
            return result

        trainer._generate_and_score_completions = timed
        trainer.train()

    later = steps[2:] or steps
    summary = {
        "trl": __import__("trl").__version__, "torch": torch.__version__, "threads": args.threads,
        "gradient_checkpointing": args.gradient_checkpointing, "steps": len(steps),
        "step_s": [round(s, 2) for s in steps],
        "step_s_median_after_2": round(statistics.median(later), 2),
        "generate_and_score_s_median_after_2": round(statistics.median(generate[2:] or generate), 2),
        "max_rss_gb": max_rss_gb(),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
