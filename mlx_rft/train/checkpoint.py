"""Checkpoints that resume exactly, written atomically.

Layout of `<output_dir>/checkpoints/step-0000020/`:
  adapters.safetensors + adapter_config.json   (LoRA/DoRA: `mlx_lm.load(base, adapter_path=...)`)
  or model.safetensors + config.json + tokenizer files (full: `mlx_lm.load(folder)`)
  optimizer.safetensors     flattened optimizer state (moments, step)
  trainer_state.json        step, data sampler position, metrics history length, RNG seeds
  config.yaml               the resolved run config
Each is built in a hidden temporary folder, fsynced, then renamed into place, so a crash never
leaves a half-written checkpoint; `latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from ..config import GRPOConfig, save_config
from ..errors import MlxRftError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer,
    cfg: GRPOConfig,
    state: dict[str, Any],
    *,
    adapter_cfg: dict | None,
    base_model_dir: Path,
) -> Path:
    """Write checkpoint `step` under `root` atomically; prune to cfg.keep_last. Returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        trainable = dict(tree_flatten(model.trainable_parameters()))
        if adapter_cfg is not None:
            mx.save_safetensors(str(tmp / "adapters.safetensors"), trainable)
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
        else:
            weights = dict(tree_flatten(model.parameters()))
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
            shutil.copy2(base_model_dir / "config.json", tmp / "config.json")
            for name in TOKENIZER_FILES:
                if (base_model_dir / name).exists():
                    shutil.copy2(base_model_dir / name, tmp / name)
        opt_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        save_config(cfg, tmp / "config.yaml")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(root / "latest", final.name + "\n")
    _prune(root, cfg.keep_last)
    return final


def _prune(root: Path, keep: int) -> None:
    ckpts = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """'latest' -> the newest complete checkpoint of output_dir; otherwise a checkpoint folder."""
    if resume == "latest":
        root = output_dir / "checkpoints"
        pointer = root / "latest"
        if pointer.is_file():
            path = root / pointer.read_text().strip()
            if path.is_dir():
                return path
        ckpts = sorted(p for p in root.glob("step-*") if p.is_dir())
        if not ckpts:
            raise MlxRftError(
                f"--resume latest: no checkpoint under {root}; start without --resume or pass "
                "a checkpoint folder"
            )
        return ckpts[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise MlxRftError(
            f"--resume {resume}: not a checkpoint folder (no trainer_state.json); pass "
            "'latest' or a folder like runs/x/checkpoints/step-0000020"
        )
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict[str, Any]:
    """Restore trainable weights and optimizer state in place; return the trainer state dict."""
    weights_file = path / "adapters.safetensors"
    if not weights_file.exists():
        weights_file = path / "model.safetensors"
    weights = mx.load(str(weights_file))
    if weights_file.name == "adapters.safetensors":
        model.load_weights(list(weights.items()), strict=False)
    else:
        model.load_weights(list(weights.items()), strict=True)
    saved = mx.load(str(path / "optimizer.safetensors"))
    # Fill a freshly initialised state tree leaf by leaf, so list/dict structure matches exactly.
    optimizer.init(model.trainable_parameters())
    missing = [k for k, _ in tree_flatten(optimizer.state) if k not in saved]
    if missing:
        raise MlxRftError(
            f"{path} optimizer state lacks {missing[:3]}: the checkpoint belongs to a different "
            "model or adapter setup; resume with the config it was saved with"
        )
    optimizer.state = tree_map_with_path(lambda k, _: saved[k], optimizer.state)
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((path / "trainer_state.json").read_text())
