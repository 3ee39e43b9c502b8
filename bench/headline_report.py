"""Collect the results `run_headline.sh` left in a folder into its report.md (and print it).

    python bench/headline_report.py runs/headline/20261201T0900Z

Reads the JSON files the benchmarks wrote (missing ones are skipped) and the default job's log.
No MLX import.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path


def _load(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # a log whose last lines are a JSON object (bench_trl.py)
        start = text.rfind("\n{")
        return json.loads(text[start:]) if start >= 0 else None


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def rows(folder: Path) -> list[tuple[str, str, str, str]]:
    """(figure, value, ratio to the peer, where it came from) for each result found."""
    out = []
    for mode, flag in (("plain", ""), ("checkpointed", " --gradient-checkpointing")):
        step, trl = _load(folder, f"step_{mode}.json"), _load(folder, f"trl_{mode}.json")
        if step:
            ours = step.get("step_s_median_after_2", step["step_s_median"])
            peer = _ratio(ours, trl["step_s_median_after_2"]) + " TRL" if trl else ""
            split = step["split_median_s"]
            out.append((f"GRPO step, {mode}, median of steps 3-{step['steps']}",
                        f"{ours:.2f} s (generate {split['generate']:.2f}, update {split['update']:.2f})",
                        peer, f"bench_step.py{flag}"))
            rss_peer = _ratio(step["max_rss_gb"], trl["max_rss_gb"]) + " TRL" if trl else ""
            out.append((f"GRPO step, {mode}: peak MLX / max RSS",
                        f"{step['peak_memory_gb_max']:.2f} / {step['max_rss_gb']:.2f} GB", rss_peer,
                        f"bench_step.py{flag}"))
            if mode == "plain":
                out.append(("GRPO step over its compute floor", f"{step['step_over_floor']:.2f}x",
                            "", "bench_step.py"))
        if trl:
            out.append((f"TRL GRPOTrainer step, {mode}, median of steps 3-{trl['steps']}",
                        f"{trl['step_s_median_after_2']:.2f} s, max RSS {trl['max_rss_gb']:.2f} GB",
                        "", f"bench_trl.py{flag}"))
    rollout = _load(folder, "rollout.json")
    if rollout:
        for cell in rollout["grid"]:
            out.append((f"rollouts {cell['B']} x {cell['G']} x {cell['new_tokens']} tokens",
                        f"{cell['ours_tok_s']:.1f} tok/s",
                        f"{_ratio(cell['ours_tok_s'], cell['batch_generate_tok_s'])} batch_generate, "
                        f"{_ratio(cell['ours_tok_s'], cell['naive_tok_s'])} naive loop",
                        "bench_rollout.py --quick"))
    tokens, torch = _load(folder, "train_tokens.json"), _load(folder, "train_tokens_torch.json")
    if tokens and "ours" in tokens:
        rate = tokens["ours"]["row_tok_s"]
        peers = []
        if torch:
            peers.append(_ratio(rate, next(iter(torch.values()))["row_tok_s"]) + " torch")
        if "plain MLX" in tokens:
            peers.append(_ratio(rate, tokens["plain MLX"]["row_tok_s"]) + " plain MLX")
        out.append(("training forward + backward, 16 x 104 tokens", f"{rate:.1f} row tok/s",
                    ", ".join(peers), "bench_train_tokens.py"))
    gemm = _load(folder, "gemm.json")
    if gemm:
        fast, bundled = gemm[0], gemm[1]
        out.append(("float32 GEMM 1024^3", f"{fast['gflops']:.1f} GFLOP/s ({Path(fast['blas'] or 'bundled').name})",
                    _ratio(fast["gflops"], bundled["gflops"]) + " MLX's bundled BLAS", "bench_gemm.py"))
    log = folder / "default_job.log"
    if log.is_file():
        text = log.read_text()
        evals = re.findall(r"eval (before|after) training:\s*(.*)", text)
        wall = (folder / "default_job.seconds").read_text().strip() if (folder / "default_job.seconds").is_file() else "?"
        value = "; ".join(f"{k}: {v}" for k, v in evals[-2:]) or "no evaluation found in the log"
        minutes = f"{int(wall) // 60} min {int(wall) % 60} s" if wall.isdigit() else wall
        out.append(("default job (held-out accuracy before / after, wall time)", f"{value}; {minutes}", "",
                    "mlx-rft train"))
    return out


def machine() -> str:
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores{mem}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> int:
    folder = Path(sys.argv[1])
    started = (folder / "started").read_text().strip() if (folder / "started").is_file() else "?"
    loads = (folder / "load").read_text().split() if (folder / "load").is_file() else []
    lines = [
        "# Headline figures",
        "",
        f"commit {commit()}; {machine()}; started {started}"
        + (f"; load average {loads[0]} at start, {loads[-1]} at end" if loads else ""),
        "",
        "| figure | value | ratio to the peer | benchmark |",
        "|---|---|---|---|",
    ]
    lines += [f"| {f} | {v} | {r} | `{c}` |" for f, v, r, c in rows(folder)]
    lines += ["", "Ratios are ours over the peer's: below 1 means less time or memory, above 1 a higher rate.",
              "Each benchmark's own output is in this folder (`*.log`, `*.json`)."]
    report = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
