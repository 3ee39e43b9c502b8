"""TimeSeriesLM: a frozen mlx-lm model that reads series through soft tokens.

A prompt is a sequence of pieces: token ids (text) and z-normalised channels. `embed` turns a
batch of such prompts into the LLM's input embeddings: text pieces through the LLM's own
embedding table, channels through encoder + projector, concatenated in order and padded. The
LLM then runs on `input_embeddings` (mlx-lm's models accept them), so the loss's gradient flows
back through the frozen LLM into the projector and encoder; with the LLM frozen only its weight
gradients are left out.

Saved as `timeseries.safetensors` + `timeseries_config.json` in a folder of its own (a run's
checkpoint), next to the LLM folder it names, never inside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import MlxRftError
from .encoder import EncoderConfig, Projector, SeriesEncoder, num_patches

WEIGHTS = "timeseries.safetensors"
CONFIG = "timeseries_config.json"
PAD_ID = 0  # stands in for soft-token and padding positions in token-id arrays


def check_supports_embeddings(llm: nn.Module, name: str = "the model") -> None:
    """Refuse models whose forward has no `input_embeddings` argument, naming them."""
    from mlx_lm.utils import does_model_support_input_embeddings

    if not does_model_support_input_embeddings(llm):
        kind = getattr(getattr(llm, "args", None), "model_type", type(llm).__module__)
        raise MlxRftError(
            f"{name} (model_type {kind!r}) takes no input_embeddings in mlx-lm, so soft tokens "
            "cannot be spliced in; use a Llama, Qwen3 or SmolLM model"
        )


def embedding_table(llm: nn.Module) -> nn.Module:
    inner = getattr(llm, "model", None)
    table = getattr(inner, "embed_tokens", None) or getattr(llm, "embed_tokens", None)
    if table is None:
        raise MlxRftError(
            f"cannot find the token embedding table of {type(llm).__module__}; use a Llama, "
            "Qwen3 or SmolLM model"
        )
    return table


class TimeSeriesLM(nn.Module):
    """The LLM plus a series encoder and projector; with `cfg=None` a text-only model (the same
    SFT code path for chat rows and for the text-only baseline)."""

    def __init__(self, llm: nn.Module, cfg: EncoderConfig | None):
        super().__init__()
        check_supports_embeddings(llm)
        self.llm = llm
        self.config = cfg
        if cfg is not None:
            self.encoder = SeriesEncoder(cfg)
            self.projector = Projector(cfg)

    # ---- building input embeddings ----

    def soft_tokens(self, channels: Sequence[np.ndarray]) -> list[mx.array]:
        """One [P_i, hidden] block per channel (P_i = ceil(len_i / patch_size))."""
        if not channels:
            return []
        if self.config is None:
            raise MlxRftError(
                "this model has no series encoder, so rows with series cannot be embedded; build "
                "it with an EncoderConfig (prompt_format soft)"
            )
        p = self.config.patch_size
        T = max(len(c) for c in channels)
        x = np.zeros((len(channels), T), np.float32)
        for i, c in enumerate(channels):
            x[i, : len(c)] = c
        patches = [num_patches(len(c), p) for c in channels]
        h = self.projector(self.encoder(mx.array(x), mx.array(patches)))
        dtype = embedding_table(self.llm).weight.dtype
        h = h.astype(dtype) if mx.issubdtype(dtype, mx.floating) else h
        return [h[i, :n] for i, n in enumerate(patches)]

    def embed(self, rows: Sequence[Sequence], pad_left: bool = False) -> tuple[mx.array, list[int]]:
        """[B, L, hidden] input embeddings and each row's real length.

        rows: per row, a sequence of pieces, each a 1-D int array (token ids) or a 1-D float32
        array (a z-normalised channel). Padding goes right (training, scoring) or left
        (generation, where the KV cache masks left padding); its embeddings are zeros.
        """
        table = embedding_table(self.llm)
        channels = [p for row in rows for p in row if _is_channel(p)]
        soft = iter(self.soft_tokens(channels))
        seqs = []
        for row in rows:
            parts = []
            for piece in row:
                if _is_channel(piece):
                    parts.append(next(soft))
                elif len(piece):
                    parts.append(table(mx.array(np.asarray(piece, np.int32))))
            seqs.append(mx.concatenate(parts, axis=0))
        lengths = [int(s.shape[0]) for s in seqs]
        L = max(lengths)
        padded = []
        for s, n in zip(seqs, lengths):
            if n < L:
                z = mx.zeros((L - n, s.shape[1]), s.dtype)
                s = mx.concatenate([z, s] if pad_left else [s, z], axis=0)
            padded.append(s)
        return mx.stack(padded), lengths

    def prompt_length(self, pieces: Sequence) -> int:
        """Positions a prompt takes: its tokens plus ceil(T / patch_size) per channel."""
        p = self.config.patch_size if self.config else 1
        return sum(num_patches(len(x), p) if _is_channel(x) else len(x) for x in pieces)

    def placeholder_ids(self, pieces: Sequence) -> list[int]:
        return placeholder_ids(pieces, self.config.patch_size if self.config else 1)

    # ---- parameters and files ----

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and frozen parameters; quantized weights count as size * 32 // bits."""
        counts = {"trainable": 0, "frozen": 0}
        trainable = {k for k, _ in tree_flatten(self.trainable_parameters())}
        for name, module in self.named_modules():
            bits = getattr(module, "bits", None)
            for key, value in module.parameters().items():
                if not isinstance(value, mx.array):
                    continue
                path = f"{name}.{key}" if name else key
                size = value.size
                if bits and key == "weight" and value.dtype == mx.uint32:
                    size = value.size * 32 // bits
                counts["trainable" if path in trainable else "frozen"] += size
        return counts

    def series_weights(self) -> dict[str, mx.array]:
        return {k: v for k, v in tree_flatten(self.parameters()) if not k.startswith("llm.")}

    def save(self, folder: Path, llm_path: str, extra: dict | None = None) -> None:
        """Encoder + projector weights and config into `folder` (not the LLM's own folder)."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            mx.save_safetensors(str(folder / WEIGHTS), self.series_weights())
        encoder = self.config.to_dict() if self.config is not None else None
        meta = {"encoder": encoder, "llm": llm_path, **(extra or {})}
        (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    def load_series_weights(self, folder: Path) -> None:
        path = folder / WEIGHTS
        if not path.is_file():
            raise MlxRftError(f"{path} is missing; pass a folder written by `mlx-rft sft`")
        weights = mx.load(str(path))
        expected = {k: v.shape for k, v in self.series_weights().items()}
        if {k: v.shape for k, v in weights.items()} != expected:
            raise MlxRftError(
                f"{path} holds {len(weights)} tensors that do not match this encoder config "
                f"({len(expected)} expected); it was written for another model or config"
            )
        self.load_weights(list(weights.items()), strict=False)


def placeholder_ids(pieces: Sequence, patch_size: int) -> list[int]:
    """Token ids of a prompt with PAD_ID at its soft-token positions: what the rollout engine
    and the log-prob pass take as `prompt_ids` next to the prompt's embeddings."""
    ids: list[int] = []
    for piece in pieces:
        if _is_channel(piece):
            ids.extend([PAD_ID] * num_patches(len(piece), patch_size))
        else:
            ids.extend(int(t) for t in piece)
    return ids


def _is_channel(piece) -> bool:
    return isinstance(piece, np.ndarray) and np.issubdtype(piece.dtype, np.floating)


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MlxRftError(
            f"{path} is missing; pass a folder written by `mlx-rft sft` (a run's checkpoint)"
        ) from None
    except json.JSONDecodeError as e:
        raise MlxRftError(f"{path} is not valid JSON ({e}); re-create it with `mlx-rft sft`") from None


def load_timeseries_lm(folder: str | Path, model: str | None = None):
    """(TimeSeriesLM, tokenizer) from a folder written by `save`, for inference.

    The LLM comes from `model`, else from the path recorded in the config."""
    from ..models import load_model

    folder = Path(folder)
    meta = read_config(folder)
    adapters = folder / "adapters.safetensors"
    llm, tokenizer = load_model(model or meta.get("llm"),
                                adapter_path=folder if adapters.is_file() else None)
    llm.freeze()
    cfg = EncoderConfig.from_dict(meta["encoder"]) if meta.get("encoder") else None
    tslm = TimeSeriesLM(llm, cfg)
    if cfg is not None:
        tslm.load_series_weights(folder)
    tslm.freeze()
    return tslm, tokenizer
