"""`import_gguf`: a GGUF file to a Hugging Face folder, written aside and renamed into place."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from ..dtypes import DTYPES
from ..errors import MlxRftError
from .config import hf_config
from .header import read_gguf_header
from .tensors import check_quant_types
from .tokenizer import tokenizer_files
from .weights import MAX_SHARD_BYTES, write_weights

logger = logging.getLogger(__name__)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    prefer_mlx: bool = True,
) -> Path:
    """Convert `gguf_path` into a Hugging Face-format folder at `out_dir` and return `out_dir`.

    dtype: float32 | bfloat16 | float16 for the written weights.
    overwrite: replace an existing non-empty `out_dir` (otherwise that is an error).
    max_shard_bytes: split the weights into `model-0000i-of-0000n.safetensors` above this size.
    prefer_mlx: dequantize through `mx.load` when the file allows it (exact and faster); False
        forces the `gguf` package's NumPy dequantizers for every tensor.
    """
    if dtype not in DTYPES:
        raise MlxRftError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    header = read_gguf_header(gguf_path)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise MlxRftError(f"output path {out} is a file; pass a folder path for the imported model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MlxRftError(
            f"{out} already exists and is not empty; pass --overwrite to replace it, or another OUT_DIR"
        )
    config = hf_config(header, dtype)
    check_quant_types(header)
    tokenizer_json, tokenizer_config = tokenizer_files(header)

    start = time.perf_counter()
    logger.info("importing %s (%s) into %s ...", header.path.name, header.architecture, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        n_params = write_weights(header, config, tmp, dtype, max_shard_bytes, prefer_mlx)
        _write_json(tmp / "config.json", config)
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        generation = {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        }
        _write_json(
            tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None}
        )
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug(
        "imported %s (%s, %.1fM parameters, %s) into %s in %.1fs",
        header.path.name,
        header.architecture,
        n_params / 1e6,
        dtype,
        out,
        time.perf_counter() - start,
    )
    return out


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder `tmp` into place at `out` (renames are atomic on one filesystem)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists() and not overwrite:
        # Only reachable in a race: another import into `out` finished while this one ran (e.g. two
        # processes importing the default model on first use). Theirs is complete; keep it.
        logger.warning("%s was created by another process during this import; keeping it", out)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError as e:
        if old is not None:
            old.rename(out)
        raise MlxRftError(f"could not move the imported model into {out} ({e})") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
