"""GGUF importer: the real SmolLM2 GGUF end to end, plus small synthetic GGUFs written here with
`gguf.GGUFWriter` the way llama.cpp's converter writes them (Llama q/k permuted, Gemma norms + 1,
K-quant blocks) for the architectures and quantizations the default model does not exercise."""

import mlx_rft  # noqa: F401, I001  (must precede any mlx.core import)

import importlib
import io
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import regex
from gguf import GGMLQuantizationType as Q

from mlx_rft.errors import MlxRftError
from mlx_rft.gguf import import_gguf, iter_tensors, read_gguf_header

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# Synthetic GGUF files
# ------------------------------------------------------------------------------------------------

# HF -> GGUF tensor names, written out by hand (independent of the gguf.TensorNameMap the importer uses).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA_LAYER_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(hf_name: str, arch: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    m = regex.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    assert m, hf_name
    table = dict(
        _LAYER_NAMES,
        **(_GEMMA_LAYER_NAMES if arch == "gemma3" else {"post_attention_layernorm": "ffn_norm"}),
    )
    return f"blk.{m[1]}.{table[m[2]]}.{m[3]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim in effect."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tokenizer_section(model_dir: Path) -> dict:
    """tokens/types/merges of a tiny HF byte-level BPE tokenizer, as llama.cpp's gpt2 vocab export."""
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    specials = {t["id"] for t in tj["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    return {
        "model": "gpt2",
        "tokens": tokens,
        "types": [3 if i in specials else 1 for i in range(len(tokens))],
        "merges": merges,
        "eos": vocab[cfg["eos_token"]],
        "pad": vocab[cfg["pad_token"]],
        "bos": None,
        "add_bos": False,
        "chat_template": cfg["chat_template"],
    }


def write_gguf(
    path: Path,
    arch: str,
    config: dict,
    weights: dict,
    tok: dict,
    *,
    pre: str = "gpt2",
    qtype=lambda name, w: Q.F32,
    raw: dict | None = None,
    extra_metadata=None,
    extra_tensors=None,
) -> Path:
    """Write `weights` (HF names, HF layout, float32) as llama.cpp would for `arch`.

    qtype(hf_name, array) picks each tensor's storage type; `raw` maps HF names to pre-encoded
    (uint8 blocks, type) written as they are.
    """
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if arch in ("qwen3", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(config["sliding_window"])
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model(tok["model"])
    if tok["model"] == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(tok["merges"])
    else:
        w.add_token_scores(tok["scores"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    for key, add in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("pad", w.add_pad_token_id),
        ("unk", w.add_unk_token_id),
    ):
        if tok.get(key) is not None:
            add(tok[key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_chat_template(tok["chat_template"])
    for key, value in (extra_metadata or {}).items():
        w.add_key_value(key, *value)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    for hf_name, arr in weights.items():
        name = gguf_name(hf_name, arch)
        if raw and hf_name in raw:
            blocks, t = raw[hf_name]
            w.add_tensor(name, blocks, raw_dtype=t)
            continue
        arr = np.asarray(arr, dtype=np.float32)
        if arch == "llama" and ".attn_q." in name:
            arr = llama_cpp_permute(arr, heads)
        elif arch == "llama" and ".attn_k." in name:
            arr = llama_cpp_permute(arr, kv)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            arr = arr + 1.0  # Gemma3Model.norm_shift in llama.cpp's converter
        t = qtype(hf_name, arr)
        if t == Q.F32:
            w.add_tensor(name, arr)
        elif t == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    return {
        k: np.array(v.astype(mx.float32))
        for k, v in mx.load(str(model_dir / "model.safetensors")).items()
    }


def random_model(config: dict, seed: int):
    """(mlx-lm model, HF-named float32 weights) with every parameter random, norms included."""
    from mlx.utils import tree_flatten

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {
        k: rng.normal(0, 0.2, v.shape).astype(np.float32)
        for k, v in tree_flatten(model.parameters())
        if not (k == "lm_head.weight" and config.get("tie_word_embeddings", True))
    }
    model.load_weights([(k, mx.array(v)) for k, v in model.sanitize(dict(weights)).items()])
    return model, weights


def logits_of(model, ids: list[int]) -> np.ndarray:
    out = model(mx.array([ids]))
    return np.array(out.astype(mx.float32))[0]


PROMPT_TEXTS = [
    "What is 2 + 3? The answer is 5.",
    "Compute 12 * 7 and give the result: 84.",
    "<|im_start|>user\nhi<|im_end|>",
    "def add(a, b):\n    return a + b\n",
    "  two  spaces\tand a tab, 1000 apples",
]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def llama_f32_import(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_llama")
    config = json.loads((tiny_llama / "config.json").read_text())
    path = write_gguf(
        d / "tiny-llama.F32.gguf",
        "llama",
        config,
        load_weights(tiny_llama),
        hf_tokenizer_section(tiny_llama),
    )
    return import_gguf(path, d / "out")


# ------------------------------------------------------------------------------------------------
# Llama: permutation round trip, config, tokenizer, end-to-end logits
# ------------------------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permute():
    from mlx_rft.gguf.weights import unpermute_llama_qk

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads, head_dim 8
    permuted = llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(np.array(unpermute_llama_qk(mx.array(permuted), 3)), w)
    # hand-derived: head 0 of the permuted rows interleaves the two halves [0,4,1,5,2,6,3,7]
    rows = np.arange(8, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(llama_cpp_permute(rows, 1)[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])


def test_llama_f32_round_trip_is_exact(tiny_llama, llama_f32_import):
    out = llama_f32_import
    original, imported = load_weights(tiny_llama), load_weights(out)
    assert set(imported) == set(original)  # HF names, incl. lm_head (untied) and no extras
    for name, w in original.items():
        np.testing.assert_array_equal(imported[name], w, err_msg=name)  # q/k un-permuted exactly

    config, src = (
        json.loads((out / "config.json").read_text()),
        json.loads((tiny_llama / "config.json").read_text()),
    )
    for key in (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "eos_token_id",
    ):
        assert config[key] == src[key], key
    assert config["rms_norm_eps"] == pytest.approx(src["rms_norm_eps"])
    assert config["rope_theta"] == src["rope_theta"]
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_llama_import_runs_identically_in_mlx_lm(tiny_llama, llama_f32_import):
    from mlx_lm.utils import load

    ref_model, ref_tok = load(str(tiny_llama))
    model, tok = load(str(llama_f32_import))
    for text in PROMPT_TEXTS:
        ids = ref_tok.encode(text)
        assert tok.encode(text) == ids, text  # same BPE, same specials
        np.testing.assert_allclose(
            logits_of(model, ids), logits_of(ref_model, ids), rtol=1e-5, atol=1e-5
        )
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == ref_tok.apply_chat_template(
        msgs, add_generation_prompt=True
    )
    assert tok.eos_token_ids == ref_tok.eos_token_ids


def test_mixed_quant_types_stay_within_quantization_error(tiny_llama, tmp_path):
    """F16 / Q8_0 / Q4_0 / Q4_1 (mx.load path) and Q5_0 / Q5_1 / BF16 (gguf dequantizer path)."""
    config = json.loads((tiny_llama / "config.json").read_text())
    rng = np.random.default_rng(3)
    original = {
        k: (v + rng.normal(0, 0.1, v.shape).astype(np.float32) if v.ndim == 1 else v)  # norms init to 1
        for k, v in load_weights(tiny_llama).items()
    }
    plan = {
        "self_attn.q_proj": Q.Q8_0,
        "self_attn.k_proj": Q.F16,
        "self_attn.v_proj": Q.Q4_0,
        "self_attn.o_proj": Q.Q4_1,
        "mlp.gate_proj": Q.Q8_0,
        "embed_tokens": Q.Q8_0,
    }
    # worst-case error relative to the block's max |w|: half a grid step (Q4_1/Q5_1 steps span
    # max - min <= 2 max|w|), except Q4_0/Q5_0 whose grid (d = signed extreme / -8 or -16) clips the
    # opposite extreme by a whole step
    max_rel_err = {
        Q.Q8_0: 1 / 254,
        Q.F16: 2**-11,
        Q.Q4_0: 1 / 8,
        Q.Q4_1: 1 / 15,
        Q.Q5_0: 1 / 16,
        Q.Q5_1: 1 / 31,
        Q.BF16: 2**-8,
    }

    def pick(extra):
        table = dict(plan, **extra)
        return lambda name, w: next((t for key, t in table.items() if key in name), Q.F32)

    for label, extra in (
        ("mlx", {}),
        ("numpy", {"mlp.up_proj": Q.Q5_0, "mlp.down_proj": Q.Q5_1, "norm": Q.BF16}),
    ):
        chooser = pick(extra)
        path = write_gguf(
            tmp_path / f"{label}.gguf",
            "llama",
            config,
            original,
            hf_tokenizer_section(tiny_llama),
            qtype=chooser,
        )
        header = read_gguf_header(path)
        types = {t.type_name for t in header.tensors}
        assert ("Q5_0" in types) == (label == "numpy")
        imported = load_weights(import_gguf(path, tmp_path / f"out_{label}"))
        for name, w in original.items():
            t = chooser(name, w)
            block = 32 if w.shape[-1] % 32 == 0 and t not in (Q.F16, Q.BF16) else 1
            scale = (
                np.abs(w.reshape(-1, block)).max(axis=1, keepdims=True)
                if block > 1
                else np.abs(w).reshape(-1, 1)
            )
            if t == Q.F32:
                np.testing.assert_array_equal(imported[name], w, err_msg=name)
                continue
            err = np.abs(imported[name].reshape(-1, block) - w.reshape(-1, block))
            # plus the f16 rounding of the stored block scale and minimum (<= 3 max|w| 2^-11)
            assert (err <= scale * (max_rel_err[t] + 2**-9) + 1e-7).all(), (
                label,
                name,
                t.name,
                err.max(),
            )
            assert err.max() > 0, (label, name)  # really went through the lossy format


# ------------------------------------------------------------------------------------------------
# K-quants (gguf dequantizer path), checked against a transcription of ggml's C reference
# ------------------------------------------------------------------------------------------------


def ref_dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    """ggml-quants.c dequantize_row_q4_K, looped as in C (vectorised over blocks only), float64."""
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float64)
    dmin = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64)
    scales, qs = blocks[:, 4:16].astype(np.int64), blocks[:, 16:144].astype(np.int64)

    def scale_min(j):
        if j < 4:
            return scales[:, j] & 63, scales[:, j + 4] & 63
        return (
            (scales[:, j + 4] & 0xF) | ((scales[:, j - 4] >> 6) << 4),
            (scales[:, j + 4] >> 4) | ((scales[:, j] >> 6) << 4),
        )

    y = np.zeros((len(blocks), 256))
    pos, q_off, is_ = 0, 0, 0
    for _ in range(0, 256, 64):
        sc1, m1 = scale_min(is_)
        sc2, m2 = scale_min(is_ + 1)
        for l in range(32):
            y[:, pos + l] = d * sc1 * (qs[:, q_off + l] & 0xF) - dmin * m1
        for l in range(32):
            y[:, pos + 32 + l] = d * sc2 * (qs[:, q_off + l] >> 4) - dmin * m2
        pos, q_off, is_ = pos + 64, q_off + 32, is_ + 2
    return y


def ref_dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    """ggml-quants.c dequantize_row_q6_K: ql[128], qh[64], int8 scales[16], f16 d."""
    ql, qh = blocks[:, 0:128].astype(np.int64), blocks[:, 128:192].astype(np.int64)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float64)
    d = blocks[:, 208:210].copy().view(np.float16)[:, 0].astype(np.float64)
    y = np.zeros((len(blocks), 256))
    for n in range(2):
        yo, lo, ho, so = 128 * n, 64 * n, 32 * n, 8 * n
        for l in range(32):
            is_ = l // 16
            q1 = ((ql[:, lo + l] & 0xF) | (((qh[:, ho + l] >> 0) & 3) << 4)) - 32
            q2 = ((ql[:, lo + l + 32] & 0xF) | (((qh[:, ho + l] >> 2) & 3) << 4)) - 32
            q3 = ((ql[:, lo + l] >> 4) | (((qh[:, ho + l] >> 4) & 3) << 4)) - 32
            q4 = ((ql[:, lo + l + 32] >> 4) | (((qh[:, ho + l] >> 6) & 3) << 4)) - 32
            y[:, yo + l] = d * sc[:, so + is_] * q1
            y[:, yo + l + 32] = d * sc[:, so + is_ + 2] * q2
            y[:, yo + l + 64] = d * sc[:, so + is_ + 4] * q3
            y[:, yo + l + 96] = d * sc[:, so + is_ + 6] * q4
    return y


def random_k_blocks(rng, shape, qtype) -> np.ndarray:
    """Random bytes for a (rows, cols) tensor in `qtype`, with sane f16 super-block scales."""
    rows, cols = shape
    n_blocks = rows * cols // 256
    size = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    d = rng.uniform(0.5e-3, 2e-3, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == Q.Q4_K:
        blocks[:, 0:2] = d
        blocks[:, 2:4] = (
            (rng.uniform(0.5e-3, 2e-3, n_blocks).astype(np.float16)).view(np.uint8).reshape(-1, 2)
        )
    else:
        blocks[:, 208:210] = d
    return blocks.reshape(rows, -1)


def test_k_quant_qwen3_matches_ggml_reference_and_runs(tiny_model_factory, tmp_path):
    src = tiny_model_factory("qwen3", hidden_size=256, intermediate_size=512, head_dim=64)
    config = json.loads((src / "config.json").read_text())
    original = load_weights(src)
    rng = np.random.default_rng(1)
    raw, expected = {}, {}
    for name, w in original.items():
        if w.ndim == 2:
            t = Q.Q6_K if ("down_proj" in name or "embed" in name) else Q.Q4_K
            blocks = random_k_blocks(rng, w.shape, t)
            raw[name] = (blocks, t)
            ref = ref_dequant_q6_k if t == Q.Q6_K else ref_dequant_q4_k
            expected[name] = ref(blocks.reshape(-1, blocks.shape[1] // (w.shape[1] // 256))).reshape(
                w.shape
            )
        else:
            expected[name] = w
    path = write_gguf(
        tmp_path / "tiny-qwen3.Q4_K_M.gguf",
        "qwen3",
        config,
        original,
        hf_tokenizer_section(src),
        pre="qwen2",
        raw=raw,
    )
    assert {t.type_name for t in read_gguf_header(path).tensors} == {"Q4_K", "Q6_K", "F32"}
    out = import_gguf(path, tmp_path / "out")
    imported = load_weights(out)
    assert set(imported) == set(original)  # tied: no lm_head; q_norm/k_norm present
    for name, ref in expected.items():
        np.testing.assert_allclose(imported[name], ref, rtol=1e-6, atol=1e-7, err_msg=name)

    from mlx_lm.utils import load
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(out)
    assert type(hf).__name__ == "Qwen3Config" and hf.head_dim == 64 and hf.tie_word_embeddings
    model, tok = load(str(out))
    ids = tok.encode("What is 2 + 3?")
    logits = logits_of(model, ids)
    assert logits.shape == (len(ids), config["vocab_size"]) and np.isfinite(logits).all()
    # qwen2 pre-tokenizer: every digit alone (the tiny vocab does have "12", "100"), and NFC first
    assert "12" in tok._tokenizer.get_vocab() or "Ġ12" in tok._tokenizer.get_vocab()
    assert [tok.decode([i]) for i in tok.encode("x 1200 the")] == ["x", " ", "1", "2", "0", "0", " the"]
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


# ------------------------------------------------------------------------------------------------
# Gemma 3: norm shift, config, sentencepiece tokenizer vs sentencepiece itself
# ------------------------------------------------------------------------------------------------

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_sentencepiece():
    import sentencepiece as spm

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "What is 12 + 7? The answer is 19.",
        "Paris is the capital of France.",
        "def add(a, b):\n    return a + b",
        "Hello world, hello there!",
        "user model start turn",
    ] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=340,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        character_coverage=1.0,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    # token types as llama.cpp's _create_vocab_sentencepiece + Gemma's special added tokens
    types = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)
    ]
    types[4] = types[5] = 3
    tok = {
        "model": "llama",
        "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)],
        "types": types,
        "bos": 2,
        "eos": 1,
        "pad": 0,
        "unk": 3,
        "add_bos": True,
        "chat_template": GEMMA_TEMPLATE,
    }
    return sp, tok


def test_gemma3_import(tmp_path):
    from mlx_lm.utils import load

    sp, tok = tiny_sentencepiece()
    # 6 layers: llama.cpp's fixed Gemma 3 pattern makes every 6th layer global (mlx-lm needs one)
    config = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": len(tok["tokens"]),
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "query_pre_attn_scalar": 16,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 2048,
    }
    ref, weights = random_model(config, seed=2)
    path = write_gguf(
        tmp_path / "tiny-gemma3.gguf",
        "gemma3",
        config,
        weights,
        tok,
        qtype=lambda n, w: Q.F16 if "mlp" in n else Q.F32,
    )
    out = import_gguf(path, tmp_path / "out")

    imported = load_weights(out)
    assert set(imported) == set(weights)
    for name, w in weights.items():
        tol = (
            2**-10 * np.abs(w).max() if ".mlp." in name else 1e-6
        )  # F16 rounding vs exact F32 (norms: -1 undone)
        np.testing.assert_allclose(imported[name], w, atol=tol, rtol=0, err_msg=name)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    from transformers import AutoConfig, AutoTokenizer

    hf = AutoConfig.from_pretrained(out)
    assert type(hf).__name__ == "Gemma3TextConfig" and hf.layer_types == cfg["layer_types"]
    assert hf.query_pre_attn_scalar == 16 and hf.head_dim == 16
    assert AutoTokenizer.from_pretrained(out).encode("the fox") == [2] + sp.encode("the fox")
    assert (cfg["head_dim"], cfg["query_pre_attn_scalar"], cfg["sliding_window"]) == (16, 16, 512)
    assert cfg["sliding_window_pattern"] == 6 and cfg["layer_types"] == ["sliding_attention"] * 5 + [
        "full_attention"
    ]
    assert cfg["tie_word_embeddings"] is True and cfg["rope_local_base_freq"] == 1e4

    model, mtok = load(str(out))
    for name, w in weights.items():  # fp16 MLP only; compare end to end against the reference model
        if ".mlp." in name:
            weights[name] = w.astype(np.float16).astype(np.float32)
    ref.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    ids = [2] + sp.encode("Hello world, the fox")
    np.testing.assert_allclose(logits_of(model, ids), logits_of(ref, ids), rtol=1e-4, atol=1e-4)

    # tokenizer: same pieces as sentencepiece itself, BOS added, specials whole, lossless decode
    for text in [
        "Hello world, 123 the fox\n  two spaces é 😀",
        "a\tb",
        "999 apples",
        "   ",
        "The answer is 19.",
    ]:
        assert mtok.encode(text) == [2] + sp.encode(text), text
        assert mtok.decode(mtok.encode(text), skip_special_tokens=True) == text
    chat = mtok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[:2] == [2, 4] and chat.count(2) == 1  # one BOS from the template, then <start_of_turn>


# ------------------------------------------------------------------------------------------------
# The real default model: SmolLM2-135M-Instruct Q4_1 (Q8_0 embeddings)
# ------------------------------------------------------------------------------------------------

SMOLLM_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from mlx_rft.models import default_gguf_path

    out = tmp_path_factory.mktemp("smollm") / "SmolLM2-135M-Instruct"
    return import_gguf(default_gguf_path(), out)


def test_default_import_files_and_config(smollm):
    assert sorted(p.name for p in smollm.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not list(smollm.parent.glob(".*"))  # no temporary folder left next to it
    cfg = json.loads((smollm / "config.json").read_text())
    # SmolLM2-135M-Instruct's published config.json
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert json.loads((smollm / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }

    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(smollm)
    assert type(hf).__name__ == "LlamaConfig" and hf.head_dim == 64 and hf.num_key_value_heads == 3


def test_default_weights_have_hf_names_and_shapes(smollm):
    from safetensors.numpy import load_file

    w = load_file(str(smollm / "model.safetensors"))
    names = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(30):
        p = f"model.layers.{i}."
        names.update(
            {
                p + "input_layernorm.weight": (576,),
                p + "post_attention_layernorm.weight": (576,),
                p + "self_attn.q_proj.weight": (576, 576),
                p + "self_attn.k_proj.weight": (192, 576),
                p + "self_attn.v_proj.weight": (192, 576),
                p + "self_attn.o_proj.weight": (576, 576),
                p + "mlp.gate_proj.weight": (1536, 576),
                p + "mlp.up_proj.weight": (1536, 576),
                p + "mlp.down_proj.weight": (576, 1536),
            }
        )
    assert {k: v.shape for k, v in w.items()} == names  # what LlamaForCausalLM (tied) expects
    assert all(v.dtype == np.float32 for v in w.values())


def test_default_dequantization_paths_agree_exactly(smollm):
    """mx.load + mx.dequantize (used) and the gguf package's NumPy dequantizers agree exactly."""
    from mlx_rft.models import default_gguf_path

    header = read_gguf_header(default_gguf_path())
    assert len(header.tensors) == 272
    assert {t.type_name for t in header.tensors} == {"Q8_0", "Q4_1", "F32"}
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight"
        for i in (0, 3, 29)
        for part in ("attn_q", "attn_k", "attn_v", "ffn_down", "attn_norm")
    }
    fast = dict(iter_tensors(default_gguf_path(), names, prefer_mlx=True))
    slow = dict(iter_tensors(default_gguf_path(), names, prefer_mlx=False))
    assert fast.keys() == slow.keys() == names
    for name in fast:
        np.testing.assert_array_equal(fast[name], slow[name], err_msg=name)

    from safetensors.numpy import load_file

    w = load_file(str(smollm / "model.safetensors"))
    np.testing.assert_array_equal(w["model.embed_tokens.weight"], fast["token_embd.weight"])
    np.testing.assert_array_equal(
        w["model.layers.3.self_attn.v_proj.weight"], fast["blk.3.attn_v.weight"]
    )
    q_gguf, q_hf = fast["blk.0.attn_q.weight"], w["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(q_gguf, q_hf)
    np.testing.assert_array_equal(llama_cpp_permute(q_hf, 9), q_gguf)  # un-permute is exactly inverted
    np.testing.assert_array_equal(
        llama_cpp_permute(w["model.layers.0.self_attn.k_proj.weight"], 3), fast["blk.0.attn_k.weight"]
    )


def test_default_model_answers_paris(smollm):
    from mlx_lm import generate
    from mlx_lm.utils import load

    model, tok = load(str(smollm))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    text = tok.decode(ids)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = generate(model, tok, prompt=ids, max_tokens=20)
    assert "Paris" in answer
    assert tok.eos_token_ids == {2}


# --- tokenizer: an independent pure-Python reference built straight from the GGUF vocabulary ---


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


class ReferenceSmolLMTokenizer:
    """SmolLM's tokenization, from the GGUF's tokens and merges: specials matched whole, each digit its
    own piece, then GPT-2's split, byte-to-unicode, and textbook lowest-rank-first BPE."""

    def __init__(self, tokens: list[str], merges: list[str], specials: list[str]):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.special = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")")
        self.byte_map = _bytes_to_unicode()

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (self.ranks.get((a, b), float("inf")), i)
                for i, (a, b) in enumerate(zip(parts, parts[1:]))
            ]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        out = []
        for chunk in self.special.split(text):
            if chunk in self.ids and self.special.fullmatch(chunk):
                out.append(self.ids[chunk])
                continue
            for piece in regex.split(r"(\p{N})", chunk):
                for word in _GPT2_SPLIT.findall(piece):
                    mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                    out.extend(self.ids[p] for p in self.bpe(mapped))
        return out


TOKENIZER_TEXTS = [
    "12345 + 678 = 13023",
    "<|im_start|>user\nhi<|im_end|>",
    "What is 3.14159 * 2? Answer: 6.28318",
    "Hello, world!  Two spaces,\ttab,\n\nnewlines\r\n and trailing   ",
    "naïve café — “quotes” ½ ² ٣ 😀 日本語のテキスト",
    "def f(x):\n    return x**2  # comment\n",
    "I'm sure they'll say it's fine; we've done 1,000,000 tests.",
    "<|endoftext|><|im_end|>text<|im_start|>assistant\n",
    "",
    " leading space and 007 agents, year 2024, v1.2.3",
]


def test_default_tokenizer_against_independent_reference(smollm):
    from tokenizers import Tokenizer

    from mlx_rft.models import default_gguf_path

    header = read_gguf_header(default_gguf_path())
    tokens, merges = header.metadata["tokenizer.ggml.tokens"], header.metadata["tokenizer.ggml.merges"]
    assert tokens[:17] == SMOLLM_SPECIALS
    ref = ReferenceSmolLMTokenizer(tokens, merges, SMOLLM_SPECIALS)
    fast = Tokenizer.from_file(str(smollm / "tokenizer.json"))
    for text in TOKENIZER_TEXTS:
        assert fast.encode(text).ids == ref.encode(text), text


def test_default_tokenizer_known_facts(smollm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tok.convert_tokens_to_ids(SMOLLM_SPECIALS) == list(range(17))
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert tok.encode("<|endoftext|>") == [0]
    ids = tok.encode("12345 + 678 = 13023")
    assert tok.convert_ids_to_tokens(ids) == [
        "1",
        "2",
        "3",
        "4",
        "5",
        "Ġ+",
        "Ġ",
        "6",
        "7",
        "8",
        "Ġ=",
        "Ġ",
        "1",
        "3",
        "0",
        "2",
        "3",
    ]
    for digits in ("0123456789", "99999"):  # every digit is its own token
        assert [tok.decode([i]) for i in tok.encode(digits)] == list(digits)
    # non-ASCII digits (Unicode \p{N}) are split one by one too, before the byte-level BPE
    assert tok.encode("٣٤") == tok.encode("٣") + tok.encode("٤")
    # ...and so are other \p{N} characters: " ½" is " " + "½" (GPT-2's split alone keeps " ½" together)
    assert tok.convert_ids_to_tokens(tok.encode(" ½")) == ["Ġ", "Â½"]
    assert tok.encode("hi") == [6004]  # no BOS added to plain text, as in SmolLM2's tokenizer
    for text in TOKENIZER_TEXTS + [
        "\t\t\n \u00a0\u2009",
        "x" * 300,
        unicodedata.normalize("NFD", "Ǖnicode"),
    ]:
        assert tok.decode(tok.encode(text)) == text, text


def test_cache_route_gives_the_same_folder(smollm, default_model_dir):
    """`ensure_default_model` (used by load_model(None)) goes through import_gguf into the cache."""
    from safetensors import safe_open

    from mlx_rft.models import is_default_imported

    assert is_default_imported()
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        a, b = (
            json.loads((default_model_dir / name).read_text()),
            json.loads((smollm / name).read_text()),
        )
        assert a == b, name
    with (
        safe_open(str(default_model_dir / "model.safetensors"), "numpy") as f,
        safe_open(str(smollm / "model.safetensors"), "numpy") as g,
    ):
        assert set(f.keys()) == set(g.keys())
        np.testing.assert_array_equal(
            f.get_tensor("model.layers.7.mlp.up_proj.weight"),
            g.get_tensor("model.layers.7.mlp.up_proj.weight"),
        )


# ------------------------------------------------------------------------------------------------
# Output handling and errors
# ------------------------------------------------------------------------------------------------


def test_overwrite_sharding_and_dtype(tiny_llama, llama_f32_import, tmp_path):
    gguf_path = next(llama_f32_import.parent.glob("*.gguf"))
    out = tmp_path / "m"
    import_gguf(gguf_path, out, dtype="bfloat16")
    with pytest.raises(MlxRftError, match="already exists.*--overwrite"):
        import_gguf(gguf_path, out)
    # overwrite + a shard size that forces several files with an index
    import_gguf(gguf_path, out, overwrite=True, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert not (out / "model.safetensors").exists()  # the bf16 single file was replaced, not merged
    from mlx_lm.utils import load

    model, tok = load(str(out))
    ref, _ = load(str(tiny_llama))
    ids = tok.encode("What is 2 + 3?")
    np.testing.assert_allclose(logits_of(model, ids), logits_of(ref, ids), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old folders left


def test_bfloat16_output(llama_f32_import, tmp_path):
    gguf_path = next(llama_f32_import.parent.glob("*.gguf"))
    out = import_gguf(gguf_path, tmp_path / "bf16", dtype="bfloat16")
    w = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in w.values()} == {mx.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_errors_name_problem_and_fix(tmp_path, tiny_llama):
    with pytest.raises(MlxRftError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model")
    with pytest.raises(MlxRftError, match="not a GGUF file"):
        import_gguf(text, tmp_path / "out")
    with pytest.raises(MlxRftError, match="not a file"):
        import_gguf(tmp_path, tmp_path / "out")

    config = json.loads((tiny_llama / "config.json").read_text())
    weights, tok = load_weights(tiny_llama), hf_tokenizer_section(tiny_llama)
    good = write_gguf(tmp_path / "good.gguf", "llama", config, weights, tok)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MlxRftError, match="truncated"):
        import_gguf(truncated, tmp_path / "out")

    phi = write_gguf(tmp_path / "phi.gguf", "phi3", config, {}, tok)
    with pytest.raises(MlxRftError, match=r"'phi3'.*supports gemma3, llama, qwen2, qwen3"):
        import_gguf(phi, tmp_path / "out")

    # a tensor type no dequantizer exists for (ints), named in the error
    import gguf

    bad = gguf.GGUFWriter(str(tmp_path / "int.gguf"), "llama")
    bad.add_tensor("token_embd.weight", np.zeros((4, 8), np.int32))
    bad.write_header_to_file()
    bad.write_kv_data_to_file()
    bad.write_tensors_to_file()
    bad.close()
    header = read_gguf_header(tmp_path / "int.gguf")
    from mlx_rft.gguf.tensors import check_quant_types

    with pytest.raises(MlxRftError, match="'token_embd.weight' is stored as I32"):
        check_quant_types(header)

    # a failure while writing weights leaves nothing behind
    incomplete = write_gguf(
        tmp_path / "incomplete.gguf",
        "llama",
        config,
        {k: v for k, v in weights.items() if "layers.1.mlp.down_proj" not in k},
        tok,
    )
    with pytest.raises(MlxRftError, match="lacks 1 weight"):
        import_gguf(incomplete, tmp_path / "sub" / "out")
    assert list((tmp_path / "sub").iterdir()) == []

    with pytest.raises(MlxRftError, match="unknown dtype"):
        import_gguf(good, tmp_path / "out", dtype="int8")


def test_cli(tmp_path, llama_f32_import):
    bad = tmp_path / "bad.txt"
    bad.write_text("nope")
    r = subprocess.run(
        [sys.executable, "-m", "mlx_rft", "import-gguf", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a GGUF file" in lines[0]

    gguf_path = next(llama_f32_import.parent.glob("*.gguf"))
    env = dict(os.environ, MLX_RFT_HOME=str(tmp_path / "home"))
    r = subprocess.run(
        [sys.executable, "-m", "mlx_rft", "import-gguf", str(gguf_path), "--dtype", "float16"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "home" / "models" / gguf_path.stem
    assert str(out) in r.stdout and (out / "config.json").is_file()
    assert {v.dtype for v in mx.load(str(out / "model.safetensors")).values()} == {mx.float16}


# ------------------------------------------------------------------------------------------------
# Qwen2, Llama 3 rope scaling, embedded tokenizer.json, end-of-turn ids
# ------------------------------------------------------------------------------------------------


def test_qwen2_with_biases(tiny_llama, tmp_path):
    from mlx_lm.utils import load
    from transformers import AutoConfig

    config = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 384,
        "rope_theta": 1e6,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    ref, weights = random_model(config, seed=4)
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    path = write_gguf(
        tmp_path / "tiny-qwen2.gguf",
        "qwen2",
        config,
        weights,
        hf_tokenizer_section(tiny_llama),
        pre="qwen2",
    )
    out = import_gguf(path, tmp_path / "out")
    imported = load_weights(out)
    assert set(imported) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(imported[name], w, err_msg=name)  # biases not permuted for Qwen
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and "head_dim" not in cfg and cfg["tie_word_embeddings"] is True
    assert type(AutoConfig.from_pretrained(out)).__name__ == "Qwen2Config"
    model, tok = load(str(out))
    ids = tok.encode("What is 2 + 3?")
    np.testing.assert_allclose(logits_of(model, ids), logits_of(ref, ids), rtol=1e-5, atol=1e-5)


def llama_cpp_rope_freqs(theta, dim, factor, low, high, original) -> np.ndarray:
    """llama.cpp LlamaModel.generate_extra_tensors for rope_type llama3."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tiny_llama, tmp_path):
    from mlx_lm.utils import load

    from mlx_rft.gguf.config import _llama3_rope_scaling

    # Llama 3.2's parameters at its real head_dim and theta
    factors = llama_cpp_rope_freqs(500000.0, 64, 32.0, 1.0, 4.0, 8192)
    assert 1.0 in factors and 32.0 in factors and ((factors > 1) & (factors < 32)).any()
    assert _llama3_rope_scaling(factors.astype(np.float64), 64, 500000.0) == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    with pytest.raises(MlxRftError, match="rope_freqs"):
        _llama3_rope_scaling(factors[::-1].astype(np.float64), 64, 500000.0)

    config = json.loads((tiny_llama / "config.json").read_text())
    freqs = llama_cpp_rope_freqs(config["rope_theta"], config["head_dim"], 8.0, 1.0, 4.0, 8192)
    path = write_gguf(
        tmp_path / "llama31.gguf",
        "llama",
        config,
        load_weights(tiny_llama),
        hf_tokenizer_section(tiny_llama),
        extra_tensors={"rope_freqs.weight": freqs},
    )
    out = import_gguf(path, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in load_weights(out)
    model, _ = load(str(out))
    rope = model.model.layers[0].self_attn.rope
    assert type(rope).__name__ == "Llama3RoPE"
    # mlx-lm's llama3 frequencies (multipliers applied) == base frequencies * llama.cpp's factors
    base = config["rope_theta"] ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(np.array(rope._freqs), base * freqs, rtol=1e-5)


def test_embedded_tokenizer_json_and_unknown_pre_tokenizer(tiny_llama, tmp_path):
    from gguf import GGUFValueType
    from tokenizers import Tokenizer

    config = json.loads((tiny_llama / "config.json").read_text())
    weights, tok = load_weights(tiny_llama), hf_tokenizer_section(tiny_llama)
    unknown = write_gguf(tmp_path / "unknown.gguf", "llama", config, weights, tok, pre="mystery-pre")
    with pytest.raises(MlxRftError, match="pre-tokenizer 'mystery-pre'"):
        import_gguf(unknown, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    embedded = (tiny_llama / "tokenizer.json").read_text()
    path = write_gguf(
        tmp_path / "embedded.gguf",
        "llama",
        config,
        weights,
        tok,
        pre="mystery-pre",
        extra_metadata={"tokenizer.huggingface.json": (embedded, GGUFValueType.STRING)},
    )
    out = import_gguf(path, tmp_path / "out")
    ref, got = (
        Tokenizer.from_file(str(tiny_llama / "tokenizer.json")),
        Tokenizer.from_file(str(out / "tokenizer.json")),
    )
    for text in PROMPT_TEXTS:
        assert got.encode(text).ids == ref.encode(text).ids


def test_eos_ids_include_end_of_turn_tokens(tmp_path):
    from mlx_rft.gguf.header import GGUFHeader
    from mlx_rft.gguf.tokenizer import eos_ids

    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "hello"]
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3, 3, 3, 1],
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.chat_template": "{{ m['content'] }}<|eot_id|>",
    }
    assert eos_ids(GGUFHeader(tmp_path, 3, meta, ())) == [1, 2]  # eos, then the template's <|eot_id|>
    meta["tokenizer.ggml.eom_token_id"] = 3
    assert eos_ids(GGUFHeader(tmp_path, 3, meta, ())) == [1, 3, 2]


def test_replace_dir_keeps_a_folder_another_import_finished_first(tmp_path):
    from mlx_rft.gguf.importer import _replace_dir

    out, mine = tmp_path / "model", tmp_path / ".model.importing-x"
    out.mkdir()
    (out / "config.json").write_text("theirs")
    mine.mkdir()
    (mine / "config.json").write_text("mine")
    _replace_dir(mine, out, overwrite=False)  # lost the race: theirs stays, ours is discarded
    assert (out / "config.json").read_text() == "theirs" and not mine.exists()
    mine.mkdir()
    (mine / "config.json").write_text("mine")
    _replace_dir(mine, out, overwrite=True)
    assert (out / "config.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
