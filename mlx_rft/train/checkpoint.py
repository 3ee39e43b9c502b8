"""Checkpoints that resume exactly, written atomically.

Layout of `<output_dir>/checkpoints/step-0000020/`:
  adapters.safetensors + adapter_config.json   (LoRA/DoRA: `mlx_lm.load(base, adapter_path=...)`)
  or model.safetensors + config.json + tokenizer files (full: `mlx_lm.load(folder)`)
  optimizer.safetensors     flattened optimizer state (moments, step)
  trainer_state.json        step, data sampler position, metrics history length, RNG seeds
  config.yaml               the resolved run config
  collapse_guard.safetensors  the collapse guard's snapshot (last healthy weights and optimizer
                            state), when it is not the checkpoint's own state
Each is built in a hidden temporary folder, fsynced, then renamed into place, so a crash never
leaves a half-written checkpoint; `latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under root, oldest first (by number)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


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
    extra_tensors: dict[str, dict[str, mx.array]] | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically; prune to cfg.keep_last. Returns its path.

    extra_tensors: {name: tensors} written as `<name>.safetensors` (read with load_extra_tensors)."""
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
        for name, tensors in (extra_tensors or {}).items():
            mx.save_safetensors(str(tmp / f"{name}.safetensors"), tensors)
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
    atomic_write_text(root / "latest", final.name + "\n")
    prune(root, cfg.keep_last, keep_path=final)
    return final


def prune(root: Path, keep: int, keep_path: Path) -> None:
    """Delete all but the newest `keep` checkpoints (by step number); never keep_path, the one
    just written."""
    ckpts = [p for _, p in checkpoint_steps(root) if p != keep_path]
    for old in ckpts[: max(len(ckpts) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """'latest' -> the newest complete checkpoint of output_dir; otherwise a checkpoint folder."""
    if resume in ("latest", "auto"):
        root = output_dir / "checkpoints"
        ckpts = checkpoint_steps(root)
        if not ckpts:
            raise MlxRftError(
                f"--resume {resume}: no checkpoint under {root}; start without --resume (or use "
                "--resume auto, which starts fresh when there is none) or pass a checkpoint folder"
            )
        return ckpts[-1][1]  # checkpoints appear by atomic rename, so the newest is complete
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise MlxRftError(
            f"--resume {resume}: not a checkpoint folder (no trainer_state.json); pass "
            "'latest', 'auto' or a folder like runs/x/checkpoints/step-0000020"
        )
    return path


def _corrupt(path: Path, what: str) -> MlxRftError:
    older = [p for _, p in checkpoint_steps(path.parent) if p != path]
    hint = f"resume from the one before it (--resume {older[-1]})" if older else "start a new run"
    return MlxRftError(f"checkpoint {path} is damaged ({what}); delete it and {hint}")


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise _corrupt(path, f"trainer_state.json unreadable: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _corrupt(path, "trainer_state.json has no step")
    return state


def read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise _corrupt(path, f"config.yaml unreadable: {e}") from None
    if not isinstance(saved, dict):
        raise _corrupt(path, "config.yaml holds no mapping")
    return saved


def _load_tensors(path: Path, name: str) -> dict[str, mx.array]:
    try:
        return mx.load(str(path / name))
    except Exception as e:  # truncated or garbage safetensors raise a bare RuntimeError/ValueError
        raise _corrupt(path, f"{name} unreadable: {e}") from None


def load_extra_tensors(path: Path, name: str) -> dict[str, mx.array] | None:
    """The tensors save_checkpoint wrote as `<name>.safetensors`, or None when there are none."""
    if not (path / f"{name}.safetensors").exists():
        return None
    return _load_tensors(path, f"{name}.safetensors")


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict[str, Any]:
    """Restore trainable weights and optimizer state in place; return the trainer state dict.

    Every saved tensor must match the model's by name and shape: adapters must cover exactly the
    trainable parameters, full weights every parameter."""
    state = read_trainer_state(path)
    adapters = (path / "adapters.safetensors").exists()
    weights = _load_tensors(path, "adapters.safetensors" if adapters else "model.safetensors")
    expected = dict(tree_flatten(model.trainable_parameters() if adapters else model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in weights and weights[k].shape != v.shape
    ]
    if missing or extra or shapes:
        problems = [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {extra[:3]}"] * bool(extra)
        problems += [f"shapes {shapes[:3]}"] * bool(shapes)
        raise MlxRftError(
            f"checkpoint {path} does not fit this model's trainable weights ({'; '.join(problems)}); "
            "resume with the model and adapter settings it was saved with"
        )
    model.load_weights(list(weights.items()), strict=not adapters)
    saved = _load_tensors(path, "optimizer.safetensors")
    # Fill a freshly initialised state tree leaf by leaf, so list/dict structure matches exactly.
    optimizer.init(model.trainable_parameters())
    missing = [k for k, _ in tree_flatten(optimizer.state) if k not in saved]
    if missing:
        raise MlxRftError(
            f"{path} optimizer state lacks {missing[:3]}: the checkpoint belongs to a different "
            "model or adapter setup; resume with the config it was saved with"
        )
    bad = [k for k, v in tree_flatten(optimizer.state) if saved[k].shape != v.shape]
    if bad:
        raise MlxRftError(
            f"{path} optimizer state has other shapes for {bad[:3]}: the checkpoint belongs to a "
            "different model or adapter setup; resume with the config it was saved with"
        )
    optimizer.state = tree_map_with_path(lambda k, _: saved[k], optimizer.state)
    mx.eval(model.parameters(), optimizer.state)
    return state
