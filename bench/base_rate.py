"""Base rate of candidate built-in tasks: how often the untrained model already gets them right.

GRPO learns only from groups whose completions get different rewards, so a good default task is one
the model solves sometimes but not often. For each candidate (reasoning-gym task, options, prompt
format) this samples G completions for each of P prompts and reports:

  acc         mean of the task's accuracy reward: reasoning-gym's scorer on the <answer> content
              (no tag = 0; reasoning-gym's partial credit kept unless the task turns it off)
  acc@num     the same with the last-number fallback when no tag is present
  tag         fraction of completions with exactly one closed <answer> tag
  mixed       fraction of prompts whose G rewards are not all equal (those give GRPO a gradient)
  pass@G      fraction of prompts with at least one correct completion
  greedy      greedy (temperature 0) accuracy on the same prompts
  len         mean completion length in tokens
  trunc       fraction of completions cut at --max-tokens
  time        seconds for sampling + greedy of this candidate

Usage:
  python bench/base_rate.py                        # all candidates, default model
  python bench/base_rate.py --only chain_sum_fewshot --prompts 64
  python bench/base_rate.py --only default --split eval --prompts 64   # the default's held-out set
  python bench/base_rate.py --model PATH --json out.json
"""

from __future__ import annotations

import mlx_rft  # noqa: F401  (loads the fast BLAS before mlx.core)

import argparse
import copy
import json
import time

import mlx.core as mx
import numpy as np
from mlx_lm.generate import batch_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_rft import cpu
from mlx_rft.data import PromptDataset
from mlx_rft.models import load_model
from mlx_rft.rewards.verifiers import extract_answer_tag
from mlx_rft.data.tasks import DEFAULT_TASK, extract_answer, load_task

SMALL_SUM = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
WORKED = "{metadata[expression]} = {answer}\n<answer>{answer}</answer>"  # one-line worked shots

# label -> load_task kwargs ("fewshot": two solved examples as earlier chat turns; "direct": none)
CANDIDATES: dict[str, dict] = {
    "default": dict(name=DEFAULT_TASK.name),  # the built-in default (mlx_rft.data.tasks.PRESETS)
    "chain_sum_direct": dict(name="chain_sum", prompt_format="direct", **SMALL_SUM),
    "chain_sum_fewshot": dict(name="chain_sum", **SMALL_SUM),
    "add_1digit_fewshot": dict(name="basic_arithmetic", min_terms=2, max_terms=2, min_digits=1,
                               max_digits=1, operators=("+",), allow_parentheses=False,
                               allow_negation=False),
    "add_1digit_worked": dict(name="basic_arithmetic", min_terms=2, max_terms=2, min_digits=1,
                              max_digits=1, operators=("+",), allow_parentheses=False,
                              allow_negation=False, shot_format=WORKED),
    "chain_sum_worked": dict(name="chain_sum", shot_format=WORKED, **SMALL_SUM),
    "chain_sum3_worked": dict(name="chain_sum", shot_format=WORKED, min_terms=3, max_terms=3,
                              min_digits=1, max_digits=1),
    "chain_sum_1to2digit_worked": dict(name="chain_sum", shot_format=WORKED, min_terms=2,
                                       max_terms=2, min_digits=1, max_digits=2),
    "chain_sum_2digit_worked": dict(name="chain_sum", shot_format=WORKED, min_terms=2, max_terms=2,
                                    min_digits=2, max_digits=2),
    "products_1digit_fewshot": dict(name="products", min_digits=1, max_digits=1),
    "leg_counting_fewshot": dict(name="leg_counting", min_animals=1, max_animals=1, max_instances=3),
    "letter_counting_fewshot": dict(name="letter_counting", min_words=1, max_words=2),
    "count_bits_fewshot": dict(name="count_bits", max_n=15),
    "gcd_small_fewshot": dict(name="gcd", min_value=1, max_value=20),
    "aiw_fewshot": dict(name="aiw", max_entities=3),
    "spell_backward_fewshot": dict(name="spell_backward", min_word_len=3, max_word_len=4),
    "word_reversal_fewshot": dict(name="word_sequence_reversal", min_words=3, max_words=3),
    "word_sorting_fewshot": dict(name="word_sorting", min_words=3, max_words=3, min_word_length=3,
                                 max_word_length=6),
    # Two-answer tasks (True/False, Yes/No): where a constant answer already scores about half
    "isomorphic2_fewshot": dict(name="isomorphic_strings", min_string_length=2, max_string_length=2),
    "isomorphic3_fewshot": dict(name="isomorphic_strings", min_string_length=2, max_string_length=3),
    "ransom_note_short_fewshot": dict(name="ransom_note", max_note_length=2, max_magazine_length=6),
    "syllogism_fewshot": dict(name="syllogism"),
}


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest shared prefix, leaving every sequence at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    while n > 0 and any(s[:n] != seqs[0][:n] for s in seqs):
        n -= 1
    return n


def generate(model, tokenizer, prompt_ids, temp, max_tokens, seed):
    """batch_generate with the prompts' shared prefix (system prompt + shots) prefilled once.

    Every row gets its own copy of the prefix KV cache, so only the question is prefilled per row
    (same outputs as a full prefill, a fraction of the prefill time).
    """
    n = common_prefix_len(prompt_ids)
    caches = None
    if n:
        prefix = make_prompt_cache(model)
        model(mx.array(prompt_ids[0][:n])[None], cache=prefix)
        mx.eval([c.state for c in prefix])
        caches = [copy.deepcopy(prefix) for _ in prompt_ids]
    mx.random.seed(seed)
    out = batch_generate(
        model, tokenizer, [p[n:] for p in prompt_ids], prompt_caches=caches, max_tokens=max_tokens,
        sampler=make_sampler(temp), return_token_ids=True,
        completion_batch_size=len(prompt_ids), prefill_batch_size=min(len(prompt_ids), 32),
    )
    return out.texts, [len(t) for t in out.token_ids]


def measure(model, tokenizer, label, kwargs, *, prompts, samples, max_tokens, temp, seed, split):
    if split == "eval":  # the task's fixed held-out set, as the trainer evaluates it
        task = load_task(size=1, seed=seed, eval_size=prompts, **kwargs)
        rows = task.eval_rows
    else:
        task = load_task(size=prompts, seed=seed, eval_size=0, **kwargs)
        rows = task.rows
    ds = PromptDataset.from_rows(rows, tokenizer, system_prompt=task.system_prompt)
    cols = {k: [e.columns[k] for e in ds] for k in ds[0].columns}
    score = task.reward_funcs[0]  # accuracy

    def rewards(texts, repeat):
        rep = {k: [v for v in vals for _ in range(repeat)] for k, vals in cols.items()}
        return np.array(score([""] * len(texts), texts, **rep), dtype=np.float64)

    start = time.perf_counter()
    ids = [e.prompt_ids for e in ds for _ in range(samples)]  # groups are contiguous
    texts, lengths = generate(model, tokenizer, ids, temp, max_tokens, seed)
    greedy_texts, _ = generate(model, tokenizer, [e.prompt_ids for e in ds], 0.0, max_tokens, seed)
    elapsed = time.perf_counter() - start

    acc = rewards(texts, samples)
    lenient = load_task(size=1, eval_size=0, answer_fallback="number", **kwargs).reward_funcs[0]
    rep = {k: [v for v in vals for _ in range(samples)] for k, vals in cols.items()}
    acc_num = np.array(lenient([""] * len(texts), texts, **rep))
    groups = acc.reshape(prompts, samples)
    return dict(
        label=label,
        acc=float(acc.mean()),
        acc_num=float(acc_num.mean()),
        tag=float(np.mean([bool(extract_answer_tag(t)) for t in texts])),
        mixed=float(np.mean(groups.max(1) > groups.min(1))),
        pass_at_g=float(np.mean(groups.max(1) >= 1.0)),
        greedy=float(rewards(greedy_texts, 1).mean()),
        len=float(np.mean(lengths)),
        truncated=float(np.mean([n >= max_tokens for n in lengths])),
        prompt_len=float(np.mean([len(e.prompt_ids) for e in ds])),
        time=elapsed,
        examples=[
            dict(q=ds[i].columns["question"], answer=ds[i].columns["answer"], completion=texts[i * samples],
                 extracted=extract_answer(texts[i * samples]))
            for i in range(3)
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--only", nargs="*", default=None, help=f"candidates to run: {', '.join(CANDIDATES)}")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "eval"), default="train",
                   help="prompts from the training rows (seeded) or the task's fixed held-out set")
    p.add_argument("--show", action="store_true", help="print example completions")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    labels = args.only or list(CANDIDATES)
    unknown = [x for x in labels if x not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    model, tokenizer = load_model(args.model)
    print(
        f"P={args.prompts} prompts x G={args.samples} samples, temp {args.temp}, "
        f"max {args.max_tokens} new tokens, seed {args.seed}, {args.split} prompts\n"
    )
    header = (
        "| candidate | acc | acc@num | tag | mixed | pass@G | greedy | len | trunc | prompt len "
        "| time (s) |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results = []
    with cpu.speedups(model):
        for label in labels:
            r = measure(
                model, tokenizer, label, CANDIDATES[label], prompts=args.prompts, samples=args.samples,
                max_tokens=args.max_tokens, temp=args.temp, seed=args.seed, split=args.split,
            )
            results.append(r)
            print(
                f"| {label} | {r['acc']:.3f} | {r['acc_num']:.3f} | {r['tag']:.3f} | {r['mixed']:.3f} | "
                f"{r['pass_at_g']:.3f} | {r['greedy']:.3f} | {r['len']:.1f} | {r['truncated']:.3f} | "
                f"{r['prompt_len']:.0f} | "
                f"{r['time']:.1f} |",
                flush=True,
            )
            if args.show:
                for ex in r["examples"]:
                    print(f"    Q: {ex['q']!r} (answer {ex['answer']!r})\n    -> {ex['completion']!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=2)


if __name__ == "__main__":
    main()
