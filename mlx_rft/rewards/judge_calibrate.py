"""Is this judge any use? Score a rubric's calibration pairs and see whether it orders them.

A rubric's `calibration:` list holds pairs of responses to one prompt where one is clearly
better (a right answer and a wrong one, a helpful reply and a refusal). The judge scores every
response; then

    agreement  fraction of pairs whose better response scored strictly higher,
    ties       fraction of pairs whose two responses scored the same (within 1e-6),
    spread     standard deviation of all the scores.

A judge that gives everything the same score shows ties near 1 and spread near 0, and would
give GRPO zero-variance groups; one that orders the pairs at random shows agreement near 0.5.

    mlx-rft judge-check --spec "judge(rubric='examples/rubrics/helpfulness.yaml', local_model='path/to/judge')"

prints the three numbers and exits 1 when agreement is below --min-agreement (default 0.8) or
ties above --max-ties (default 0.2), so it can gate a training script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import numpy as np

from ..errors import MlxRftError
from .judge import TIE_TOL
from .rubric import Rubric, load_rubric


def calibrate(judge_reward: Callable, rubric: Rubric | str | os.PathLike | None = None) -> dict[str, float]:
    """{"agreement", "ties", "spread", "pairs", "unscored"} of `judge_reward` on the rubric's
    calibration pairs (default: the judge's own rubric). An unscored pair counts as not agreeing.

    Every pair goes to the judge as a group of two (pairwise judges compare them directly), in
    one call, without the judge's unordered-steps stop.
    """
    from .reward_set import RewardSet

    if rubric is None:
        rubric = getattr(judge_reward, "rubric", None)
        if rubric is None:
            raise MlxRftError("calibrate: pass the rubric whose calibration pairs to use")
    if not isinstance(rubric, Rubric):
        rubric = load_rubric(rubric)
    pairs = rubric.calibration
    if not pairs:
        raise MlxRftError(
            f"{rubric.source or 'rubric ' + repr(rubric.name)} has no calibration pairs; add a "
            "'calibration:' list of {prompt, better, worse} to check a judge with it"
        )
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    completions = [c for p in pairs for c in (p.better, p.worse)]
    columns: dict[str, list] = {}
    question_column = getattr(judge_reward, "question_column", None)
    if question_column:
        columns[question_column] = list(prompts)
    if rubric.reference_column:
        columns[rubric.reference_column] = [p.reference for p in pairs for _ in (0, 1)]
    score = getattr(judge_reward, "score", judge_reward)
    result = RewardSet([score])(prompts, completions, columns)
    values = next(iter(result.per_func.values()))
    better, worse = values[0::2], values[1::2]
    scored = ~(np.isnan(better) | np.isnan(worse))
    tied = scored & (np.abs(better - worse) <= TIE_TOL)
    right = scored & ~tied & (better > worse)
    finite = values[~np.isnan(values)]
    return {
        "agreement": float(right.mean()),
        "ties": float(tied.mean()),
        "spread": float(finite.std()) if finite.size else 0.0,
        "pairs": float(len(pairs)),
        "unscored": float((~scored).sum()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-rft judge-check",
        description="Score a judge reward spec on its rubric's calibration pairs: agreement (pairs "
        "ordered right), ties and spread of the scores. Exits 1 when the judge falls short.",
    )
    parser.add_argument("--spec", required=True, help="a judge reward spec, e.g. \"judge(rubric='r.yaml', "
                        "url='http://127.0.0.1:8080/v1', model='default_model', method='probs')\"")
    parser.add_argument("--rubric", default=None, help="take the calibration pairs from this rubric file "
                        "instead of the spec's")
    parser.add_argument("--min-agreement", type=float, default=0.8, help="lowest acceptable agreement")
    parser.add_argument("--max-ties", type=float, default=0.2, help="highest acceptable fraction of ties")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .registry import resolve_reward

    judge = resolve_reward(args.spec)
    if not getattr(judge, "is_judge", False):
        raise MlxRftError(f"--spec {args.spec!r} is not a judge(...) reward")
    stats = calibrate(judge, args.rubric)
    ok = stats["agreement"] >= args.min_agreement and stats["ties"] <= args.max_ties
    if args.json:
        print(json.dumps({**stats, "ok": ok}))
    else:
        rubric = judge.rubric if args.rubric is None else load_rubric(args.rubric)
        print(f"judge {judge.backend!r}, method {judge.method!r}, rubric {rubric.source or rubric.name}")
        print(
            f"pairs {stats['pairs']:.0f}: agreement {stats['agreement']:.2f}, ties {stats['ties']:.2f}, "
            f"spread {stats['spread']:.3f}" + (f", {stats['unscored']:.0f} unscored" if stats["unscored"] else "")
        )
        if ok:
            print("ok: the judge orders the clear pairs")
        else:
            others = " or ".join(f"method={m!r}" for m in ("probs", "pairwise") if m != judge.method)
            print(
                f"weak judge (wanted agreement >= {args.min_agreement:g}, ties <= {args.max_ties:g}): "
                f"try {others}, a bigger judge model, or a clearer rubric"
            )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    try:
        main()
    except MlxRftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
