"""Import a GGUF file (llama.cpp's format) as a standard Hugging Face model folder.

`import_gguf(gguf_path, out_dir)` writes `config.json`, `model.safetensors` (dequantized, HF tensor
names), `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`, so the folder loads
with `mlx_lm.load`, `mlx_rft.models.load_model` and transformers' `AutoConfig`/`AutoTokenizer`.

How the pieces are recovered:

* Metadata and the tensor table come from a small header parser here (the `gguf` package's reader
  turns every vocabulary entry into several NumPy objects and takes seconds on a 49k vocabulary).
* Weights: files holding only F32/F16/Q4_0/Q4_1/Q8_0 go through `mx.load`, which returns quantized
  triples that `mx.dequantize` expands (with float32 scales, so the result is exact); anything else
  (K-quants, Q5_x, IQ*, BF16) goes through `gguf.quants.dequantize` on a memory map of the file.
* Names: the expected HF parameter names and shapes come from mlx-lm's own model class for the
  config, and `gguf.TensorNameMap` maps each of them to its GGUF name -- the inverse is our mapping.
  Every GGUF tensor must find a home and every parameter must be filled, or the import fails.
* llama.cpp rewrites some tensors on the way in; we undo it: Llama q/k rows are permuted for its
  interleaved rotary layout, Gemma 3 norm weights are stored as `w + 1`.
* The tokenizer is rebuilt from `tokenizer.ggml.*`: byte-level BPE directly with `tokenizers` (with
  the pre-tokenizer named by `tokenizer.ggml.pre`), sentencepiece vocabularies via transformers'
  GGUF converter.

The output is written into a temporary sibling folder and renamed into place, so a failed or
interrupted import leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import mmap
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MlxRftError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "qwen2", "qwen3")

# HF model_type and class for each supported GGUF architecture.
_HF_MODEL = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32  # llama.cpp's default when general.alignment is absent
MAX_SHARD_BYTES = 5 * 2**30  # HF's and mlx-lm's default shard size

# ggml type ids (gguf.GGMLQuantizationType values) that `mx.load` dequantizes exactly. BF16 is left
# out on purpose: mx.load converts it to float16, which loses range and precision.
_F32, _F16, _Q4_0, _Q4_1, _Q8_0, _BF16, _F64 = 0, 1, 2, 3, 8, 30, 28
_MLX_LOADABLE = {_F32, _F16, _Q4_0, _Q4_1, _Q8_0}

# GGUF metadata value types (gguf.GGUFValueType) -> struct format; 8 = string and 9 = array are special.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_DTYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6

# tokenizer.ggml.token_type values (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Chat-turn terminators that llama.cpp treats as end-of-generation when the template uses them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as in the models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt-2", "gpt2", "starcoder", "refact", "olmo", "jais", "exaone")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")


# ----------------------------------------------------------------------------------------------
# Reading the file
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file, as its header describes it."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # row-major (NumPy/HF order): the GGUF dims reversed, e.g. (out, in)
    ggml_type: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file
    nbytes: int  # stored size in bytes

    @property
    def type_name(self) -> str:
        return _ggml_type_name(self.ggml_type)


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata and tensor table (no tensor data)."""

    path: Path
    version: int
    metadata: dict[str, Any]  # key -> int | float | bool | str | list
    tensors: tuple[TensorInfo, ...]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str, default: Any = None) -> Any:
        """Metadata under the architecture prefix, e.g. arch_key("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


def _ggml_type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


class _Cursor:
    """Sequential little-endian reads from a memory-mapped GGUF header."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.unpack("<Q")
        end = self.pos + length
        if end > len(self.buf):
            raise struct.error("string runs past the end of the file")
        text = self.buf[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<IQ")
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            if item_type in _NUMPY_DTYPES:
                # Numeric arrays (token types, scores) can be long: read them in one go.
                dtype = np.dtype(_NUMPY_DTYPES[item_type])
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                if item_type == _FLOAT32:
                    return values.astype(np.float64).tolist()
                return values.tolist()
            if item_type == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise ValueError(f"unknown array item type {item_type}")
        if value_type in _SCALAR_FORMATS:
            value = self.unpack(_SCALAR_FORMATS[value_type])
            # f32 values (epsilons, rope bases) as their shortest decimal, e.g. 1e-05, not 9.99e-06.
            return float(str(np.float32(value))) if value_type == _FLOAT32 else value
        raise ValueError(f"unknown metadata value type {value_type}")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table; raises MlxRftError for a bad or missing file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MlxRftError(f"GGUF file {str(path)!r} does not exist; pass the path of a .gguf model file")
    if not path.is_file():
        raise MlxRftError(f"{str(path)!r} is not a file; pass the path of a .gguf model file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise MlxRftError(
                f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                "pass a .gguf model file such as one from llama.cpp or a Hugging Face *-GGUF repo"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            cur.pos = 4
            try:
                version = cur.unpack("<I")
                if version not in (2, 3):
                    raise MlxRftError(
                        f"{path} is GGUF version {version}; only versions 2 and 3 can be read. "
                        "Re-convert it with a current llama.cpp"
                    )
                tensor_count, kv_count = cur.unpack("<QQ")
                metadata: dict[str, Any] = {}
                for _ in range(kv_count):
                    key = cur.string()
                    metadata[key] = cur.value(cur.unpack("<I"))
                raw = []
                for _ in range(tensor_count):
                    name = cur.string()
                    n_dims = cur.unpack("<I")
                    dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
                    cur.pos += 8 * n_dims
                    ggml_type, offset = cur.unpack("<IQ")
                    raw.append((name, tuple(reversed(dims)), ggml_type, offset))
            except (struct.error, ValueError, UnicodeDecodeError, OverflowError) as e:
                raise MlxRftError(
                    f"{path} is truncated or corrupt ({e}); download or convert it again"
                ) from e
            alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
            data_start = (cur.pos + alignment - 1) // alignment * alignment

    tensors = []
    for name, shape, ggml_type, offset in raw:
        nbytes = _stored_nbytes(path, name, shape, ggml_type)
        start = data_start + offset
        if start + nbytes > size:
            raise MlxRftError(
                f"{path} is truncated: tensor {name!r} ends at byte {start + nbytes} but the file "
                f"has {size}; download or convert it again"
            )
        tensors.append(TensorInfo(name, shape, ggml_type, start, nbytes))
    return GGUFHeader(path, version, metadata, tuple(tensors))


def _stored_nbytes(path: Path, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise MlxRftError(
            f"{path} holds tensor {name!r} in unknown ggml type {ggml_type}; this gguf package "
            "version cannot read it -- upgrade it with `pip install -U gguf`"
        ) from None
    n = math.prod(shape)
    if shape and shape[-1] % block:
        raise MlxRftError(
            f"{path} is corrupt: tensor {name!r} row length is not a whole number of blocks"
        )
    return n // block * type_size


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def _check_quant_types(header: GGUFHeader) -> None:
    """Fail early, naming the tensor, if some tensor's type cannot be dequantized here."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    def readable(type_id: int) -> bool:
        if type_id in (_F32, _F16, _BF16, _F64):
            return True
        qtype = GGMLQuantizationType(type_id)
        try:  # probe the gguf package's dequantizer with one all-zero block
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            return False
        return True

    for type_id in sorted({t.ggml_type for t in header.tensors}):
        if not readable(type_id):
            bad = next(t for t in header.tensors if t.ggml_type == type_id)
            raise MlxRftError(
                f"{header.path}: tensor {bad.name!r} is stored as {bad.type_name}, which cannot be "
                "dequantized here; use a GGUF with another quantization, e.g. Q4_K_M, Q8_0 or F16"
            )


def _numpy_tensor(data: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Dequantize one tensor from the file's memory map to float32 (or float64 for F64)."""
    raw = data[info.offset : info.offset + info.nbytes]
    if info.ggml_type == _F32:
        return raw.view(np.float32).reshape(info.shape)
    if info.ggml_type == _F16:
        return raw.view(np.float16).reshape(info.shape).astype(np.float32)
    if info.ggml_type == _BF16:
        # bfloat16 is the top half of a float32.
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
    if info.ggml_type == _F64:
        return raw.view(np.float64).reshape(info.shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows = math.prod(info.shape[:-1])
    return dequantize(raw.reshape(rows, -1), GGMLQuantizationType(info.ggml_type)).reshape(info.shape)


def _tensor_source(header: GGUFHeader, *, prefer_mlx: bool = True) -> Callable[[TensorInfo], Any]:
    """A function returning each tensor as a float32 `mx.array` in its HF (row-major) shape."""
    import mlx.core as mx

    if prefer_mlx and all(t.ggml_type in _MLX_LOADABLE for t in header.tensors):
        loaded = mx.load(str(header.path))

        def from_mlx(info: TensorInfo):
            base = info.name.removesuffix(".weight")
            if info.ggml_type in (_F32, _F16):
                return loaded[info.name].astype(mx.float32).reshape(info.shape)
            w, scales, biases = loaded[info.name], loaded[f"{base}.scales"], loaded[f"{base}.biases"]
            group_size = info.shape[-1] // scales.shape[-1]
            bits = w.shape[-1] * 32 // info.shape[-1]
            # float32 scales/biases: dequantizing with mx.load's float16 ones rounds the output.
            out = mx.dequantize(
                w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits
            )
            return out.reshape(info.shape)

        return from_mlx

    data = np.memmap(header.path, dtype=np.uint8, mode="r")

    def from_numpy(info: TensorInfo):
        return mx.array(_numpy_tensor(data, info).astype(np.float32, copy=False))

    return from_numpy


def iter_tensors(
    gguf_path: str | os.PathLike, names: Collection[str] | None = None, *, prefer_mlx: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 NumPy array in row-major shape) for each tensor (or those in `names`).

    No llama.cpp fix-ups are undone: this is the stored content, dequantized, for inspection and tests.
    """
    header = read_gguf_header(gguf_path)
    _check_quant_types(header)
    source = _tensor_source(header, prefer_mlx=prefer_mlx)
    for info in header.tensors:
        if names is None or info.name in names:
            yield info.name, np.array(source(info))


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


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def _require(header: GGUFHeader, key: str) -> Any:
    value = header.arch_key(key)
    if value is None:
        raise MlxRftError(
            f"{header.path} lacks metadata {header.architecture}.{key}; the file is incomplete -- "
            "convert it again with a current llama.cpp"
        )
    if isinstance(value, list):
        raise MlxRftError(
            f"{header.path}: {header.architecture}.{key} varies per layer, which the "
            f"{header.architecture} importer does not support"
        )
    return value


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover HF's `rope_scaling` from llama.cpp's `rope_freqs` tensor (Llama 3.1+ models).

    llama.cpp stores the per-frequency wavelength multipliers instead of the parameters. The factor is
    their maximum; the other three parameters are found among the values Meta has used by checking
    which reproduce the stored multipliers.
    """
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    for original in (8192, 4096, 2048, 16384, 32768, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            smooth = (original / wavelen - low) / (high - low)
            expected = np.where(
                wavelen < original / high,
                1.0,
                np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
            )
            if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-4, atol=1e-6):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise MlxRftError(
        "the GGUF's rope_freqs tensor matches no Llama 3 rope scaling; this rope scaling is not "
        "supported -- import the original Hugging Face checkpoint instead"
    )


def _metadata_rope_scaling(header: GGUFHeader) -> dict | None:
    kind = header.arch_key("rope.scaling.type")
    factor = header.arch_key("rope.scaling.factor")
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        original = header.arch_key("rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if header.arch_key(f"rope.scaling.{key}") is not None:
                scaling[hf_key] = float(header.arch_key(f"rope.scaling.{key}"))
        return scaling
    raise MlxRftError(
        f"{header.path} uses rope scaling {kind!r}, which the importer does not support "
        "(supported: linear, yarn, Llama 3)"
    )


def _special_ids(header: GGUFHeader) -> dict[str, int | None]:
    meta = header.metadata
    return {
        "bos": meta.get("tokenizer.ggml.bos_token_id"),
        "eos": meta.get("tokenizer.ggml.eos_token_id"),
        "unk": meta.get("tokenizer.ggml.unknown_token_id"),
        "pad": meta.get("tokenizer.ggml.padding_token_id"),
        "eot": meta.get("tokenizer.ggml.eot_token_id"),
        "eom": meta.get("tokenizer.ggml.eom_token_id"),
    }


def _eos_ids(header: GGUFHeader) -> list[int]:
    """EOS plus the end-of-turn/message tokens generation should also stop at."""
    ids = _special_ids(header)
    tokens = header.metadata.get("tokenizer.ggml.tokens") or []
    types = header.metadata.get("tokenizer.ggml.token_type") or []
    template = header.metadata.get("tokenizer.chat_template") or ""
    out = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind == _CONTROL and text in _END_OF_TURN_TOKENS and text in template:
            out.append(i)
    return list(dict.fromkeys(out))


def hf_config(header: GGUFHeader, dtype: str = "float32") -> dict:
    """The HF `config.json` dict for the model in `header` (one of SUPPORTED_ARCHITECTURES)."""
    arch = header.architecture
    if arch not in _HF_MODEL:
        raise MlxRftError(
            f"{header.path} is a {arch or 'unknown'!r} model; the GGUF importer supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Use the original Hugging Face checkpoint instead"
        )
    if int(header.metadata.get("split.count", 1)) > 1:
        raise MlxRftError(
            f"{header.path} is one part of a split GGUF; merge the parts first with "
            "`llama-gguf-split --merge FIRST_PART.gguf merged.gguf` and import merged.gguf"
        )
    model_type, hf_class = _HF_MODEL[arch]
    names = {t.name for t in header.tensors}
    embed = header.tensor("token_embd.weight")
    q = header.tensor("blk.0.attn_q.weight")
    if embed is None or q is None:
        raise MlxRftError(
            f"{header.path} has no token_embd/attn_q tensors; it is not a complete {arch} model"
        )

    n_heads = int(_require(header, "attention.head_count"))
    n_kv = int(header.arch_key("attention.head_count_kv") or n_heads)
    # The q projection's rows give head_dim unambiguously (key_length is optional metadata).
    head_dim = q.shape[0] // n_heads
    key_length = header.arch_key("attention.key_length")
    if key_length is not None and int(key_length) != head_dim:
        raise MlxRftError(
            f"{header.path}: attention.key_length {key_length} disagrees with the q projection "
            f"({q.shape[0]} rows / {n_heads} heads); the file is inconsistent"
        )
    theta = float(header.arch_key("rope.freq_base", 10000.0))
    eos = _eos_ids(header)
    ids = _special_ids(header)
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": int(_require(header, "embedding_length")),
        "intermediate_size": int(_require(header, "feed_forward_length")),
        "num_hidden_layers": int(_require(header, "block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(header.arch_key("context_length", 4096)),
        "rms_norm_eps": float(_require(header, "attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": _metadata_rope_scaling(header),
        # llama.cpp writes no output tensor when the LM head is the embedding matrix.
        "vocab_size": int(embed.shape[0]),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": ids["bos"],
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": ids["pad"],
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
        freqs = header.tensor("rope_freqs.weight")
        if freqs is not None:
            data = np.memmap(header.path, dtype=np.uint8, mode="r")
            factors = _numpy_tensor(data, freqs).astype(np.float64)
            config["rope_scaling"] = _llama3_rope_scaling(factors, head_dim, theta)
    elif arch == "qwen2":
        if head_dim * n_heads != config["hidden_size"]:
            raise MlxRftError(f"{header.path}: Qwen2 needs head_dim * heads == hidden size")
        del config["head_dim"]  # Qwen2 derives it; mlx-lm's qwen2 takes no head_dim
        config["use_sliding_window"] = False
    elif arch == "qwen3":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    elif arch == "gemma3":
        config.update(_gemma3_extras(header, config))
    return config


def _gemma3_extras(header: GGUFHeader, config: dict) -> dict:
    n_layers = config["num_hidden_layers"]
    pattern = header.arch_key("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        # One flag per layer (True = sliding); mlx-lm models only a fixed period.
        period = next(
            (
                p
                for p in range(1, n_layers + 1)
                if all(bool(s) == ((i + 1) % p != 0) for i, s in enumerate(pattern))
            ),
            None,
        )
        if period is None:
            raise MlxRftError(f"{header.path}: irregular Gemma 3 sliding-window layout is not supported")
        pattern = period
    pattern = int(pattern)
    # llama.cpp (like HF) scales queries by 1/sqrt(hidden/heads) for the 62-layer 27B, else by
    # 1/sqrt(head_dim); the file does not say which.
    scalar = (
        config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else config["head_dim"]
    )
    extras = {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(header.arch_key("attention.sliding_window", 4096)),
        "sliding_window_pattern": pattern,
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
        ],
        "rope_local_base_freq": float(header.arch_key("rope.freq_base_swa", 10000.0)),
        "attn_logit_softcapping": None,
        "final_logit_softcapping": header.arch_key("final_logit_softcapping"),
        "attention_bias": False,
    }
    return extras


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _byte_level_pre_tokenizer(pre: str):
    """(normalizer, pre_tokenizer, ignore_merges) for a byte-level BPE named `pre` by llama.cpp."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def split(pattern: str):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), raw_bytes]
        )

    if pre in _GPT2_PRE:
        return None, byte_level, False
    if pre == "smollm":
        # SmolLM's own tokenizer.json: every digit is its own pre-token, then GPT-2's split.
        return (
            None,
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
            False,
        )
    if pre in _LLAMA3_PRE:
        # Llama 3's tokenizer.json sets ignore_merges (a whole-word vocabulary hit wins).
        return None, split(_LLAMA3_SPLIT), True
    if pre in _QWEN2_PRE:
        return normalizers.NFC(), split(_QWEN2_SPLIT), False
    try:  # transformers >= 5 knows more of llama.cpp's pre-tokenizer names
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = {}
    if pre in GGUF_PRE_TOKENIZER_SPLITS:
        return None, split(GGUF_PRE_TOKENIZER_SPLITS[pre]), False
    known = sorted({"smollm", *_GPT2_PRE, *_LLAMA3_PRE, *_QWEN2_PRE, *GGUF_PRE_TOKENIZER_SPLITS})
    raise MlxRftError(
        f"the GGUF's tokenizer uses pre-tokenizer {pre!r}, which the importer does not know, so it "
        f"would split text differently from the model's training; known: {', '.join(known)}"
    )


def _byte_level_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` for a GPT-2 style byte-level BPE (tokenizer.ggml.model = gpt2)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab.setdefault(text, i)
    if len(vocab) != len(tokens):
        logger.warning(
            "the GGUF vocabulary repeats %d token strings; keeping each one's first id",
            len(tokens) - len(vocab),
        )
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise MlxRftError(f"the GGUF's tokenizer has a malformed merge {m!r}; the file is corrupt")
        merges.append((parts[0], parts[1]))
    normalizer, pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(
        meta.get("tokenizer.ggml.pre") or "default"
    )
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL
    ]
    added = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    return tok


def _converted_tokenizer(header: GGUFHeader):
    """Non-byte-level vocabularies (sentencepiece, unigram) through transformers' GGUF converter."""
    meta = header.metadata
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        raise MlxRftError(
            f"{header.path} has a {meta.get('tokenizer.ggml.model')!r} tokenizer, whose import needs "
            "transformers>=5; upgrade it with `pip install -U transformers`"
        ) from None
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        hf: meta[f"tokenizer.{key}"] for key, hf in renames.items() if f"tokenizer.{key}" in meta
    }
    try:
        tok, _ = convert_gguf_tokenizer(header.architecture, tokenizer_dict)
    except (ValueError, KeyError) as e:
        raise MlxRftError(f"cannot rebuild the tokenizer of {header.path}: {e}") from e
    return tok


def _post_processor(tokens: list[str], bos: int | None, eos: int | None, add_bos: bool, add_eos: bool):
    """BOS/EOS insertion, laid out as transformers' TokenizersBackend builds it."""
    from tokenizers import processors

    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None

    def sequence(segment: str, type_id: int) -> str:
        parts = [f"{tokens[bos]}:{type_id}"] if add_bos else []
        parts.append(f"${segment}:{type_id}")
        return " ".join(parts + ([f"{tokens[eos]}:{type_id}"] if add_eos else []))

    single, pair = sequence("A", 0), f"{sequence('A', 0)} {sequence('B', 1)}"
    special = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_files(header: GGUFHeader) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json dict) rebuilt from the GGUF's tokenizer metadata."""
    meta = header.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    model = meta.get("tokenizer.ggml.model")
    if not tokens or not model:
        raise MlxRftError(
            f"{header.path} carries no tokenizer (tokenizer.ggml.tokens/model); use a GGUF converted "
            "with its vocabulary, or the original Hugging Face checkpoint"
        )
    ids = _special_ids(header)
    for name, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise MlxRftError(
                f"{header.path}: {name} token id {i} is outside the vocabulary; the file is corrupt"
            )
    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    if "tokenizer.huggingface.json" in meta:  # the original tokenizer.json, embedded verbatim
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(meta["tokenizer.huggingface.json"])
    elif model == "gpt2":
        tok = _byte_level_tokenizer(meta)
    else:
        tok = _converted_tokenizer(header)
    tok.post_processor = _post_processor(tokens, ids["bos"], ids["eos"], add_bos, add_eos)

    def text(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(ids["bos"]),
        "eos_token": text(ids["eos"]),
        "unk_token": text(ids["unk"]),
        "pad_token": text(ids["pad"]),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(header.arch_key("context_length", 4096)),
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    else:
        logger.warning("%s has no chat template; chat-style prompts will need one", header.path.name)
    return tok.to_str(pretty=False), config


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def _expected_parameters(config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes for `config`, from mlx-lm's own model class (arrays stay lazy)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_cls, args_cls = _get_classes(config)
    except ValueError as e:
        raise MlxRftError(
            f"the installed mlx-lm cannot build model_type {config['model_type']!r} ({e}); "
            "upgrade it with `pip install -U mlx-lm`"
        ) from e
    model = model_cls(args_cls.from_dict(config))
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


def _write_weights(
    header: GGUFHeader, config: dict, out: Path, dtype: str, max_shard_bytes: int, prefer_mlx: bool
) -> int:
    """Dequantize, fix up and save the weights shard by shard; returns the parameter count."""
    import mlx.core as mx

    from .models import to_mx_dtype

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

    source = _tensor_source(header, prefer_mlx=prefer_mlx)
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
    from .models import DTYPES

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
    _check_quant_types(header)
    tokenizer_json, tokenizer_config = tokenizer_files(header)

    start = time.perf_counter()
    logger.info("importing %s (%s) into %s ...", header.path.name, header.architecture, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        n_params = _write_weights(header, config, tmp, dtype, max_shard_bytes, prefer_mlx)
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


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .models import DTYPES

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
    from .models import cache_dir

    args = build_parser().parse_args(argv)
    out = Path(args.out_dir) if args.out_dir else cache_dir() / "models" / Path(args.gguf_path).stem
    start = time.perf_counter()
    path = import_gguf(args.gguf_path, out, dtype=args.dtype, overwrite=args.overwrite)
    config = json.loads((path / "config.json").read_text())
    print(
        f"imported {args.gguf_path} -> {path} ({config['model_type']}, "
        f"{config['num_hidden_layers']} layers, {args.dtype}) in {time.perf_counter() - start:.1f}s"
    )
