"""The Hugging Face `config.json` of a GGUF model, from its metadata (and, for Llama 3.1+ rope
scaling, its `rope_freqs` tensor)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import MlxRftError
from .header import GGUFHeader
from .tensors import numpy_tensor
from .tokenizer import eos_ids, special_ids

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "qwen2", "qwen3")

# HF model_type and class for each supported GGUF architecture.
_HF_MODEL = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}


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
    eos = eos_ids(header)
    ids = special_ids(header)
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
            factors = numpy_tensor(data, freqs).astype(np.float64)
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
