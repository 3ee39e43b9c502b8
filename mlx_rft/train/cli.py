"""`mlx-rft train`: GRPO-family training from flags and/or a YAML config.

With no arguments it trains the embedded SmolLM2-135M-Instruct with LoRA on the built-in task and
prints the held-out score before and after.
"""

from __future__ import annotations

import argparse

from ..config import add_config_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-rft train",
        description="Reinforcement fine-tuning (GRPO, DAPO, Dr. GRPO, GSPO, CISPO...) of a language "
        "model. Precedence: flag > --config YAML > default. With no arguments: LoRA on the "
        "embedded SmolLM2-135M-Instruct and the built-in task.",
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)  # validated before anything heavy loads
    from rich.console import Console

    from .console import RunConsole
    from .trainer import GRPOTrainer

    # Live bars when cfg.progress and stdout is a terminal; plain lines in logs and CI.
    result = GRPOTrainer(cfg, console=RunConsole(Console(), progress=cfg.progress)).train()
    # Stopped by Ctrl-C or SIGTERM after saving: 130 / 143; ended early with nothing to learn: 3.
    if result.exit_code:
        raise SystemExit(result.exit_code)
