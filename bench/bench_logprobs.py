"""Peak memory and time of `sequence_logprobs`: chunked vs unchunked LM head, shared vs full prompts.

    python bench/bench_logprobs.py                      # random Qwen3-shaped model, vocab 151,936
    python bench/bench_logprobs.py --model default      # SmolLM2-135M-Instruct (needs the GGUF import)
    python bench/bench_logprobs.py --model PATH         # any local HF-format folder

Each configuration runs forward-only (old/reference log-probs) and forward+backward (the policy
pass: `nn.value_and_grad` of sum(logp * w)). "naive" is the textbook computation: full logits from
`model(prompt + completion)`, `log_softmax` over the vocabulary, gather. Peak memory is
`mx.get_peak_memory()` after `mx.reset_peak_memory()`, minus the memory held before the call
(weights and inputs), so it is the extra memory the computation needs; times are the best of
--repeats runs after a warm-up.
"""

from __future__ import annotations

import mlx_rft  # noqa: F401  (loads the fast BLAS before mlx.core)

import argparse
import atexit
import shutil
import tempfile
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_rft import cpu
from mlx_rft.models import load_model
from mlx_rft.policy.logprobs import sequence_logprobs
from mlx_rft.testing import write_tiny_model


def naive_logprobs(model, prompt_ids, completion_ids, group_size, temperature):
    """Full [N, P+T, V] logits and a full log_softmax (two [N, T, V] float tensors at least)."""
    n, t = completion_ids.shape
    prompts = mx.array(np.repeat(np.asarray(prompt_ids, dtype=np.int32), group_size, axis=0))
    p = prompts.shape[1]
    logits = model(mx.concatenate([prompts, completion_ids[:, :-1]], axis=1))[:, p - 1 :]
    logsm = nn.log_softmax(logits.astype(mx.float32) / temperature, axis=-1)
    return mx.take_along_axis(logsm, completion_ids[..., None], axis=-1)[..., 0]


def measure(fn, repeats: int) -> tuple[float, float]:
    """(extra peak MiB, best seconds) of mx.eval(fn()); the best time is the least disturbed by
    other load on a shared machine."""
    mx.eval(fn())  # warm-up (kernel setup, buffer cache)
    peaks, times = [], []
    for _ in range(repeats):
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
        peaks.append((mx.get_peak_memory() - base) / 2**20)
    return max(peaks), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (random qwen3, --vocab), 'default', or a path")
    ap.add_argument("--vocab", type=int, default=151_936, help="vocabulary of the tiny model")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    ap.add_argument("--prompts", type=int, default=4, help="B distinct prompts")
    ap.add_argument("--group-size", type=int, default=4, help="G completions per prompt (N = B*G)")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=None, help="head chunk (tokens); default: auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--memory-limit-mb", type=int, default=None,
        help="mx.set_memory_limit for the run: MLX waits for running work to free buffers above it",
    )
    args = ap.parse_args()

    if args.model == "tiny":
        folder = tempfile.mkdtemp(prefix="bench_logprobs_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        write_tiny_model(
            folder, "qwen3", vocab_size=args.vocab, hidden_size=args.hidden,
            intermediate_size=2 * args.hidden, head_dim=args.hidden // 4,
        )
        model, _ = load_model(folder, dtype="float32")
        label = f"random qwen3 (hidden {args.hidden}, 2 layers, vocab {args.vocab})"
    else:
        model, _ = load_model(None if args.model == "default" else args.model, dtype="float32")
        label = args.model
    vocab = model.args.vocab_size
    b, g, p, t = args.prompts, args.group_size, args.prompt_len, args.completion_len
    n = b * g
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(0, vocab, size=(b, p)).tolist()
    ids = mx.array(rng.integers(0, vocab, size=(n, t)).astype(np.int32))
    mask = mx.ones((n, t))
    w = mx.array(rng.normal(size=(n, t)).astype(np.float32))
    mx.eval(ids, mask, w)

    if args.memory_limit_mb:
        mx.set_memory_limit(args.memory_limit_mb * 2**20)
    limit = mx.get_memory_limit() / 2**20
    print(f"model: {label}; N={n} (B={b} x G={g}), prompt {p}, completion {t}, float32")
    print(f"MLX memory limit {limit:.0f} MiB; chunk size {args.chunk_size or 'auto'}")
    print(f"one [N, T, V] float32 tensor = {n * t * vocab * 4 / 2**20:.0f} MiB")
    print(f"{'configuration':<34}{'fwd peak MiB':>13}{'fwd s':>8}{'fwd+bwd peak MiB':>18}{'fwd+bwd s':>11}")

    configs = [
        ("naive (full logits + log_softmax)", None),
        ("unchunked, full prompts", dict(share_prompt=False, chunk_size=0)),
        ("unchunked, shared prompts", dict(share_prompt=True, chunk_size=0)),
        ("chunked, full prompts", dict(share_prompt=False, chunk_size=args.chunk_size)),
        ("chunked, shared prompts", dict(share_prompt=True, chunk_size=args.chunk_size)),
    ]
    with cpu.speedups(model):  # the CPU paths the trainer's pass runs with
        for name, kw in configs:
            if kw is None:
                def logp(m):
                    return naive_logprobs(m, prompt_ids, ids, g, 1.0)
            else:
                def logp(m, kw=kw):
                    return sequence_logprobs(m, prompt_ids, ids, mask, g, 1.0, **kw)[0]

            loss_and_grad = nn.value_and_grad(model, lambda m: (logp(m) * w).sum())
            fwd = measure(lambda: logp(model), args.repeats)
            bwd = measure(lambda: loss_and_grad(model), args.repeats)
            print(f"{name:<34}{fwd[0]:>13.0f}{fwd[1]:>8.2f}{bwd[0]:>18.0f}{bwd[1]:>11.2f}")


if __name__ == "__main__":
    main()
