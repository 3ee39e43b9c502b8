"""Base rates of a tool-use environment, with and without its tools, before any training.

A tool-use job is worth running when the model cannot solve the task alone but sometimes can with
the tool. On the environment's held-out rows (the ones `mlx-rft train --env NAME` evaluates on)
this reports:

  with tool, greedy       the held-out accuracy the trainer's "eval before" shows
  with tool, sampled      mean reward of G episodes per prompt at --temperature, the share of
                          prompts whose G rewards differ (GRPO learns only from those), tool calls
                          and tool errors per episode
  without tool, greedy    the same questions asked directly (the demonstration answers at once,
                          no tool described), one turn: what the model does in its head

Usage:
  python bench/tool_base_rate.py                               # arithmetic, 64 held-out rows
  python bench/tool_base_rate.py --env arithmetic --prompts 64 --temperature 0.7 --samples 4
"""

from __future__ import annotations

import mlx_rft  # noqa: F401  (loads the fast BLAS before mlx.core)

import argparse
import dataclasses
import json
import re
import time

import numpy as np

from mlx_rft.config import GRPOConfig
from mlx_rft.data.prompts import render_prompt
from mlx_rft.data.tasks import extract_answer
from mlx_rft.evaluate import columns_per_row
from mlx_rft.models import load_model
from mlx_rft.rollout import generate_rollouts
from mlx_rft.train.run_data import build_run_data
from mlx_rft.types import SamplingConfig


def episodes(model, tok, data, examples, G, sampling, seed):
    ro = data.episodes.rollouts(model, tok, examples, G, sampling, seed=seed)
    cols = columns_per_row(examples, G)
    cols["episode"] = ro.episodes
    scores = np.nan_to_num(np.asarray(data.eval_reward([e.prompt for e in examples for _ in range(G)],
                                                       ro.texts, cols).total, dtype=float))
    return scores.reshape(-1, G), ro.episodes


def without_tool(messages: list[dict]) -> list[dict]:
    """The opening with the tool taken out: answer-only system text and demonstration."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append({"role": "system", "content": "Solve the problem. Finish with <answer>NUMBER</answer>."})
        elif m["role"] == "tool" or (m["role"] == "assistant" and "<tool_call>" in m["content"]):
            continue
        else:
            out.append({**m, "content": m["content"].replace(" Use the calculator.", "")})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="arithmetic")
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, tok = load_model(args.model)
    cfg = GRPOConfig(env=args.env, task_size=8, eval_size=args.prompts, max_new_tokens=args.max_new_tokens)
    data = build_run_data(cfg, tok)
    examples = list(data.eval)
    out = {"env": args.env, "prompts": len(examples)}
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)

    t0 = time.perf_counter()
    s, eps = episodes(model, tok, data, examples, 1, greedy, seed=0)
    out["with_tool_greedy"] = float(s.mean())
    out["with_tool_greedy_calls"] = float(np.mean([e.tool_calls for e in eps]))
    sampled = dataclasses.replace(greedy, temperature=args.temperature)
    s, eps = episodes(model, tok, data, examples, args.samples, sampled, seed=1)
    out["with_tool_sampled"] = float(s.mean())
    out["with_tool_mixed_groups"] = float(np.mean(s.max(axis=1) != s.min(axis=1)))
    out["with_tool_calls"] = float(np.mean([e.tool_calls for e in eps]))
    out["with_tool_errors"] = float(np.mean([e.tool_errors for e in eps]))
    out["with_tool_turns"] = float(np.mean([e.turns for e in eps]))

    alone = [render_prompt(tok, without_tool(e.columns["messages"]))[1] for e in examples]
    ro = generate_rollouts(model, tok, alone, 1, dataclasses.replace(greedy, stop=["</answer>"], include_stop=True))
    right = [extract_answer(t) is not None and re.sub(r"[ ,]", "", extract_answer(t)) == e.columns["answer"]
             for t, e in zip(ro.texts, examples)]
    out["without_tool_greedy"] = float(np.mean(right))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
