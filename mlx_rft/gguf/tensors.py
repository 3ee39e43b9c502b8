"""Tensor data: each GGUF tensor dequantized to float32, through `mx.load` where that is exact.

Files holding only F32/F16/Q4_0/Q4_1/Q8_0 go through `mx.load`, which returns quantized triples
that `mx.dequantize` expands (with float32 scales, so the result is exact); anything else
(K-quants, Q5_x, IQ*, BF16) goes through `gguf.quants.dequantize` on a memory map of the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterator
from typing import Any

import numpy as np

from ..errors import MlxRftError
from .header import GGUFHeader, TensorInfo, read_gguf_header

# ggml type ids (gguf.GGMLQuantizationType values) that `mx.load` dequantizes exactly. BF16 is left
# out on purpose: mx.load converts it to float16, which loses range and precision.
_F32, _F16, _Q4_0, _Q4_1, _Q8_0, _BF16, _F64 = 0, 1, 2, 3, 8, 30, 28
_MLX_LOADABLE = {_F32, _F16, _Q4_0, _Q4_1, _Q8_0}


def check_quant_types(header: GGUFHeader) -> None:
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


def numpy_tensor(data: np.ndarray, info: TensorInfo) -> np.ndarray:
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


def tensor_source(header: GGUFHeader, *, prefer_mlx: bool = True) -> Callable[[TensorInfo], Any]:
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
        return mx.array(numpy_tensor(data, info).astype(np.float32, copy=False))

    return from_numpy


def iter_tensors(
    gguf_path: str | os.PathLike, names: Collection[str] | None = None, *, prefer_mlx: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 NumPy array in row-major shape) for each tensor (or those in `names`).

    No llama.cpp fix-ups are undone: this is the stored content, dequantized, for inspection and tests.
    """
    header = read_gguf_header(gguf_path)
    check_quant_types(header)
    source = tensor_source(header, prefer_mlx=prefer_mlx)
    for info in header.tensors:
        if names is None or info.name in names:
            yield info.name, np.array(source(info))
