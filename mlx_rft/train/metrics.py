"""Where metrics go: console (rich), metrics.jsonl, rollouts.jsonl, TensorBoard, W&B (the HTML
report is `report.py`).

Each reporter has `log(step, metrics)` and `close()`. TensorBoard and W&B are imported only when
asked for, with an install hint if missing.
"""

from __future__ import annotations

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
