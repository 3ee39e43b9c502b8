"""`mlx-rft <command>`: lazy dispatch, so `mlx-rft --help` does not import MLX or the models.

Each command module has `build_parser()` and `main(argv)`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("mlx_rft.train.cli", "GRPO-family reinforcement fine-tuning (default: built-in task)"),
    "sft": ("mlx_rft.sft.cli", "supervised fine-tuning: a time-series encoder for a frozen LLM, or chat rows"),
    "eval": ("mlx_rft.evaluate", "score a model or checkpoint on a dataset (pass@1, pass@k)"),
    "generate": ("mlx_rft.generate", "chat generation from a model folder (default: embedded model)"),
    "import-gguf": ("mlx_rft.import_gguf", "convert a GGUF file into a Hugging Face-format folder"),
    "export": ("mlx_rft.export", "fuse LoRA adapters into full weights for sharing"),
    "doctor": ("mlx_rft.doctor", "show backend, BLAS, GEMM speed, versions, default model"),
    "judge-check": ("mlx_rft.rewards.judge_calibrate", "check an LLM judge on its rubric's calibration pairs"),
}


def _usage() -> str:
    lines = ["usage: mlx-rft <command> [options]", "", "commands:"]
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name:<12} {help_text}")
    lines += ["", "Run `mlx-rft <command> --help` for a command's options."]
    return "\n".join(lines)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )


def _fix_hash_seed() -> None:
    """Run the command with a fixed string-hash seed (re-exec, before anything is imported).

    Some task generators (reasoning-gym's) iterate over sets of strings, whose order follows the
    per-process hash seed; with it fixed, a task gives the same rows in every run, so a resumed
    run trains on the data it started on."""
    if os.environ.get("PYTHONHASHSEED") is None:
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "mlx_rft", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the command line (not a call from Python, whose process is the caller's)
        _fix_hash_seed()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"mlx-rft {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mlx-rft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    setup_logging()
    # Importing the package first loads the fast BLAS before mlx.core (see cpu/blas.py).
    import mlx_rft  # noqa: F401

    from .errors import MlxRftError

    module = importlib.import_module(COMMANDS[name][0])
    try:
        module.main(rest)
    except MlxRftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
