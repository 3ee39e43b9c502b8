"""Float32 GEMM rate with the fast BLAS path vs MLX's bundled BLAS, in one run.

Each configuration runs in its own subprocess, because the BLAS is chosen when mlx.core loads.
Usage: python bench/bench_gemm.py [--size 1024]
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys
import mlx_rft
from mlx_rft.cpu.blas import blas_status
from mlx_rft.doctor import measure_gemm_gflops
n = int(sys.argv[1])
print(json.dumps({"blas": blas_status().path, "gflops": measure_gemm_gflops(n, repeats=1 if blas_status().path is None else 5)}))
"""


def run(size: int, blas_env: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MLX_RFT_BLAS", None)
    if blas_env is not None:
        env["MLX_RFT_BLAS"] = blas_env
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(size)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--also", nargs="*", default=[], help="extra BLAS library paths to compare")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    fast = run(args.size, None)
    slow = run(args.size, "none")
    rows = [("fast path (auto)", fast), ("MLX bundled BLAS", slow)]
    rows += [(path, run(args.size, path)) for path in args.also]
    for name, r in rows:
        print(f"{name:<24} {r['gflops']:8.1f} GFLOP/s   ({r['blas'] or 'bundled'})")
    print(f"speed-up: {fast['gflops'] / slow['gflops']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"name": name, **r} for name, r in rows], f, indent=2)


if __name__ == "__main__":
    main()
