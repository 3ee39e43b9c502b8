"""The weights under their HF names, written as safetensors shards.

The expected HF parameter names and shapes come from mlx-lm's own model class for the config, and
`gguf.TensorNameMap` maps each of them to its GGUF name -- the inverse is our mapping. Every GGUF
tensor must find a home and every parameter must be filled, or the import fails. llama.cpp
rewrites some tensors on the way in; we undo it: Llama q/k rows are permuted for its interleaved
rotary layout, Gemma 3 norm weights are stored as `w + 1`.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

from ..dtypes import to_mx_dtype
from ..errors import MlxRftError
from .header import GGUFHeader, TensorInfo
from .tensors import tensor_source

MAX_SHARD_BYTES = 5 * 2**30  # HF's and mlx-lm's default shard size


def unpermute_llama_qk(w, n_heads: int):
    """Undo llama.cpp's q/k row permutation (HF's half-split rotary layout -> interleaved pairs).

    llama.cpp stores, per head, rows [0, d/2, 1, d/2+1, ...] of HF's layout; this puts them back.
    Works on weights (rows, in) and biases (rows,) alike.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(rows, *w.shape[1:])


def _fix_tensor(arch: str, gguf_name: str, w, config: dict):
    """Undo what llama.cpp's converter did to this tensor for `arch`."""
    if arch == "llama":
        if ".attn_q." in gguf_name:
            return unpermute_llama_qk(w, config["num_attention_heads"])
        if ".attn_k." in gguf_name:
            return unpermute_llama_qk(w, config["num_key_value_heads"])
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        # Gemma's RMSNorm scales by (1 + w); llama.cpp stores (1 + w) itself.
        return w - 1.0
    return w


def _expected_parameters(config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes for `config`, from mlx-lm's own model class (arrays stay lazy).

    mlx-lm defines each architecture as `Model` and `ModelArgs` in `mlx_lm.models.<model_type>`;
    the model types written here are all under their own names there.
    """
    from mlx.utils import tree_flatten

    try:
        arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    except ImportError as e:
        raise MlxRftError(
            f"the installed mlx-lm cannot build model_type {config['model_type']!r} ({e}); "
            "upgrade it with `pip install -U mlx-lm`"
        ) from e
    model = arch.Model(arch.ModelArgs.from_dict(config))
    params = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    if config["tie_word_embeddings"]:
        params.pop("lm_head.weight", None)
    return params


def _name_map(header: GGUFHeader, expected: dict[str, tuple[int, ...]], n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, by inverting gguf's HF->GGUF TensorNameMap."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == header.architecture)
    table = gguf.get_tensor_name_map(arch_id, n_layers)
    mapping = {}
    for hf_name in expected:
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MlxRftError(f"no GGUF tensor name is known for {hf_name!r}; upgrade the gguf package")
        mapping[gguf_name] = hf_name
    return mapping


def _shard_plan(
    items: list[tuple[TensorInfo, str]], itemsize: int, max_bytes: int
) -> list[list[tuple[TensorInfo, str]]]:
    shards: list[list[tuple[TensorInfo, str]]] = [[]]
    size = 0
    for info, hf_name in items:
        n = math.prod(info.shape) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((info, hf_name))
        size += n
    return shards


def write_weights(
    header: GGUFHeader, config: dict, out: Path, dtype: str, max_shard_bytes: int, prefer_mlx: bool
) -> int:
    """Dequantize, fix up and save the weights shard by shard; returns the parameter count."""
    import mlx.core as mx

    target = to_mx_dtype(dtype)
    arch = header.architecture
    expected = _expected_parameters(config)
    names = _name_map(header, expected, config["num_hidden_layers"])
    items = []
    for info in header.tensors:
        if info.name == "rope_freqs.weight" or info.name.endswith(".attn_rot_embd.weight"):
            continue  # rotary tables: folded into config.rope_scaling / recomputed by the model
        if info.name not in names:
            raise MlxRftError(
                f"{header.path} holds tensor {info.name!r}, which a {arch} model has no place for; "
                "this variant of the architecture is not supported"
            )
        hf_name = names[info.name]
        if info.shape != expected[hf_name]:
            raise MlxRftError(
                f"{header.path}: tensor {info.name!r} has shape {info.shape}, but the config derived "
                f"from the metadata expects {expected[hf_name]} for {hf_name}; the file is inconsistent"
            )
        items.append((info, hf_name))
    missing = sorted(set(expected) - {hf for _, hf in items})
    if missing:
        raise MlxRftError(
            f"{header.path} lacks {len(missing)} weight(s) a {arch} model needs, e.g. {missing[0]!r}; "
            "the file is incomplete"
        )

    source = tensor_source(header, prefer_mlx=prefer_mlx)
    shards = _shard_plan(items, target.size, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for shard, filename in zip(shards, files):
        arrays = {}
        for info, hf_name in shard:
            w = _fix_tensor(arch, info.name, source(info), config)
            if not mx.isfinite(w).all().item():
                raise MlxRftError(
                    f"{header.path}: tensor {info.name!r} holds NaN or infinite values after "
                    "dequantization; the file is corrupt -- download or convert it again"
                )
            w = w.astype(target)
            arrays[hf_name] = w
            weight_map[hf_name] = filename
            total += w.size
        mx.eval(arrays)
        mx.save_safetensors(str(out / filename), arrays, metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total * target.size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total
