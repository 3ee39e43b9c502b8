"""RLAIF: an LLM judge as a reward. A rubric (rubric.py) makes the judge's prompts; a back end
(judge_backends.py: a local MLX model or an OpenAI-compatible server) answers them.

Three ways to turn the judge's answers into rewards (`method=`):

- "probs" (default): one overall score per completion, read from the judge's next-token
  distribution: the expected score over the scale's integer tokens, renormalised (G-Eval;
  maths in judge_scoring.py). No decoding; differs between completions whenever the judge's
  belief does, where a sampled number is the same for all of them from a small judge. A server
  that returns no log-probs is read from its (short) reply text instead (`text_fallbacks`).
- "text": the judge writes per-criterion scores as JSON, parsed by the rubric; needs a judge
  that follows the format, and gives per-criterion sub-scores (RewardOutput.details).
- "pairwise": completions of the same prompt compared two at a time, both orders, ranked by a
  Bradley-Terry fit (judge_pairwise.py). Rewards are relative to the group: the strongest signal
  from a weak judge, at G * opponents requests per group instead of G.

Groups are found by prompt: rows with the same question (and reference) are one group, as the
trainer's G completions of a prompt are. Per call the reward reports `requests`, `cache_hits`,
`backend_failures`, `parse_failures`, `judge_tokens` (prompt + generated tokens, where known),
`seconds` and `unordered_groups` (the fraction of groups, among those with different completions,
whose completions all got one score). A call that orders no group says so in its reason, and
`max_unordered_steps` such calls in a row stop the run with MlxRftError: that judge teaches
nothing. Identical judge prompts are asked once: a cache keyed by (judge, messages) keeps the
replies in memory and, optionally, in a JSONL file.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import MlxRftError
from . import judge_pairwise as pairwise
from .base import RewardOutput
from .judge_backends import JudgeBackend, MLXJudge, OpenAIJudge, OptionReply
from .judge_cache import JudgeCache, Messages
from .judge_scoring import expected_score, option_mass, scale_points
from .rubric import Rubric

__all__ = ["JudgeBackend", "MLXJudge", "OpenAIJudge", "make_judge_reward", "judge_from_spec", "plain_question"]

log = logging.getLogger(__name__)

METHODS = ("probs", "text", "pairwise")
MAX_UNORDERED_STEPS = 3
OPPONENTS = 4
TIE_TOL = 1e-6  # scores closer than this (on [0, 1]) count as equal


_CHAT_MARKUP = [
    # ChatML (Qwen, SmolLM): <|im_start|>role\n...<|im_end|>
    re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.DOTALL),
    # Llama 3: <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>
    re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\s*(.*?)(?:<\|eot_id\|>|$)", re.DOTALL),
]


def plain_question(prompt: str) -> str:
    """The last user message of a chat-templated prompt (ChatML or Llama 3), else the prompt."""
    for pattern in _CHAT_MARKUP:
        users = [content for role, content in pattern.findall(prompt) if role == "user"]
        if users:
            return users[-1].strip()
    return prompt


def _as_text(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):  # chat messages
        return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in value)
    return str(value)


class _Asker:
    """Judge requests through the cache: each distinct (tag, messages) asked once per call."""

    def __init__(self, store: JudgeCache | None, backend_key: str):
        self.store, self.backend_key = store, backend_key
        self.requests = self.hits = self.failures = 0

    async def ask(self, messages: list[Messages], fetch, tag: str = "", groups: list | None = None) -> list[str | None]:
        """Answers (strings) for each chat; fetch(chats, groups) -> answers for the uncached ones."""
        base = f"{self.backend_key}|{tag}" if tag else self.backend_key  # text keys stay as before
        keys = [JudgeCache.key(base, m) for m in messages]
        answers: list[str | None] = [self.store.get(k) if self.store else None for k in keys]
        self.hits += sum(a is not None for a in answers)
        todo: dict[str, int] = {}
        for i, a in enumerate(answers):
            if a is None and keys[i] not in todo:
                todo[keys[i]] = i
        rows = list(todo.values())
        fresh = []
        if rows:
            fresh = await fetch([messages[i] for i in rows], None if groups is None else [groups[i] for i in rows])
        if len(fresh) != len(rows):
            raise MlxRftError(f"judge back end returned {len(fresh)} answers for {len(rows)} prompts")
        self.requests += len(rows)
        self.failures += sum(a is None for a in fresh)
        got = dict(zip(todo, fresh))
        for k, a in got.items():
            if a is not None and self.store is not None:
                self.store.put(k, a)
        return [a if a is not None else got.get(k) for a, k in zip(answers, keys)]


def _group_ids(keys: Sequence) -> list[int]:
    """Rows with equal keys get one id (first-seen order): the groups of a GRPO step."""
    ids: dict[Any, int] = {}
    return [ids.setdefault(k, len(ids)) for k in keys]


def order_check(
    groups: Sequence[int], completions: Sequence[str], scores: Sequence[float | None]
) -> tuple[int, int, str]:
    """(groups with >= 2 different scored completions, those whose scores are all equal, what
    the unordered ones scored, in words)."""
    by_group: dict[int, list[tuple[str, float]]] = {}
    for g, c, s in zip(groups, completions, scores):
        if s is not None:
            by_group.setdefault(g, []).append((c, s))
    eligible = unordered = 0
    seen: list[float] = []
    for rows in by_group.values():
        if len({c for c, _ in rows}) < 2:
            continue  # identical completions: nothing for any judge to order
        eligible += 1
        values = [s for _, s in rows]
        if max(values) - min(values) <= TIE_TOL:
            unordered += 1
            seen.extend(values)
    if not seen:
        return eligible, unordered, ""
    distinct = sorted({round(v, 4) for v in seen})
    if len(distinct) == 1:
        return eligible, unordered, f"all {len(seen)} completions scored {distinct[0]:g}"
    shown = ", ".join(f"{v:g}" for v in distinct[:5]) + (", ..." if len(distinct) > 5 else "")
    return eligible, unordered, f"each group's completions got one score ({shown}; {len(seen)} completions)"


def _fetch_options(backend, choices: list[str]):
    """A fetch for _Asker.ask: option log-probs, serialised for the cache."""
    async def fetch(chats, groups):
        replies = await backend.option_logprobs(chats, choices, groups)
        return [None if r is None else r.to_json() for r in replies]

    return fetch


def _reply(blob: str | None) -> OptionReply | None:
    return None if blob is None else OptionReply.from_json(blob)


async def _text_verdicts(rubric: Rubric, backend, asker: _Asker, questions, refs, completions, groups):
    """Per-criterion JSON scores, parsed: (scores, details, metrics, reply texts)."""
    messages = [rubric.messages(q, c, r) for q, c, r in zip(questions, completions, refs)]
    texts = await asker.ask(messages, lambda chats, _: backend.complete(chats))
    scores, details, parse_failures = [], {c.name: [] for c in rubric.criteria}, 0
    for t in texts:
        parsed = rubric.parse(t)
        parse_failures += parsed is None and t is not None
        scores.append(None if parsed is None else parsed.score)
        for c in rubric.criteria:
            details[c.name].append(None if parsed is None else parsed.normalized[c.name])
    return scores, details, {"parse_failures": float(parse_failures)}, texts


async def _probs_verdicts(rubric: Rubric, backend, asker: _Asker, questions, refs, completions, groups):
    """Expected overall scores from the score tokens' probabilities (the reply text, parsed, for
    a server that returned no log-probs)."""
    points = scale_points(rubric.scale_min, rubric.scale_max)
    messages = [rubric.score_messages(q, c, r) for q, c, r in zip(questions, completions, refs)]
    fetch = _fetch_options(backend, [str(v) for v in points])
    replies = [_reply(b) for b in await asker.ask(messages, fetch, "probs", groups)]
    scores, masses, fallbacks, parse_failures = [], [], 0, 0
    for reply in replies:
        value = expected_score(reply.logprobs, points) if reply and reply.logprobs else None
        score = None if value is None else rubric.normalize(value)
        if score is None and reply is not None and reply.text:
            parsed = rubric.parse(reply.text)
            score = None if parsed is None else parsed.score
            fallbacks += parsed is not None
        parse_failures += score is None and reply is not None
        scores.append(score)
        masses.append(option_mass(reply.logprobs) if reply else None)
    metrics = {"parse_failures": float(parse_failures), "text_fallbacks": float(fallbacks)}
    return scores, {"score_mass": masses}, metrics, [r.text if r else None for r in replies]


async def _pairwise_verdicts(
    rubric: Rubric, backend, asker: _Asker, questions, refs, completions, groups, opponents: int
):
    """Bradley-Terry rewards per group from debiased pair comparisons (judge_pairwise.py)."""
    plan = []  # per group: (its rows, its distinct completions, row -> distinct index, pairs)
    chats, chat_groups = [], []
    for g in dict.fromkeys(groups):
        rows = [i for i, h in enumerate(groups) if h == g]
        texts, index = pairwise.distinct([completions[i] for i in rows])
        q, r = questions[rows[0]], refs[rows[0]]
        pairs = pairwise.pair_schedule(len(texts), opponents, "\0".join([q, r or "", *texts]))
        plan.append((rows, texts, index, pairs))
        for i, j in pairs:
            for a, b in ((i, j), (j, i)):  # both orders: the debiasing needs them
                chats.append(pairwise.pair_messages(rubric, q, texts[a], texts[b], r))
                chat_groups.append(g)
    fetch = _fetch_options(backend, list(pairwise.CHOICES))
    replies = [_reply(b) for b in await asker.ask(chats, fetch, "pairwise", chat_groups)]
    p_first, fallbacks, parse_failures = [], 0, 0
    for reply in replies:
        p = pairwise.choice_probability(reply.logprobs) if reply and reply.logprobs else None
        if p is None and reply is not None and reply.text:
            p = pairwise.parse_choice(reply.text)
            fallbacks += p is not None
        parse_failures += p is None and reply is not None
        p_first.append(p)
    scores: list[float | None] = [None] * len(completions)
    k = compared = 0
    for rows, texts, index, pairs in plan:
        prefs = {}
        for pair in pairs:
            pref = pairwise.pair_preference(p_first[k], p_first[k + 1])
            k += 2
            if pref is not None:
                prefs[pair] = pref
        compared += len(prefs)
        rewards = pairwise.pairwise_rewards(len(texts), prefs)
        for row, idx in zip(rows, index):
            scores[row] = rewards[idx]
    metrics = {"parse_failures": float(parse_failures), "text_fallbacks": float(fallbacks), "pairs": float(compared)}
    return scores, {}, metrics, [r.text if r else None for r in replies]


def make_judge_reward(
    rubric: Rubric | str | os.PathLike,
    backend: JudgeBackend,
    *,
    method: str = "probs",
    name: str = "judge",
    question_column: str | None = None,
    reference_column: str | None = None,
    cache: bool = True,
    cache_path: str | os.PathLike | None = None,
    max_unordered_steps: int = MAX_UNORDERED_STEPS,
    opponents: int = OPPONENTS,
) -> Callable:
    """An async reward: the judge's verdict in [0, 1] (None when unanswered or unreadable).

    rubric: a Rubric or a YAML path. backend: MLXJudge, OpenAIJudge, or anything with
        `async complete(messages_batch)` and `cache_key` (plus `option_logprobs` for "probs" and
        "pairwise").
    method: "probs", "text" or "pairwise" (module docstring).
    question_column: a column holding the raw question (text or chat messages); by default the
        judge sees the last user message of the chat-templated prompt.
    reference_column: a column with reference answers to show the judge (default: the rubric's).
    max_unordered_steps: stop (MlxRftError) after this many calls in a row in which the judge
        gave every group's completions one score (0 = never stop).
    opponents: pairwise only: completions each completion is compared with (0 = all).
    The function returns a RewardOutput: sub-scores as details, counters as metrics; they are
    also kept on `.last_details` / `.last_metrics`. It is marked `is_judge` so the RewardSet
    reports judge/mean and judge/std. `.score(prompts, completions, **columns)` scores without
    the unordered-steps stop (for calibration).
    """
    if not isinstance(rubric, Rubric):
        from .rubric import load_rubric

        rubric = load_rubric(rubric)
    if method not in METHODS:
        raise MlxRftError(f"judge method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if not callable(getattr(backend, "complete", None)):
        raise MlxRftError(f"judge backend {backend!r} has no complete(messages_batch) method")
    if method != "text" and not callable(getattr(backend, "option_logprobs", None)):
        raise MlxRftError(
            f"judge backend {backend!r} has no option_logprobs(...), which method={method!r} needs; "
            "use method='text' or give the back end that method"
        )
    if not (isinstance(max_unordered_steps, int) and max_unordered_steps >= 0):
        raise MlxRftError(f"max_unordered_steps={max_unordered_steps!r} must be an integer >= 0 (0 = never stop)")
    if method == "probs":
        scale_points(rubric.scale_min, rubric.scale_max)  # an unreadable scale fails here, not mid-run
    reference_column = reference_column or rubric.reference_column
    store = JudgeCache(cache_path) if cache else None
    backend_key = getattr(backend, "cache_key", type(backend).__name__)
    where = rubric.source or f"rubric {rubric.name!r}"
    state = {"streak": 0}

    def backend_stats() -> dict:
        return getattr(backend, "stats", None) or {}

    async def scored(prompts: list[str], completions: list[str], **columns) -> tuple[RewardOutput, tuple]:
        t0 = time.perf_counter()
        tokens0 = backend_stats().get("tokens", 0)
        n = len(completions)
        if question_column is not None and question_column not in columns:
            raise MlxRftError(f"judge {name!r}: question_column {question_column!r} is not in the dataset")
        if reference_column is not None and reference_column not in columns:
            raise MlxRftError(
                f"judge {name!r}: the rubric shows the judge the column {reference_column!r}, which "
                "the dataset lacks; add it or remove reference_column from the rubric"
            )
        if question_column:
            questions = [_as_text(q) for q in columns[question_column]]
        else:
            questions = [plain_question(p) for p in prompts]
        refs = [None] * n
        if reference_column:
            refs = [None if ref is None else _as_text(ref) for ref in columns[reference_column]]
        groups = _group_ids(list(zip(questions, refs)))
        asker = _Asker(store, backend_key)
        if method == "pairwise":
            verdicts = _pairwise_verdicts(rubric, backend, asker, questions, refs, completions, groups, opponents)
        else:
            verdicts = (_probs_verdicts if method == "probs" else _text_verdicts)(
                rubric, backend, asker, questions, refs, completions, groups
            )
        scores, details, extra, judge.last_texts = await verdicts
        check = order_check(groups, completions, scores)
        eligible, unordered, seen = check
        metrics = {
            "requests": float(asker.requests),
            "cache_hits": float(asker.hits),
            "backend_failures": float(asker.failures),
            **extra,
            "unordered_groups": unordered / eligible if eligible else 0.0,
            "judge_tokens": float(backend_stats().get("tokens", 0) - tokens0),
            "seconds": time.perf_counter() - t0,
        }
        judge.last_details, judge.last_metrics = details, metrics
        reason = None
        if asker.failures:
            last = getattr(backend, "last_error", None)
            reason = f"{asker.failures} of {asker.requests} judge requests failed" + (f" ({last})" if last else "")
        elif extra.get("parse_failures"):
            reason = f"{extra['parse_failures']:.0f} judge replies could not be read as {method} verdicts"
        elif eligible and unordered == eligible:
            reason = f"the judge ordered none of the {eligible} groups: {seen}"
        return RewardOutput(scores=scores, details=details, metrics=metrics, reason=reason), check

    async def score(prompts: list[str], completions: list[str], **columns) -> RewardOutput:
        return (await scored(prompts, completions, **columns))[0]

    async def judge(prompts: list[str], completions: list[str], **columns) -> RewardOutput:
        out, (eligible, unordered, seen) = await scored(prompts, completions, **columns)
        if not eligible:
            return out  # nothing a judge could order (one completion per prompt, or none scored)
        if unordered < eligible:
            state["streak"] = 0
            return out
        state["streak"] += 1
        log.warning("judge %r ordered none of the %d groups: %s", name, eligible, seen)
        if max_unordered_steps and state["streak"] >= max_unordered_steps:
            others = " or ".join(f"method={m!r}" for m in ("probs", "pairwise") if m != method)
            raise MlxRftError(
                f"judge {name!r} ({backend!r}, {where}, method={method!r}) could not order the "
                f"completions of any group for {state['streak']} calls in a row: {seen}; rewards "
                f"that are equal within every group teach nothing. Use {others}, a bigger judge "
                "model, or a clearer rubric (check it with `mlx-rft judge-check`; "
                "max_unordered_steps=0 never stops)"
            )
        return out

    judge.__name__ = judge.__qualname__ = name
    judge.is_judge = True
    judge.rubric = rubric
    judge.backend = backend
    judge.method = method
    judge.question_column = question_column
    judge.cache = store
    judge.score = score
    judge.last_texts, judge.last_details, judge.last_metrics = [], {}, {}
    return judge


def judge_from_spec(
    rubric: str,
    *,
    url: str | None = None,
    model: str | None = None,
    local_model: str | None = None,
    api_key_env: str | None = None,
    cache_path: str | None = None,
    question_column: str | None = None,
    name: str = "judge",
    method: str = "probs",
    max_unordered_steps: int = MAX_UNORDERED_STEPS,
    opponents: int = OPPONENTS,
    **backend_kwargs,
) -> Callable:
    """The `judge(...)` reward spec: a rubric file plus an endpoint (url + model) or a local model
    folder (local_model), e.g.
    `judge(rubric='examples/rubrics/helpfulness.yaml', url='http://127.0.0.1:8080/v1', model='default_model')`.
    method, max_unordered_steps and opponents go to make_judge_reward; extra arguments go to the
    back end (timeout, max_concurrency, top_logprobs, max_tokens / max_new_tokens, batch_size, ...)."""
    if (url is None) == (local_model is None):
        raise MlxRftError(
            "judge(...) needs exactly one back end: url='http://HOST:PORT/v1' (with model=...) for an "
            "OpenAI-compatible server, or local_model='path/to/model' for a local MLX model"
        )
    try:
        if url is not None:
            backend = OpenAIJudge(url, model or "default_model", api_key_env=api_key_env, **backend_kwargs)
        else:
            backend = MLXJudge.from_path(local_model, **backend_kwargs)
    except TypeError as e:
        raise MlxRftError(f"judge(...): {e}") from None
    return make_judge_reward(
        rubric, backend, method=method, name=name, question_column=question_column, cache_path=cache_path,
        max_unordered_steps=max_unordered_steps, opponents=opponents,
    )
