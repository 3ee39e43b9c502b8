"""Learning per minute: held-out score against training time, for several `mlx-rft train` variants.

Each variant is the default job (`mlx-rft train` with no arguments) plus its own flags, run with
`--eval-every N` so the held-out curve has points along the way. Training time at an eval point
is the sum of the steps' `time/step` up to it (evaluation time is left out, so the variants are
compared on training work alone); the end-to-end wall time of each run is printed as well.
Variants run one after another, in alternating order over repeats, since the machine's load
moves absolute times.

    .venv/bin/python bench/learning_speed.py                      # plain vs --dynamic-sampling
    .venv/bin/python bench/learning_speed.py --variant "lr1e-4=--learning-rate 1e-4" --repeats 2
    .venv/bin/python bench/learning_speed.py --report runs/learning_speed   # re-read finished runs

Prints, per run: the held-out score at each eval step with the training minutes reached, the
minutes to reach the target score (default: the plain run's final score), and the final score.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_VARIANTS = {"plain": "", "dynamic": "--dynamic-sampling true"}


def run_variant(name: str, flags: str, out: Path, eval_every: int, extra: str) -> float:
    cmd = [
        sys.executable, "-m", "mlx_rft", "train", "--output-dir", str(out), "--overwrite", "true",
        "--eval-every", str(eval_every), *shlex.split(flags), *shlex.split(extra),
    ]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    if code not in (0, 3):  # 3: the run ended early with nothing to learn (its curve still counts)
        raise SystemExit(f"[{name}] failed with exit code {code}")
    return time.perf_counter() - t0


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training minutes so far, eval/accuracy) at every eval point, step 0 included."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds, out, seen = 0.0, [], set()
    for r in rows:
        if "time/step" in r:
            seconds += r["time/step"]
        if "eval/accuracy" in r and r["step"] not in seen:
            seen.add(r["step"])
            out.append((r["step"], seconds / 60, r["eval/accuracy"]))
    return out


def minutes_to(points: list[tuple[int, float, float]], target: float) -> float | None:
    return next((m for _, m, acc in points if acc >= target - 1e-9), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a variant of the default job (repeatable); default: plain and dynamic")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--extra", default="", help="flags added to every variant, e.g. '--num-steps 30'")
    ap.add_argument("--out", type=Path, default=Path("runs/learning_speed"))
    ap.add_argument("--target", type=float, default=None, help="score to reach (default: plain's final)")
    ap.add_argument("--report", type=Path, default=None, help="only read the runs under this folder")
    args = ap.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else dict(DEFAULT_VARIANTS)

    root = args.report or args.out
    wall: dict[str, float] = {}
    if args.report is None:
        names = list(variants)
        for rep in range(args.repeats):
            for name in names if rep % 2 == 0 else names[::-1]:
                key = f"{name}-{rep}"
                wall[key] = run_variant(name, variants[name], root / key, args.eval_every, args.extra)
    runs = sorted(p for p in root.iterdir() if (p / "metrics.jsonl").exists())
    curves = {p.name: curve(p) for p in runs}
    curves = {k: c for k, c in curves.items() if c}  # a run still before its first evaluation
    plain = [c for k, c in curves.items() if k.startswith("plain")]
    target = args.target if args.target is not None else (
        sum(c[-1][2] for c in plain) / len(plain) if plain else None
    )
    summary = {}
    for name, points in curves.items():
        reach = None if target is None else minutes_to(points, target)
        summary[name] = {
            "points": points, "final": points[-1][2], "train_minutes": points[-1][1],
            "minutes_to_target": reach, "wall_minutes": wall.get(name, float("nan")) / 60,
        }
        shown = "  ".join(f"s{s}:{acc:.3f}@{m:.1f}m" for s, m, acc in points)
        print(f"{name:>14}: final {points[-1][2]:.3f} after {points[-1][1]:.1f} training min; "
              f"target {target if target is None else round(target, 3)} reached at "
              f"{'never' if reach is None else f'{reach:.1f} min'}\n{'':>16}{shown}")
    (root / "summary.json").write_text(json.dumps({"target": target, "runs": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
