"""Restart after crash, as users script it: `mlx-rft train ... --resume auto` in a loop, killed
with SIGKILL or SIGTERM at random moments, must end with the weights of one uninterrupted run.

    python bench/crash_restart.py --kills 20 --seed 1

Builds a tiny random model and a prompt file in a temporary folder, runs the job once without
interruption, then again in a fresh folder under a killer that sends a random signal after a
random delay, restarts with `--resume auto` until the run finishes, and prints the number of
kills of each kind, the max weight difference to the uninterrupted run, and whether every step
is logged exactly once.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REWARD = '''
def digits(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


def train_cmd(model: Path, data: Path, reward: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "mlx_rft", "train", "--model", str(model), "--train-file", str(data),
        "--reward-funcs", f"{reward}:digits", "--output-dir", str(out), "--num-steps", str(steps),
        "--max-new-tokens", "24", "--group-size", "4", "--prompts-per-step", "2", "--eval-size", "4",
        "--lora-rank", "4", "--learning-rate", "1e-2", "--save-every", "3", "--keep-last", "2",
        "--seed", "7", "--progress", "false", "--resume", "auto",
    ]


def final_weights(out: Path) -> dict:
    import mlx_rft  # noqa: F401  (before mlx.core)
    import mlx.core as mx

    root = out / "checkpoints"
    newest = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))[-1]
    return {k: v for k, v in mx.load(str(newest / "adapters.safetensors")).items()}


def logged_steps(out: Path) -> list[int]:
    if not (out / "metrics.jsonl").is_file():
        return []
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by SIGKILL (the resumed run drops it)
            pass
    return [r["step"] for r in rows if "loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="signals to send before letting the run finish")
    p.add_argument("--steps", type=int, default=400, help="training steps of the job")
    p.add_argument("--min-delay", type=float, default=4.0, help="shortest wait before a kill (s)")
    p.add_argument("--max-delay", type=float, default=10.0, help="longest wait before a kill (s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the killer's choices")
    args = p.parse_args()

    from mlx_rft.testing import write_tiny_model

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "model", "qwen3", seed=0)
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Question {i}: say something"}) + "\n" for i in range(40)))
        reward = tmp / "reward.py"
        reward.write_text(REWARD)

        ref = tmp / "reference"
        subprocess.run(train_cmd(model, data, reward, ref, args.steps), check=True, capture_output=True)

        out = tmp / "killed"
        kills = {"SIGKILL": 0, "SIGTERM": 0}
        mid_training = 0  # kills that landed after the start had logged a training step
        exit_codes: dict[int, int] = {}
        starts = 0
        t0 = time.time()
        while True:
            starts += 1
            proc = subprocess.Popen(train_cmd(model, data, reward, out, args.steps),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            logged_before = len(logged_steps(out))
            if sum(kills.values()) < args.kills:
                try:
                    proc.wait(timeout=rng.uniform(args.min_delay, args.max_delay))
                except subprocess.TimeoutExpired:
                    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                    mid_training += len(logged_steps(out)) > logged_before
                    proc.send_signal(sig)
                    kills[sig.name] += 1
            _, err = proc.communicate(timeout=600)
            exit_codes[proc.returncode] = exit_codes.get(proc.returncode, 0) + 1
            if proc.returncode not in (0, 143, -9, 130, -15):
                sys.exit(f"unexpected exit {proc.returncode}:\n{err[-3000:]}")
            if proc.returncode == 0:  # finished: every kill so far was survived
                break

        a, b = final_weights(ref), final_weights(out)
        diff = max(float(abs(a[k] - b[k]).max()) for k in a) if a.keys() == b.keys() else float("inf")
        steps = logged_steps(out)
        print(json.dumps({
            "kills": kills, "kills_during_training": mid_training, "starts": starts,
            "exit_codes": exit_codes,
            "max_weight_difference": diff, "every_step_logged_once": steps == list(range(1, args.steps + 1)),
            "wall_s": round(time.time() - t0, 1),
        }, indent=2))
        if diff > 1e-6 or steps != list(range(1, args.steps + 1)):
            sys.exit(1)


if __name__ == "__main__":
    main()
