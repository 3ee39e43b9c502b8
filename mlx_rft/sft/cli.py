"""`mlx-rft sft`: supervised fine-tuning on answer tokens (time-series rows or chat rows).

With no arguments it trains a series encoder + projector for the frozen embedded
SmolLM2-135M-Instruct on the UCR dataset ItalyPowerDemand and prints held-out accuracy beside
the 1-nearest-neighbour and majority baselines and the shuffled-series control.
"""

from __future__ import annotations

import argparse

from ..config import add_config_arguments, config_from_args
from .config import SFTConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-rft sft",
        description="Supervised fine-tuning with the loss on answer tokens only. Time-series rows "
        "train an encoder + projector that feed soft tokens into a frozen LLM; chat rows train "
        "LoRA (or full) weights. Precedence: flag > --config YAML > default. With no arguments: "
        "ucr:ItalyPowerDemand on the embedded SmolLM2-135M-Instruct.",
    )
    add_config_arguments(parser, SFTConfig)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, SFTConfig, "sft")
    from .trainer import SFTTrainer

    result = SFTTrainer(cfg).train()
    if result.exit_code:
        raise SystemExit(result.exit_code)
