"""Multi-turn rollout throughput against single-turn at the same batch shape.

    python bench/bench_episodes.py                       # default model, 4 x 8, 3 turns x 32 tokens
    python bench/bench_episodes.py --turns 4 --turn-tokens 24 --reps 3

Both arms sample the same number of model tokens per row from the same prompts (EOS ignored, so
every turn has full length):
  single: one turn of turns x turn_tokens tokens
  multi:  `turns` turns of turn_tokens tokens; after each, a scripted environment replies with a
          tool message (rendered by the chat template, about 20 tokens) that is fed into the row's
          own KV cache before its next turn
The figure is model (sampled) tokens per second of wall time, prefill included; the arms
alternate, and the best of --reps runs of each is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_rft  # noqa: E402,F401  (fast BLAS before mlx.core)

from mlx_rft.episodes import Environment, EpisodeLimits, EpisodeRunner, make_envs  # noqa: E402
from mlx_rft.episodes.render import ReplyRenderer  # noqa: E402
from mlx_rft.models import load_model  # noqa: E402
from mlx_rft.rollout import RolloutStats, generate_rollouts  # noqa: E402
from mlx_rft.types import SamplingConfig  # noqa: E402

QUESTIONS = [
    "A farmer plants 628 rows of 777 trees. How many trees does he plant?",
    "A library has 706 shelves with 657 books on each. How many books are there?",
    "Each of 251 boxes holds 156 pens, and 858 more pens are loose. How many pens are there?",
    "A train carries 910 passengers on each of 995 trips. How many passengers in total?",
]


class Replies(Environment):
    """Answers every turn with the same tool result (the limits end the episode)."""

    def step(self, messages):
        return [{"role": "tool", "content": "The calculator returned 487956; now give the answer."}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--turn-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, tok = load_model(args.model)
    rows = [{"prompt": QUESTIONS[i % len(QUESTIONS)]} for i in range(args.prompts)]
    renderer = ReplyRenderer(tok)
    B, G = args.prompts, args.group

    def single():
        ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
               for r in rows]
        stats = RolloutStats()
        t0 = time.perf_counter()
        generate_rollouts(model, tok, ids, G, SamplingConfig(max_new_tokens=args.turns * args.turn_tokens),
                          seed=0, ignore_eos=True, stats=stats)
        return stats.completion_tokens, time.perf_counter() - t0, stats

    def multi():
        envs, openings = make_envs(Replies, rows, G)
        limits = EpisodeLimits(max_turns=args.turns, max_tokens=10_000)
        runner = EpisodeRunner(envs, openings, renderer, limits)
        ids = [tok.apply_chat_template(o, add_generation_prompt=True) for o in openings[::G]]
        stats = RolloutStats()
        t0 = time.perf_counter()
        generate_rollouts(model, tok, ids, G, SamplingConfig(max_new_tokens=args.turn_tokens),
                          seed=0, ignore_eos=True, stats=stats, turns=runner)
        assert all(e.turns == args.turns for e in runner.episodes)
        return stats.completion_tokens, time.perf_counter() - t0, stats

    single(), multi()  # warm-up
    best = {"single": 0.0, "multi": 0.0}
    detail = {}
    for _ in range(args.reps):
        for name, fn in (("single", single), ("multi", multi)):
            tokens, seconds, stats = fn()
            rate = tokens / seconds
            if rate > best[name]:
                best[name] = rate
                detail[name] = {"model_tokens": tokens, "seconds": round(seconds, 2),
                                "env_tokens": stats.env_tokens, "reply_feeds": stats.reply_feeds,
                                "decode_steps": stats.decode_steps}
    out = {
        "shape": f"{B} x {G}", "turns": args.turns, "turn_tokens": args.turn_tokens,
        "single_tokens_per_s": round(best["single"], 1), "multi_tokens_per_s": round(best["multi"], 1),
        "ratio": round(best["multi"] / best["single"], 3), "detail": detail,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
