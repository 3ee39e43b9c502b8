"""`mlx-rft generate`: chat generation from a model folder (default: the embedded model)."""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-rft generate",
        description="Generate a chat reply with a model folder (default: the embedded "
        "SmolLM2-135M-Instruct), optionally with LoRA adapters from a training run.",
    )
    p.add_argument("--prompt", "-p", required=True, help="the user message")
    p.add_argument("--model", default=None, help="HF-format model folder (default: embedded model)")
    p.add_argument("--adapter-path", default=None, help="LoRA adapter folder from `mlx-rft train`")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-tokens", "-m", type=int, default=128, help="maximum new tokens")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: by device)")
    p.add_argument("--verbose", action="store_true", help="print speed after the reply")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .types import SamplingConfig

    # The same sampling rules as training, checked before the model loads.
    SamplingConfig(
        temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_tokens,
    ).validate()
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from . import cpu
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, adapter_path=args.adapter_path)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    mx.random.seed(args.seed)
    sampler = make_sampler(args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k)
    processors = make_logits_processors(repetition_penalty=args.repetition_penalty)
    start = time.perf_counter()
    response = None
    with cpu.speedups(model):  # CPU kernels and allocator while decoding
        for response in stream_generate(
            model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
            logits_processors=processors,
        ):
            print(response.text, end="", flush=True)
    print()
    if args.verbose and response is not None:
        elapsed = time.perf_counter() - start
        print(
            f"[{response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s, "
            f"{elapsed:.2f} s]",
            file=sys.stderr,
        )
