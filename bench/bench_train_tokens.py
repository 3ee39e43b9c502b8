"""Training forward+backward throughput on the GRPO benchmark's shapes, against plain MLX and torch.

16 rows x 104 tokens (4 prompts x 4 completions; a 40-token prompt + 64 completion tokens), full
fine-tuning of the default model (SmolLM2-135M-Instruct), float32. Each variant computes the
per-token log-probs of the completion tokens and backpropagates their weighted sum to every
parameter (the gradient pass of a GRPO update):

  plain MLX   model(rows) -> log_softmax over [16, 104, V] -> gather -> backward, with mlx-lm's
              own functions (mlx_rft.cpu.kernels not patched in)
  ours        mlx_rft.algo.logprobs.sequence_logprobs, the trainer's path (prompt run once per
              group, LM head only on completion tokens, chunked selective log-softmax)
  ours, no prompt sharing   the same with share_prompt=False (every row runs its whole prompt)
  ours, mlx-lm SwiGLU       ours with mlx-lm's SwiGLU (what mlx_rft.cpu.kernels' SwiGLU saves)
  ours, mlx-lm attention    ours with mlx-lm's attention (what mlx_rft.cpu.kernels' attention saves)
  ours, one length bucket   (--ragged only) ours with every completion padded to the longest; with
                            --ragged one row has 64 completion tokens and 15 have 19
  torch       transformers' LlamaForCausalLM on the same weights (run with --torch under a Python
              that has torch + transformers; see BENCHMARKS.md)

Throughput is 16 x 104 row tokens per second of fwd+bwd (best of --repeats, after a warm-up), so
prompt sharing counts as a speed-up over running each row's prompt: that is the work saved.

    python bench/bench_train_tokens.py
    python bench/bench_train_tokens.py --allocator-ab   # glibc keeping freed memory, on vs off
    python bench/bench_train_tokens.py --ragged         # length buckets on a ragged batch
    /path/to/torch-env/bin/python bench/bench_train_tokens.py --torch --model <default model folder>

--allocator-ab runs "ours" in fresh processes with MLX_RFT_RETAIN_MEMORY unset and =0, alternating,
--repeats times each (the setting is per process); it also prints each variant's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from timing import best_of

B, G, PROMPT, COMPLETION = 4, 4, 40, 64


def run_torch(model_dir: str, repeats: int, threads: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.train()
    rng = np.random.default_rng(0)
    rows = torch.tensor(rng.integers(100, 40000, size=(B * G, PROMPT + COMPLETION)))
    w = torch.tensor(rng.normal(size=(B * G, COMPLETION)), dtype=torch.float32)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(rows[:, :-1]).logits[:, PROMPT - 1 :]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, rows[:, PROMPT:, None])[..., 0]
        (logp * w).sum().backward()

    sec = best_of(step, repeats)
    rate = B * G * (PROMPT + COMPLETION) / sec
    print(f"torch {torch.__version__} ({threads} threads): {sec:.2f} s, {rate:.1f} row tokens/s")
    return {f"torch {torch.__version__}": {"s": round(sec, 3), "row_tok_s": round(rate, 1)}}


def run_mlx(model_arg: str | None, repeats: int, only: list[str] | None = None, ragged: bool = False) -> dict:
    import mlx_rft  # noqa: F401  (fast BLAS before mlx.core)
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_rft.cpu import allocator, kernels
    from mlx_rft.models import load_model
    from mlx_rft.policy import logprobs
    from mlx_rft.policy.logprobs import sequence_logprobs

    model, _ = load_model(model_arg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, size=PROMPT).tolist() for _ in range(B)]
    completions = mx.array(rng.integers(100, 40000, size=(B * G, COMPLETION)), dtype=mx.int32)
    mask = mx.ones((B * G, COMPLETION))
    if ragged:  # one row runs to the limit, the others stop after 19 tokens (a typical GRPO batch)
        lengths = np.full(B * G, 19)
        lengths[5] = COMPLETION
        mask = mx.array((np.arange(COMPLETION)[None] < lengths[:, None]).astype(np.float32))
    w = mx.array(rng.normal(size=(B * G, COMPLETION)).astype(np.float32))
    rows = mx.concatenate([mx.repeat(mx.array(prompts), G, axis=0), completions], axis=1)

    def plain_loss(m):
        logits = m(rows[:, :-1])[:, PROMPT - 1 :]
        logp = mx.take_along_axis(nn.log_softmax(logits, axis=-1), completions[..., None], -1)[..., 0]
        return (logp * w).sum()

    def ours_loss(m, share):
        logp, _ = sequence_logprobs(m, prompts, completions, mask, G, 1.0, share_prompt=share)
        return (logp * w).sum()

    variants = {
        "plain MLX": nn.value_and_grad(model, plain_loss),
        "ours": nn.value_and_grad(model, lambda m: ours_loss(m, True)),
        "ours, no prompt sharing": nn.value_and_grad(model, lambda m: ours_loss(m, False)),
        "ours, mlx-lm SwiGLU": nn.value_and_grad(model, lambda m: ours_loss(m, True)),
        "ours, mlx-lm attention": nn.value_and_grad(model, lambda m: ours_loss(m, True)),
        "ours, one length bucket": nn.value_and_grad(model, lambda m: ours_loss(m, True)),
    }
    if ragged:
        only = ["ours", "ours, one length bucket"]
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    default_buckets = logprobs.MAX_BUCKETS
    # Which of mlx_rft.cpu.kernels' functions each variant runs (the rest are mlx-lm's own).
    uses = {
        "plain MLX": (), "ours, mlx-lm SwiGLU": ("scaled_dot_product_attention",),
        "ours, mlx-lm attention": ("swiglu",),
    }

    def configure(name):  # -> the block the variant runs in
        logprobs.MAX_BUCKETS = 1 if name == "ours, one length bucket" else default_buckets
        return kernels.patched(model, names=uses.get(name, kernels.PATCHABLE))

    # Interleaved rounds so every variant sees the same machine load; all of them with glibc
    # keeping freed memory (what `cpu.speedups` does), unless MLX_RFT_RETAIN_MEMORY=0.
    best = {k: float("inf") for k in variants}
    peak = {k: 0.0 for k in variants}
    faults = {k: float("inf") for k in variants}  # minor page faults of the pass (Linux, macOS)
    with allocator.retained():
        for rnd in range(repeats + 1):  # round 0 is the warm-up
            for name, fn in variants.items():
                with configure(name):
                    held = mx.get_active_memory()
                    mx.reset_peak_memory()
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t = time.perf_counter()
                    mx.eval(fn(model))
                    if rnd:
                        faults[name] = min(faults[name], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                        best[name] = min(best[name], time.perf_counter() - t)
                        peak[name] = max(peak[name], (mx.get_peak_memory() - held) / 1e9)
    tokens = B * G * PROMPT + int(mask.sum().item())  # row tokens: every row's prompt + its completion
    for name, sec in best.items():
        print(f"{name}: {sec:.2f} s, {tokens / sec:.1f} row tokens/s, peak {peak[name]:.2f} GB above the "
              f"weights, {faults[name]:.0f} page faults")
    return {name: {"s": round(sec, 3), "row_tok_s": round(tokens / sec, 1), "peak_gb": round(peak[name], 2),
                   "page_faults": faults[name]} for name, sec in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch", action="store_true", help="time torch + transformers instead")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--allocator-ab", action="store_true",
                    help="time 'ours' with glibc keeping freed memory (default) against glibc's defaults")
    ap.add_argument("--ragged", action="store_true",
                    help="one completion of 64 tokens, 15 of 19: 'ours' with and without length buckets")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # comma-separated variant names
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.allocator_ab:
        return allocator_ab(args)
    print(f"fwd+bwd, full fine-tuning, float32, {B * G} rows x {PROMPT + COMPLETION} tokens "
          f"({B} prompts x {G}, {PROMPT}-token prompts, "
          + ("1 completion of 64 tokens, 15 of 19)" if args.ragged else f"{COMPLETION} completion tokens)"))
    if args.torch:
        if not args.model:
            ap.error("--torch needs --model (the HF-format folder, e.g. the imported default model)")
        results = run_torch(args.model, args.repeats, args.threads)
    else:
        results = run_mlx(args.model, args.repeats, args.only.split(",") if args.only else None, args.ragged)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def allocator_ab(args) -> int:
    """'ours' in fresh processes, glibc keeping freed memory (default) vs its defaults, alternating."""
    cmd = [sys.executable, __file__, "--repeats", "2", "--only", "ours"]
    if args.model:
        cmd += ["--model", args.model]
    for i in range(args.repeats):
        for label, value in (("retained", None), ("glibc defaults", "0")):
            env = {k: v for k, v in os.environ.items() if k != "MLX_RFT_RETAIN_MEMORY"}
            if value is not None:
                env["MLX_RFT_RETAIN_MEMORY"] = value
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            print(f"round {i + 1}, {label}: {out.strip().splitlines()[-1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
