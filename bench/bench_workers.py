"""Separate rollout workers against the synchronous run: steps per hour, overlap, held-out gain.

Runs the default job (`mlx-rft train`) in several modes, one after another (alternating order
over repeats, since the host's load moves absolute times):

    sync   one process on every core: generate, then update (today's run)
    k0     2 ranks on a ring: 1 rollout worker + 1 trainer, --max-staleness 0 (the sync run's maths)
    k1     the same with --max-staleness 1: the worker makes step s+1's rollouts while step s trains

The two ranks get OPENBLAS_NUM_THREADS=1 (one core each on a 2-core machine); `sync` keeps
every core. Per run it prints steps per hour over the steps after the first 3, and each role's busy
time over that wall time (the trainer: its step time minus its wait for rollouts; the worker:
generation and rewards), from metrics.jsonl.

    .venv/bin/python bench/bench_workers.py --num-steps 12 --eval-size 8        # speed
    .venv/bin/python bench/bench_workers.py --modes sync,k1 --num-steps 60     # held-out gain
    .venv/bin/python bench/bench_workers.py --report runs/bench_workers          # re-read runs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3
MODES = {
    "sync": [],
    "k0": ["--rollout-workers", "1", "--max-staleness", "0"],
    "k1": ["--rollout-workers", "1", "--max-staleness", "1"],
    "k1tis": ["--rollout-workers", "1", "--max-staleness", "1", "--off-policy-correction", "tis"],
}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_ranks(cmd: list[str], n: int, env: dict[str, str]) -> int:
    """The n ranks of a ring on 127.0.0.1, started as `mlx.launch -n n --backend ring` starts
    them (MLX_RANK and an MLX_HOSTFILE of one address per rank). mlx.launch itself is not used
    here: its output relay polls the ranks' pipes without pause, one core per rank, which on a
    2-core machine would take the cores being measured."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in free_ports(n)], f)
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": f.name})
        for r in range(n)
    ]
    codes = [p.wait() for p in procs]
    os.unlink(f.name)
    return max(codes, key=abs)


def run(mode: str, out: Path, extra: list[str]) -> float:
    flags = ["--output-dir", str(out), "--overwrite", "true", "--progress", "false", *MODES[mode], *extra]
    cmd = [sys.executable, "-m", "mlx_rft", "train", *flags]
    print(f"[{mode}] {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    if mode == "sync":
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    else:  # one core each
        code = start_ranks(cmd, 2, {**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    if code != 0:
        raise SystemExit(f"[{mode}] failed with exit code {code}")
    return time.perf_counter() - t0


def summarise(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The first steps compile, and with rollout workers their rollouts were made while the
    # trainer evaluated: the steady state starts after WARMUP steps.
    steps = [r for r in rows if "time/step" in r][WARMUP:]
    wall = sum(r["time/step"] for r in steps)
    wait = sum(r.get("time/wait", 0.0) for r in steps)
    out = {
        "steps": len(steps) + WARMUP,
        "steps_per_hour": 3600 * len(steps) / wall,
        "step_s": wall / len(steps),
        "generate_s": sum(r["time/generate"] + r["time/reward"] for r in steps) / len(steps),
        "update_s": sum(r["time/update"] for r in steps) / len(steps),
        "trainer_busy": (wall - wait) / wall,
    }
    if any("time/worker_busy" in r for r in steps):
        out["worker_busy"] = sum(r["time/worker_busy"] for r in steps) / wall
        out["staleness"] = sum(r["async/staleness"] for r in steps) / len(steps)
    evals = [r for r in rows if "eval/accuracy" in r]
    if evals:
        out["eval_before"], out["eval_after"] = evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]
        out["constant_baseline"] = evals[-1].get("eval/constant_baseline", float("nan"))
    return out


def show(name: str, s: dict[str, float], seconds: float | None = None) -> None:
    parts = [f"{s['steps_per_hour']:.0f} steps/h ({s['step_s']:.2f} s/step: generate {s['generate_s']:.2f}, "
             f"update {s['update_s']:.2f})", f"trainer busy {s['trainer_busy']:.0%}"]
    if "worker_busy" in s:
        parts += [f"worker busy {s['worker_busy']:.0%}", f"staleness {s['staleness']:.2f}"]
    if "eval_after" in s:
        parts.append(f"held-out {s['eval_before']:.3f} -> {s['eval_after']:.3f} (constant {s['constant_baseline']:.3f})")
    if seconds is not None:
        parts.append(f"wall {seconds / 60:.1f} min")
    print(f"{name}: " + "; ".join(parts), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="sync,k0,k1", help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--num-steps", type=int, default=12)
    ap.add_argument("--eval-size", type=int, default=None, help="held-out prompts (default: the job's)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_workers")
    ap.add_argument("--report", default=None, help="print the summaries of the runs in this folder")
    args, extra = ap.parse_known_args()
    if args.report:
        for d in sorted(Path(args.report).iterdir()):
            if (d / "metrics.jsonl").exists():
                show(d.name, summarise(d))
        return
    extra = ["--num-steps", str(args.num_steps), *extra]
    if args.eval_size:
        extra += ["--eval-size", str(args.eval_size)]
    modes = args.modes.split(",")
    for rep in range(args.repeats):
        order = modes if rep % 2 == 0 else modes[::-1]
        for mode in order:
            out = Path(args.out) / f"{mode}-{rep}"
            seconds = run(mode, out, extra)
            show(out.name, summarise(out), seconds)


if __name__ == "__main__":
    main()
