"""The matrix products of one GRPO step at their own shapes, against the compute floor.

`bench_step.py` states the step time as a multiple of a compute floor: the step's FLOPs divided by
the float32 rate of a 1024^3 GEMM. This benchmark times only the step's matrix products, on the
default model's own weights, at the shapes the step runs them:

  prefill   the B prompts' tokens once (prompt sharing), M = B x prompt tokens
  decode    one product per linear layer and the LM head for each of the completion tokens after
            the first, M = B x G rows (the weights are read from memory at every step)
  training  forward and backward (input and weight gradients) of every linear layer over the
            prompt tokens and the completion tokens; the LM head over the completion tokens, run
            twice forward (its VJP recomputes the logits chunk by chunk) and backward

Nothing else runs (no attention, norms, activations, sampling), so the total is what the step would
cost if everything but the GEMMs were free. Each phase's products are evaluated the way the step
evaluates them (decode: one step's products per evaluation), best of --repeats.

    python bench/bench_step_gemms.py
    python bench/bench_step_gemms.py --prompt-tokens 40 --new-tokens 64 --repeats 3
    python bench/bench_step_gemms.py --blas   # also the decode products straight from the BLAS
"""

from __future__ import annotations

import argparse
import sys

import mlx_rft  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from mlx_rft.doctor import measure_gemm_gflops
from mlx_rft.models import load_model
from timing import best_of


def decode_via_blas(weights: list[mx.array], rows: int, repeats: int) -> dict[str, float] | None:
    """One decode step's products called straight from the loaded BLAS (NumPy copies of the
    weights, no MLX): plain `cblas_sgemm`, and MKL's packed-weight API (`cblas_sgemm_pack` once,
    `cblas_sgemm_compute` per step), which suits small M against weights that do not change.
    Seconds per step, or None when the BLAS lacks the packed API (only MKL has it)."""
    import ctypes

    import numpy as np

    from mlx_rft.cpu.blas import blas_status

    path = blas_status().path
    lib = ctypes.CDLL(path) if path else None
    if lib is None or not hasattr(lib, "cblas_sgemm_compute"):
        return None
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    row_major, no_trans, trans, b_matrix, packed = 101, 111, 112, 162, 151  # cblas enum values
    lib.cblas_sgemm.argtypes = [c_int] * 6 + [c_float, ptr, c_int, ptr, c_int, c_float, ptr, c_int]
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    lib.cblas_sgemm_pack_get_size.argtypes = [c_int] * 4
    lib.cblas_sgemm_pack.argtypes = [c_int] * 6 + [c_float, ptr, c_int, ptr]
    lib.cblas_sgemm_compute.argtypes = [c_int] * 6 + [ptr, c_int, ptr, c_int, c_float, ptr, c_int]
    ws = [np.array(w) for w in weights]
    rng = np.random.default_rng(0)
    xs = {k: rng.normal(size=(rows, k)).astype(np.float32) for k in {w.shape[1] for w in ws}}
    ys = {n: np.zeros((rows, n), np.float32) for n in {w.shape[0] for w in ws}}
    packs = []
    for w in ws:
        n, k = w.shape
        buf = np.empty(lib.cblas_sgemm_pack_get_size(b_matrix, rows, n, k) // 4 + 16, np.float32)
        lib.cblas_sgemm_pack(row_major, b_matrix, trans, rows, n, k, 1.0, w.ctypes.data, k, buf.ctypes.data)
        packs.append(buf)

    def plain():
        for w in ws:
            n, k = w.shape
            lib.cblas_sgemm(row_major, no_trans, trans, rows, n, k, 1.0, xs[k].ctypes.data, k,
                            w.ctypes.data, k, 0.0, ys[n].ctypes.data, n)

    def packed_step():
        for w, buf in zip(ws, packs):
            n, k = w.shape
            lib.cblas_sgemm_compute(row_major, no_trans, packed, rows, n, k, xs[k].ctypes.data, k,
                                    buf.ctypes.data, k, 0.0, ys[n].ctypes.data, n)

    return {"cblas_sgemm": best_of(plain, repeats * 3), "packed": best_of(packed_step, repeats * 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="B distinct prompts")
    ap.add_argument("--group-size", type=int, default=4, help="G completions per prompt")
    ap.add_argument("--prompt-tokens", type=int, default=40, help="tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="completion tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blas", action="store_true",
                    help="also time one decode step's products called straight from the BLAS, plain "
                         "and with MKL's packed-weight API")
    args = ap.parse_args()

    model, _ = load_model(None)
    weights = [m.weight for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = model.lm_head.weight if hasattr(model, "lm_head") else model.model.embed_tokens.weight
    weights = [w for w in weights if w is not head]
    n_rows = args.prompts * args.group_size
    m_prompt = args.prompts * args.prompt_tokens
    m_completion = n_rows * args.new_tokens
    inputs = {}  # one random input per (rows, features), shared by the products of that shape

    def x(m: int, k: int) -> mx.array:
        if (m, k) not in inputs:
            inputs[(m, k)] = mx.random.normal((m, k))
            mx.eval(inputs[(m, k)])
        return inputs[(m, k)]

    def forward(m: int, ws) -> list[mx.array]:
        return [x(m, w.shape[1]) @ w.T for w in ws]

    def backward(m: int, ws) -> list[mx.array]:
        out = []
        for w in ws:
            dy = x(m, w.shape[0])
            out += [dy @ w, dy.T @ x(m, w.shape[1])]
        return out

    def flops(m: int, ws, passes: int) -> float:
        return sum(2.0 * m * w.shape[0] * w.shape[1] for w in ws) * passes

    def training() -> None:
        for m in (m_prompt, m_completion):
            mx.eval(forward(m, weights), backward(m, weights))
        # The LM head runs twice forward: its VJP recomputes the logits chunk by chunk.
        mx.eval(forward(m_completion, [head]), forward(m_completion, [head]),
                backward(m_completion, [head]))

    decode_steps = args.new_tokens - 1  # the first completion token comes from the prefill
    phases = {
        "prefill": (lambda: mx.eval(forward(m_prompt, weights), forward(args.prompts, [head])),
                    flops(m_prompt, weights, 1) + flops(args.prompts, [head], 1), 1),
        "decode": (lambda: mx.eval(forward(n_rows, weights + [head])),
                   flops(n_rows, weights + [head], 1), decode_steps),
        "training": (training,
                     flops(m_prompt + m_completion, weights, 3) + flops(m_completion, [head], 4), 1),
    }
    gemm = measure_gemm_gflops()
    results = {name: (best_of(fn, args.repeats) * times, fl * times)
               for name, (fn, fl, times) in phases.items()}
    gemm = max(gemm, measure_gemm_gflops())  # the host's load varies: the better of two readings
    print(f"# {sum(w.size for w in weights) + head.size:,} weights; B x G = {args.prompts} x "
          f"{args.group_size}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens")
    print(f"float32 GEMM 1024^3: {gemm:.0f} GFLOP/s (the better of a reading before and after)\n")
    print("| phase | GFLOP | time s | GFLOP/s | vs the 1024^3 rate |")
    print("|---|---|---|---|---|")
    for name, (sec, fl) in results.items():
        rate = fl / sec / 1e9
        print(f"| {name} | {fl / 1e9:.1f} | {sec:.2f} | {rate:.0f} | {rate / gemm:.2f}x |")
    total_s = sum(sec for sec, _ in results.values())
    total_flops = sum(fl for _, fl in results.values())
    floor = total_flops / (gemm * 1e9)
    print(f"\nall GEMMs: {total_s:.2f} s for {total_flops / 1e9:.0f} GFLOP; the floor (same FLOPs at "
          f"the 1024^3 rate) is {floor:.2f} s, so the GEMMs alone are {total_s / floor:.2f}x the floor")
    if args.blas:
        via = decode_via_blas(weights + [head], n_rows, args.repeats)
        mlx_step = results["decode"][0] / decode_steps
        if via is None:
            print("\n--blas: the loaded BLAS has no packed-weight API (MKL's cblas_sgemm_compute)")
        else:
            print(f"\none decode step's products (M = {n_rows}): MLX {mlx_step * 1e3:.1f} ms, "
                  f"cblas_sgemm {via['cblas_sgemm'] * 1e3:.1f} ms, MKL packed weights "
                  f"{via['packed'] * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
