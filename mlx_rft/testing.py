"""Tiny random Hugging Face-format models with a real tokenizer, for tests that must run in seconds.

`write_tiny_model(path, arch)` writes config.json, model.safetensors (random weights from mlx-lm's own
model class), a byte-level BPE tokenizer trained here on a small fixed corpus (deterministic), and a
ChatML chat template. The folder loads with `mlx_lm.load` and with `mlx_rft.models.load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHS = ("qwen3", "qwen3_moe", "llama")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 2 + 3? The answer is 5.",
    "Compute 12 * 7 and give the result: 84.",
    "<answer>42</answer> <think>Let me think step by step.</think>",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "user assistant system You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
    "Question: how many apples? Answer: three apples, 3.",
]


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def tiny_config(arch: str = "qwen3", vocab_size: int = 384, **overrides) -> dict:
    """A small config.json dict for `arch` (hidden 64, 2 layers, 4 heads / 2 KV heads)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    common = dict(
        model_type=arch,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
    )
    if arch == "qwen3_moe":
        common.update(
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=32,
            norm_topk_prob=True,
        )
    if arch == "llama":
        common.update(tie_word_embeddings=False)
    common.update(overrides)
    return common


def write_tiny_model(
    path: str | Path, arch: str = "qwen3", *, seed: int = 0, vocab_size: int = 384, **overrides
) -> Path:
    """Write a tiny random model folder for `arch` at `path` and return the path."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, vocab_size=vocab_size, **overrides)

    tok = _build_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "unk_token": None,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": config["max_position_embeddings"],
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))

    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config["eos_token_id"]})
    )
    return path
