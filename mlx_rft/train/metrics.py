"""Where metrics go: console (rich), metrics.jsonl, rollouts.jsonl, TensorBoard, W&B, an HTML report.

Each reporter has `log(step, metrics)` and `close()`. TensorBoard and W&B are imported only when
asked for, with an install hint if missing.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from ..errors import MlxRftError


class JsonlReporter:
    def __init__(self, path: Path, append: bool = False):
        self.file = open(path, "a" if append else "w")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardReporter:
    def __init__(self, logdir: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise MlxRftError(
                "report_to tensorboard needs tensorboardX: `pip install tensorboardX`"
            ) from e
        self.writer = SummaryWriter(str(logdir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, project: str, config: dict, run_dir: Path):
        try:
            import wandb
        except ImportError as e:
            raise MlxRftError("report_to wandb needs wandb: `pip install wandb`") from e
        self.run = wandb.init(project=project, config=config, dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


def build_reporters(report_to: list[str], run_dir: Path, config: dict, append: bool) -> list:
    reporters: list = [JsonlReporter(run_dir / "metrics.jsonl", append=append)]
    if "tensorboard" in report_to:
        reporters.append(TensorBoardReporter(run_dir / "tensorboard"))
    if "wandb" in report_to:
        reporters.append(WandbReporter(config.get("wandb_project", "mlx-rft"), config, run_dir))
    return reporters


def format_step_line(step: int, total: int, m: dict[str, Any]) -> str:
    """One compact console line per step."""

    def g(key, fmt="{:.3f}"):
        v = m.get(key)
        return "-" if v is None else fmt.format(v)

    return (
        f"step {step}/{total}  reward {g('reward/mean')}±{g('reward/std')}  "
        f"loss {g('loss', '{:.4f}')}  kl {g('kl', '{:.4f}')}  clip {g('clip/region_frac', '{:.2f}')}  "
        f"len {g('completion/mean_length', '{:.1f}')}  zero-std {g('frac_zero_std_groups', '{:.2f}')}  "
        f"gen {g('tokens_per_sec/generate', '{:.0f}')} tok/s  "
        f"time {g('time/step', '{:.1f}')}s (gen {g('time/generate', '{:.1f}')} "
        f"rew {g('time/reward', '{:.2f}')} lp {g('time/logprobs', '{:.1f}')} "
        f"upd {g('time/update', '{:.1f}')})"
    )


def _svg_plot(title: str, points: list[tuple[int, float]], width=420, height=180) -> str:
    pts = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
    if not pts:
        return f"<div><h3>{html.escape(title)}</h3><p>no data</p></div>"
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    # A flat line gets a unit-wide axis; at magnitudes like 1e300, y + 1 == y, so widen by |y|.
    y0, y1 = min(ys), max(ys)
    if not y1 - y0 > 0:
        y1 = y0 + max(1.0, abs(y0))
    pad = 30

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"/>' for x, y in pts)
    return (
        f"<div><h3>{html.escape(title)}</h3><svg width='{width}' height='{height}' "
        f"style='background:#fafafa;border:1px solid #ddd'>"
        f"<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{poly}'/>{dots}"
        f"<text x='2' y='{pad - 10}' font-size='11'>{y1:.3g}</text>"
        f"<text x='2' y='{height - pad + 4}' font-size='11'>{y0:.3g}</text>"
        f"<text x='{pad}' y='{height - 8}' font-size='11'>step {x0}</text>"
        f"<text x='{width - pad - 40}' y='{height - 8}' font-size='11'>step {x1}</text>"
        f"</svg></div>"
    )


def write_report(run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """A self-contained HTML page with reward, eval accuracy, length and KL over steps."""
    charts = [
        ("reward (mean)", "reward/mean"),
        ("eval accuracy", "eval/accuracy"),
        ("completion length (mean tokens)", "completion/mean_length"),
        ("KL to reference", "kl"),
        ("loss", "loss"),
        ("step time (s)", "time/step"),
    ]
    body = "".join(
        _svg_plot(title, [(h["step"], h.get(key)) for h in history if key in h]) for title, key in charts
    )
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items()
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>mlx-rft run report</title>"
        "<style>body{font-family:sans-serif;margin:2em} .g{display:flex;flex-wrap:wrap;gap:1em}"
        "td{padding:2px 8px;border-bottom:1px solid #eee}</style>"
        f"<h1>mlx-rft run report</h1><table>{rows}</table><div class='g'>{body}</div>"
    )
    path = run_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)  # a reader (or a crash) never sees half a report
    return path
