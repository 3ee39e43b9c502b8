"""The tokenizer, rebuilt from `tokenizer.ggml.*`: byte-level BPE directly with `tokenizers` (with
the pre-tokenizer named by `tokenizer.ggml.pre`), sentencepiece vocabularies via transformers'
GGUF converter."""

from __future__ import annotations

import logging

from ..errors import MlxRftError
from .header import GGUFHeader

logger = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Chat-turn terminators that llama.cpp treats as end-of-generation when the template uses them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as in the models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt-2", "gpt2", "starcoder", "refact", "olmo", "jais", "exaone")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")


def special_ids(header: GGUFHeader) -> dict[str, int | None]:
    meta = header.metadata
    return {
        "bos": meta.get("tokenizer.ggml.bos_token_id"),
        "eos": meta.get("tokenizer.ggml.eos_token_id"),
        "unk": meta.get("tokenizer.ggml.unknown_token_id"),
        "pad": meta.get("tokenizer.ggml.padding_token_id"),
        "eot": meta.get("tokenizer.ggml.eot_token_id"),
        "eom": meta.get("tokenizer.ggml.eom_token_id"),
    }


def eos_ids(header: GGUFHeader) -> list[int]:
    """EOS plus the end-of-turn/message tokens generation should also stop at."""
    ids = special_ids(header)
    tokens = header.metadata.get("tokenizer.ggml.tokens") or []
    types = header.metadata.get("tokenizer.ggml.token_type") or []
    template = header.metadata.get("tokenizer.chat_template") or ""
    out = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind == _CONTROL and text in _END_OF_TURN_TOKENS and text in template:
            out.append(i)
    return list(dict.fromkeys(out))


def _byte_level_pre_tokenizer(pre: str):
    """(normalizer, pre_tokenizer, ignore_merges) for a byte-level BPE named `pre` by llama.cpp."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def split(pattern: str):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), raw_bytes]
        )

    if pre in _GPT2_PRE:
        return None, byte_level, False
    if pre == "smollm":
        # SmolLM's own tokenizer.json: every digit is its own pre-token, then GPT-2's split.
        return (
            None,
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
            False,
        )
    if pre in _LLAMA3_PRE:
        # Llama 3's tokenizer.json sets ignore_merges (a whole-word vocabulary hit wins).
        return None, split(_LLAMA3_SPLIT), True
    if pre in _QWEN2_PRE:
        return normalizers.NFC(), split(_QWEN2_SPLIT), False
    try:  # transformers >= 5 knows more of llama.cpp's pre-tokenizer names
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = {}
    if pre in GGUF_PRE_TOKENIZER_SPLITS:
        return None, split(GGUF_PRE_TOKENIZER_SPLITS[pre]), False
    known = sorted({"smollm", *_GPT2_PRE, *_LLAMA3_PRE, *_QWEN2_PRE, *GGUF_PRE_TOKENIZER_SPLITS})
    raise MlxRftError(
        f"the GGUF's tokenizer uses pre-tokenizer {pre!r}, which the importer does not know, so it "
        f"would split text differently from the model's training; known: {', '.join(known)}"
    )


def _byte_level_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` for a GPT-2 style byte-level BPE (tokenizer.ggml.model = gpt2)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab.setdefault(text, i)
    if len(vocab) != len(tokens):
        logger.warning(
            "the GGUF vocabulary repeats %d token strings; keeping each one's first id",
            len(tokens) - len(vocab),
        )
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise MlxRftError(f"the GGUF's tokenizer has a malformed merge {m!r}; the file is corrupt")
        merges.append((parts[0], parts[1]))
    normalizer, pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(
        meta.get("tokenizer.ggml.pre") or "default"
    )
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL
    ]
    added = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    return tok


def _converted_tokenizer(header: GGUFHeader):
    """Non-byte-level vocabularies (sentencepiece, unigram) through transformers' GGUF converter."""
    meta = header.metadata
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        raise MlxRftError(
            f"{header.path} has a {meta.get('tokenizer.ggml.model')!r} tokenizer, whose import needs "
            "transformers>=5; upgrade it with `pip install -U transformers`"
        ) from None
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        hf: meta[f"tokenizer.{key}"] for key, hf in renames.items() if f"tokenizer.{key}" in meta
    }
    try:
        tok, _ = convert_gguf_tokenizer(header.architecture, tokenizer_dict)
    except (ValueError, KeyError) as e:
        raise MlxRftError(f"cannot rebuild the tokenizer of {header.path}: {e}") from e
    return tok


def _post_processor(tokens: list[str], bos: int | None, eos: int | None, add_bos: bool, add_eos: bool):
    """BOS/EOS insertion, laid out as transformers' TokenizersBackend builds it."""
    from tokenizers import processors

    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None

    def sequence(segment: str, type_id: int) -> str:
        parts = [f"{tokens[bos]}:{type_id}"] if add_bos else []
        parts.append(f"${segment}:{type_id}")
        return " ".join(parts + ([f"{tokens[eos]}:{type_id}"] if add_eos else []))

    single, pair = sequence("A", 0), f"{sequence('A', 0)} {sequence('B', 1)}"
    special = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_files(header: GGUFHeader) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json dict) rebuilt from the GGUF's tokenizer metadata."""
    meta = header.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    model = meta.get("tokenizer.ggml.model")
    if not tokens or not model:
        raise MlxRftError(
            f"{header.path} carries no tokenizer (tokenizer.ggml.tokens/model); use a GGUF converted "
            "with its vocabulary, or the original Hugging Face checkpoint"
        )
    ids = special_ids(header)
    for name, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise MlxRftError(
                f"{header.path}: {name} token id {i} is outside the vocabulary; the file is corrupt"
            )
    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    if "tokenizer.huggingface.json" in meta:  # the original tokenizer.json, embedded verbatim
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(meta["tokenizer.huggingface.json"])
    elif model == "gpt2":
        tok = _byte_level_tokenizer(meta)
    else:
        tok = _converted_tokenizer(header)
    tok.post_processor = _post_processor(tokens, ids["bos"], ids["eos"], add_bos, add_eos)

    def text(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(ids["bos"]),
        "eos_token": text(ids["eos"]),
        "unk_token": text(ids["unk"]),
        "pad_token": text(ids["pad"]),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(header.arch_key("context_length", 4096)),
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    else:
        logger.warning("%s has no chat template; chat-style prompts will need one", header.path.name)
    return tok.to_str(pretty=False), config
