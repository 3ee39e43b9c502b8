"""The series encoder and projector: one channel of numbers -> P soft tokens in the LLM's space.

    z-normalised channel [T] ──> patches of `patch_size` (Conv1d, stride = kernel)
                            ──> + learned positions ──> LayerNorm ──> transformer layers
                            ──> projector: LayerNorm -> Linear -> GELU -> Linear ──> [P, hidden]

This is the "SoftPrompt" design of OpenTSLM (and of LLaVA's projector): the LLM reads the soft
tokens as if they were embeddings of words. Every channel goes through the same encoder; a
C-channel series becomes C blocks of soft tokens, each introduced by its own text (name, mean,
std), so the same weights serve univariate and multichannel data of any length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxRftError


@dataclass(frozen=True)
class EncoderConfig:
    hidden_size: int  # the LLM's embedding width (the projector's output)
    patch_size: int = 4
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_patches: int = 512  # longest series: max_patches * patch_size values per channel

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MlxRftError(
                f"unknown encoder config keys {unknown}; this mlx-rft reads {sorted(known)}"
            )
        return cls(**d)


def num_patches(length: int, patch_size: int) -> int:
    return -(-length // patch_size)


class SeriesEncoder(nn.Module):
    """[S, T] channels (zero-padded on the right) -> [S, P, dim] patch features."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch = nn.Conv1d(1, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.positions = nn.Embedding(cfg.max_patches, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.layers = nn.TransformerEncoder(cfg.num_layers, cfg.dim, cfg.num_heads, mlp_dims=4 * cfg.dim)
        self.max_patches = cfg.max_patches

    def __call__(self, x: mx.array, patches: mx.array) -> mx.array:
        """x: [S, T] values; patches: [S] real patches per channel (the rest is padding)."""
        S, T = x.shape
        P = num_patches(T, self.patch_size)
        if P > self.max_patches:
            raise MlxRftError(
                f"a series of {T} values makes {P} patches, more than the encoder's max_patches "
                f"{self.max_patches}; downsample the series or raise max_patches"
            )
        pad = P * self.patch_size - T
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad)])
        h = self.patch(x[:, :, None])  # [S, P, dim]
        h = self.norm(h + self.positions.weight[:P])
        # Padded patches neither attend nor are attended to by real ones.
        real = mx.arange(P)[None, :] < patches[:, None]  # [S, P]
        mask = mx.where(real[:, None, None, :], 0.0, -1e9).astype(h.dtype)
        return self.layers(h, mask)


class Projector(nn.Module):
    """[.., dim] -> [.., hidden]: LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_size)
        self.fc2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def __call__(self, h: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(self.norm(h))))
