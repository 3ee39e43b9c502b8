"""Weight dtypes by name: the ones models load and import as, and the default for this device."""

from __future__ import annotations

from .errors import MlxRftError

DTYPES = ("float32", "bfloat16", "float16")


def default_dtype() -> str:
    """float32 on CPU (MLX CPU bf16/fp16 matmuls are slow), bfloat16 on a GPU."""
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def to_mx_dtype(name: str):
    import mlx.core as mx

    if name not in DTYPES:
        raise MlxRftError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(mx, name)
