"""`mlx-rft import-gguf`: convert a GGUF file into a Hugging Face-format model folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .dtypes import DTYPES
from .gguf import import_gguf
from .models import cache_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-rft import-gguf",
        description="Convert a GGUF file (Llama, Qwen2, Qwen3, Gemma 3; F32/F16/BF16, Q4_0..Q8_0, "
        "K-quants, IQ-quants) into a Hugging Face-format model folder with dequantized weights.",
    )
    p.add_argument("gguf_path", metavar="GGUF_PATH", help="the .gguf file to convert")
    p.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        nargs="?",
        default=None,
        help="folder to write (default: the mlx-rft cache, models/<file stem>)",
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weight dtype to write (default: float32)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir) if args.out_dir else cache_dir() / "models" / Path(args.gguf_path).stem
    start = time.perf_counter()
    path = import_gguf(args.gguf_path, out, dtype=args.dtype, overwrite=args.overwrite)
    config = json.loads((path / "config.json").read_text())
    print(
        f"imported {args.gguf_path} -> {path} ({config['model_type']}, "
        f"{config['num_hidden_layers']} layers, {args.dtype}) in {time.perf_counter() - start:.1f}s"
    )
