"""`mlx-rft export`: fuse trained LoRA/DoRA adapters into full weights (mlx-lm's fuse)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-rft export",
        description="Fuse LoRA/DoRA adapters from a checkpoint into the base weights and write a "
        "standard model folder that `mlx_lm.load` (and `mlx-rft generate --model`) can use.",
    )
    p.add_argument("--adapter-path", required=True, help="checkpoint folder with adapters.safetensors")
    p.add_argument("--model", default=None, help="base model folder (default: the embedded model)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--dequantize", action="store_true", help="write float weights if the base is quantized")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, save

    from .errors import MlxRftError
    from .models import load_model, resolve_model_path

    out = Path(args.out)
    if out.exists():
        raise MlxRftError(f"{out} already exists; choose a new --out folder")
    adapters = Path(args.adapter_path)
    if not (adapters / "adapter_config.json").is_file():
        raise MlxRftError(
            f"{adapters} has no adapter_config.json; pass a LoRA checkpoint folder "
            "(full fine-tuning checkpoints are already complete model folders)"
        )
    base = resolve_model_path(args.model)
    model, tokenizer = load_model(base, adapter_path=adapters)
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if args.dequantize:
        model = dequantize_model(model)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    import json

    config = json.loads((base / "config.json").read_text())
    save(tmp, str(base), model, tokenizer, config, donate_model=False)
    tmp.rename(out)
    print(f"fused {len(fused)} adapter layers into {out}")
