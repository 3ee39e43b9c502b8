"""GGUF's header: the metadata and the tensor table, read with a small parser of our own.

The `gguf` package's reader turns every vocabulary entry into several NumPy objects and takes
seconds on a 49k vocabulary; this one reads numeric arrays in one go and never touches tensor data.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MlxRftError

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32  # llama.cpp's default when general.alignment is absent

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
