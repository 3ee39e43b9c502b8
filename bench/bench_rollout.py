"""Rollout engine throughput vs mlx-lm, decode-step profile, and the machine's limits, in one run.

    python bench/bench_rollout.py                      # default model, float32, full grid
    python bench/bench_rollout.py --quick              # 4x4 at 64 tokens only

For each (B prompts x G samples) and completion length it times, on the same prompts:
  * ours:  mlx_rft.rollout.generate_rollouts (T = 1, EOS ignored so every row has full length)
  * batch: mlx_lm.batch_generate on the B*G prompt list (T = 1 sampler, no EOS ids)
  * naive: one sequence at a time with mlx_lm's generate_step (T = 1); a sequential loop's rate
           does not depend on how rows are grouped, so it is timed once per length on
           --naive-rows sequences
All rates are completion tokens / wall time including prefill. Then it profiles one 4x4 decode
step (bare model forward vs the engine's full step vs sampling alone) against the compute and
memory-bandwidth floors measured in the same run, and measures what dropping finished rows saves.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_rft  # noqa: E402,F401  (fast BLAS before mlx.core)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import batch_generate, generate_step  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from mlx_rft import cpu  # noqa: E402
from mlx_rft.doctor import measure_gemm_gflops  # noqa: E402
from mlx_rft.models import load_model  # noqa: E402
from mlx_rft.rollout import RolloutStats, generate_rollouts  # noqa: E402
from mlx_rft.rollout import engine as engine_module  # noqa: E402
from mlx_rft.rollout.cache import make_rollout_cache  # noqa: E402
from mlx_rft.rollout.sampling import TokenSampler, step_uniforms  # noqa: E402
from mlx_rft.types import SamplingConfig  # noqa: E402
from timing import best_of  # noqa: E402

# The fastest of n calls, no extra warm-up call: main() warms every path up once first.
best_time = partial(best_of, warmup=False)

QUESTIONS = [
    "What is 17 times 23? Show your working.",
    "Name three rivers in Europe and the seas they flow into.",
    "Write a short poem about the autumn wind.",
    "Explain why the sky is blue in two sentences.",
    "How many legs do three spiders and two ants have in total?",
    "Give a recipe for a simple tomato soup.",
    "What is the capital of Australia, and why was it chosen?",
    "Summarise the plot of Romeo and Juliet briefly.",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "List four prime numbers greater than 50.",
    "Describe how a bicycle gear system works.",
    "What causes the seasons on Earth?",
    "Write a polite email declining a meeting invitation.",
    "If a train travels 120 km in 90 minutes, what is its speed?",
    "Suggest three names for a friendly robot.",
    "Why do cats purr? Answer in a few sentences.",
]


def machine_limits() -> dict:
    gemm = measure_gemm_gflops(1024, repeats=10) * 1e9
    x = np.random.default_rng(0).random(64 * 1024 * 1024, dtype=np.float32)  # 256 MiB
    y = np.empty_like(x)
    t = best_time(lambda: np.copyto(y, x), 5)
    bandwidth = 2 * x.nbytes / t  # bytes read + written
    return {"gemm_flops": gemm, "bandwidth": bandwidth}


def run_ours(model, tok, prompts, G, n, seed=0, stats=None):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=n)
    return generate_rollouts(model, tok, prompts, G, cfg, seed=seed, ignore_eos=True, stats=stats)


# The mlx-lm baselines run with mlx-lm's own functions: `generate_rollouts` enters the CPU
# speed-ups (a faster SwiGLU) for its own call only, and these run outside any such block.
def run_batch_generate(model, tok_noeos, prompts, G, n):
    rows = [p for p in prompts for _ in range(G)]
    return batch_generate(model, tok_noeos, rows, max_tokens=n, sampler=make_sampler(temp=1.0))


def run_naive(model, prompts, n):
    sampler = make_sampler(temp=1.0)
    for p in prompts:
        for _ in generate_step(mx.array(p), model, max_tokens=n, sampler=sampler):
            pass


def profile_step(model, tok, prompts, limits, params, weight_bytes, steps=24, rounds=5):
    """ms per decode step at N = 16 (4 prompts x 4): bare forward vs engine vs sampling alone.

    The bare forward (same cache, greedy argmax, pipelined like the engine) and the engine
    alternate `rounds` times; the minimum of each is reported, so both see the same load. The
    bare forward runs inside `cpu.speedups`, as the engine's does.
    """
    B, G = 4, 4
    N = B * G
    lengths = [len(p) for p in prompts[:B]]
    P = max(lengths)

    def bare() -> float:
        cache = make_rollout_cache(model, [P - n for n in lengths])
        padded = mx.array([[0] * (P - len(p)) + p for p in prompts[:B]])
        model(padded, cache=cache)
        for c in cache:
            c.expand(G, P + steps + 4)
        mx.eval([c.state for c in cache])
        y = mx.zeros((N,), mx.int32)
        tic = time.perf_counter()
        for _ in range(steps):
            y_next = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(y_next)
            y.tolist()
            y = y_next.astype(mx.int32)
        y.tolist()
        return (time.perf_counter() - tic) / steps

    def engine() -> float:
        st = RolloutStats()
        run_ours(model, tok, prompts[:B], G, steps + 1, stats=st)
        return st.decode_seconds / st.decode_steps

    forward = engine_step = float("inf")
    for _ in range(rounds):
        with cpu.speedups(model):
            forward = min(forward, bare())
        engine_step = min(engine_step, engine())

    logits = mx.random.normal((N, model.args.vocab_size)) * 4
    mx.eval(logits)
    sampler = TokenSampler(SamplingConfig(temperature=1.0), logits.shape[-1])
    u = step_uniforms(mx.random.key(0), mx.arange(N), N)

    def sample_once():
        o = sampler(logits, u)
        mx.eval(o.tokens, o.logprobs, o.truncated_logprobs)

    sampling = best_time(sample_once, 10)
    lse_ref = best_time(lambda: mx.eval(mx.logsumexp(logits, axis=-1)), 5)
    cat_ref = best_time(lambda: mx.eval(mx.random.categorical(logits)), 5)
    return {
        "forward_ms": forward * 1e3,
        "engine_ms": engine_step * 1e3,
        "sampling_ms": sampling * 1e3,
        "mlx_lm_sampling_ms": (lse_ref + cat_ref) * 1e3,
        "compute_floor_ms": 2 * params * N / limits["gemm_flops"] * 1e3,
        "bandwidth_floor_ms": weight_bytes / limits["bandwidth"] * 1e3,
    }


def profile_ops(model, vocab: int, n: int = 16, context: int = 200) -> dict:
    """Where a decode step's time goes, in ms: best of many runs of each piece at N = n rows."""
    from mlx_lm.models.activations import swiglu
    from mlx_lm.sample_utils import apply_top_p

    from mlx_rft.rollout.sampling import exp_nonpositive, top_p_thresholds

    out = {}
    layers = model.layers
    h = mx.random.normal((n, 1, model.args.hidden_size))
    mx.eval(h)

    def matmuls_only():  # every projection of every layer plus the LM head, nothing else
        x = h
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
            x = a.o_proj(q) + (k.sum() + v.sum()) * 0
            x = m.down_proj(m.gate_proj(x) * m.up_proj(x))
        mx.eval(model.lm_head(x) if hasattr(model, "lm_head") else
                model.model.embed_tokens.as_linear(x))

    out["matmuls_ms"] = best_time(matmuls_only, 10) * 1e3
    inter = layers[0].mlp.gate_proj.weight.shape[0]
    g = mx.random.normal((n, 1, inter))
    heads = layers[0].self_attn.n_heads
    scores = mx.random.normal((n, heads, 1, context))
    mx.eval(g, scores)
    out["swiglu_ms"] = best_time(lambda: mx.eval(swiglu(g, g)), 50) * 1e3 * len(layers)
    out["multiply_ms"] = best_time(lambda: mx.eval(g * g), 50) * 1e3 * len(layers)
    softmax = best_time(lambda: mx.eval(mx.softmax(scores, axis=-1, precise=True)), 50)
    out["softmax_ms"] = softmax * 1e3 * len(layers)
    z = mx.random.normal((n, vocab)) * 4 - 20
    mx.eval(z)
    out["mx_exp_ms"] = best_time(lambda: mx.eval(mx.exp(z)), 10) * 1e3
    out["fast_exp_ms"] = best_time(lambda: mx.eval(exp_nonpositive(z)), 10) * 1e3
    shifted = z - z.max(-1, keepdims=True)
    out["mx_top_p_ms"] = best_time(lambda: mx.eval(apply_top_p(shifted, 0.9)), 5) * 1e3
    out["host_top_p_ms"] = best_time(lambda: top_p_thresholds(np.array(z), 0.9), 10) * 1e3
    return out


def print_ops(ops: dict, n_layers: int) -> None:
    print(f"\nPer decode step at N = 16 rows, summed over {n_layers} layers, ms (best of many):")
    print(f"  all projections + LM head alone: {ops['matmuls_ms']:.1f}")
    print(f"  silu-gate (mlx-lm swiglu): {ops['swiglu_ms']:.1f} vs a plain multiply of the same "
          f"shape: {ops['multiply_ms']:.1f} (MLX's CPU exp is scalar)")
    print(f"  attention softmax over 200 positions: {ops['softmax_ms']:.1f}")
    print(f"  exp over [16, V]: mx.exp {ops['mx_exp_ms']:.1f}, "
          f"exp_nonpositive {ops['fast_exp_ms']:.1f}")
    print(f"  top-p 0.9 over [16, V]: mlx-lm sort {ops['mx_top_p_ms']:.1f}, "
          f"NumPy thresholds {ops['host_top_p_ms']:.1f}")


def row_dropping(model, tok, prompts, n=128, repeats=1):
    """Rows stop at their first full stop: time with and without dropping finished rows."""
    period = tok.encode(".", add_special_tokens=False)
    t = copy.copy(tok)
    t.eos_token_ids = set(tok.eos_token_ids) | set(period)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=n)
    out = {}
    for label, policy in (("drop", engine_module._compact_due), ("keep", lambda f, a: False)):
        engine_module._compact_due, saved = policy, engine_module._compact_due
        try:
            runs = []

            def once():
                runs.append(RolloutStats())
                generate_rollouts(model, t, prompts[:4], 4, cfg, seed=1, stats=runs[-1])

            out[label] = (best_time(once, repeats), runs[-1])
        finally:
            engine_module._compact_due = saved
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--configs", default="1x16,4x4,16x1", help="BxG list")
    ap.add_argument("--new-tokens", default="64,256", help="completion lengths")
    ap.add_argument("--naive-rows", type=int, default=4, help="sequences timed for the naive loop")
    ap.add_argument("--repeats", type=int, default=2, help="best of N interleaved timings")
    ap.add_argument("--quick", action="store_true", help="4x4 at 64 tokens only")
    ap.add_argument("--json", default=None, help="also write the table and the step profile here")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    lengths = [int(v) for v in args.new_tokens.split(",")]
    if args.quick:
        configs, lengths = [(4, 4)], [64]

    model, tok = load_model(args.model, dtype="float32")
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS
    ]
    tok_noeos = copy.copy(tok)
    tok_noeos.eos_token_ids = set()

    print(f"# bench_rollout: {platform.machine()} {platform.system()}, mlx {mx.__version__}, "
          f"device {mx.default_device()}, {params / 1e6:.1f}M params float32")
    print(f"prompt tokens: {min(map(len, prompts))}-{max(map(len, prompts))}; "
          f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    limits = machine_limits()
    print(f"float32 GEMM 1024^3: {limits['gemm_flops'] / 1e9:.0f} GFLOP/s; "
          f"memory copy bandwidth: {limits['bandwidth'] / 1e9:.1f} GB/s (read + write)")

    # Warm up compiled kernels and caches of all three paths.
    run_ours(model, tok, prompts[:2], 2, 4)
    run_batch_generate(model, tok_noeos, prompts[:2], 2, 4)
    run_naive(model, prompts[:1], 4)

    naive_rate = {}
    for n in lengths:
        sec = best_time(lambda: run_naive(model, prompts[: args.naive_rows], n), args.repeats)
        naive_rate[n] = args.naive_rows * n / sec

    print("\n| B x G | new tokens | ours tok/s | mlx_lm.batch_generate tok/s | naive loop tok/s "
          "| ours / batch_generate | ours / naive |")
    print("|---|---|---|---|---|---|---|")
    grid = []
    for B, G in configs:
        for n in lengths:
            ps = prompts[:B]
            tokens = B * G * n
            t_ours = t_batch = float("inf")
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                t_ours = min(t_ours, best_time(lambda: run_ours(model, tok, ps, G, n), 1))
                t_batch = min(
                    t_batch, best_time(lambda: run_batch_generate(model, tok_noeos, ps, G, n), 1)
                )
            ours, batch = tokens / t_ours, tokens / t_batch
            grid.append({"B": B, "G": G, "new_tokens": n, "ours_tok_s": round(ours, 1),
                         "batch_generate_tok_s": round(batch, 1), "naive_tok_s": round(naive_rate[n], 1)})
            print(f"| {B} x {G} | {n} | {ours:.1f} | {batch:.1f} | {naive_rate[n]:.1f} "
                  f"| {ours / batch:.2f}x | {ours / naive_rate[n]:.1f}x |", flush=True)

    prof = profile_step(model, tok, prompts, limits, params, weight_bytes)
    print("\nDecode step at N = 16 rows (4 prompts x 4), ms (alternating, min of 5):")
    print(f"  bare model forward + argmax (pipelined): {prof['forward_ms']:.1f}")
    print(f"  engine step (forward + sampling + log-probs + bookkeeping): {prof['engine_ms']:.1f}")
    print(f"  engine sampling + log-probs alone on [16, V] logits: {prof['sampling_ms']:.1f} "
          f"(mlx-lm's logsumexp + categorical: {prof['mlx_lm_sampling_ms']:.1f})")
    print(f"  compute floor 2 x params x 16 at the GEMM rate: {prof['compute_floor_ms']:.1f}")
    print(f"  bandwidth floor (weights read once per step): {prof['bandwidth_floor_ms']:.1f}")

    if not hasattr(model.layers[0].mlp, "gate_proj"):
        print("\n(op profile skipped: it expects a dense Llama-style MLP)")
    else:
        print_ops(profile_ops(model, model.args.vocab_size), len(model.layers))

    drop = row_dropping(model, tok, prompts)
    (t_drop, s_drop), (t_keep, s_keep) = drop["drop"], drop["keep"]
    print("\nFinished rows (4 x 4, rows stop at their first '.', max 128 tokens, same seed):")
    print(f"  dropping finished rows: {t_drop:.2f} s, {s_drop.row_steps} row-steps, "
          f"{s_drop.compactions} compactions, {s_drop.completion_tokens} tokens kept")
    print(f"  keeping them in the batch: {t_keep:.2f} s, {s_keep.row_steps} row-steps")
    print(f"  time saved: {(1 - t_drop / t_keep) * 100:.0f}%")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemm_gflops": round(limits["gemm_flops"] / 1e9, 1), "grid": grid,
                       "decode_step_ms": {k: round(v, 2) for k, v in prof.items()},
                       "row_dropping_saved": round(1 - t_drop / t_keep, 3)}, f, indent=2)


if __name__ == "__main__":
    main()
