"""The reward-function API: N completions in, N scores out, several functions combined by weight.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, plain or `async`:

- `prompts`, `completions`: N strings (row n answers prompt n // G; prompts repeat per group).
- `columns`: the dataset's extra columns, each a list of N values aligned with the completions
  (e.g. `answer=[...]`, `tests=[...]`), plus `completion_ids` (N token-id lists) when the caller
  has them. A function receives only the columns it names, unless it takes `**kwargs`.
- It returns N scores; `None` (or NaN) means "cannot score this row" and drops out of the sum.
  It may instead return a `RewardOutput` (scores plus per-row sub-scores and scalar metrics, e.g.
  an LLM judge's per-criterion scores) or a mapping `{"score": [...], "<detail>": [...]}`.

`RewardSet` runs every function once per batch (async ones concurrently) under a time limit,
checks the shapes, turns exceptions into errors that name the function and the row, and returns a
`RewardResult` that carries everything the step's metrics need, so nothing is ever scored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MlxRftError

RewardFunc = Callable[..., Any]
ON_ERROR = ("raise", "none")


@dataclass
class RewardOutput:
    """A richer return value for a reward function.

    scores: N values, None where the function cannot score the row.
    details: name -> N values (None allowed), e.g. a judge's per-criterion scores in [0, 1].
    metrics: name -> scalar for this batch, e.g. {"parse_failures": 3.0}.
    reason: why rows are None, when the function knows (e.g. "judge server unreachable: ...").
    """

    scores: list[float | None]
    details: dict[str, list[float | None]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


@dataclass
class RewardResult:
    """Scores of one batch of N completions by a RewardSet.

    total: [N] float64, weighted sum over the functions that scored each row (NaN where none did).
    per_func: function name -> [N] float64 raw (unweighted) scores, NaN where it returned None.
    details: "<function>/<detail>" -> [N] float64 sub-scores (NaN where missing).
    stats: function name -> {"mean", "std" (over scored rows, NaN if none), "failures" (None
        count, errors included), "errors" (rows whose scoring raised), "timeouts" (1 when the
        call hit the time limit), "seconds" (wall time)}.
    metrics: "<function>/<metric>" -> scalar reported by a function (RewardOutput.metrics).
    judges: names of the functions that are LLM judges (their stats also feed `judge/*`).
    reasons: function name -> why its rows are unscored (first error, time limit, its own reason).
    """

    total: np.ndarray
    per_func: dict[str, np.ndarray]
    details: dict[str, np.ndarray]
    stats: dict[str, dict[str, float]]
    metrics: dict[str, float]
    weights: dict[str, float]
    judges: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.total.shape[0])

    @property
    def num_unscored(self) -> int:
        return int(np.sum(np.isnan(self.total)))

    def unscored_reason(self) -> str:
        """Why rows went unscored, one clause per function that scored nothing."""
        parts = []
        for name, values in self.per_func.items():
            if np.isfinite(values).any():
                continue
            why = self.reasons.get(name) or "it returned None or NaN for every row"
            parts.append(f"reward {name!r} scored none of {values.size} rows: {why}")
        return "; ".join(parts) or f"{self.num_unscored} of {self.num_rows} rows were not scored"

    def summary(self) -> dict[str, float]:
        """Flat metrics for logging: reward/*, rewards/<name>/*, judge/* (when a judge scored)."""
        out: dict[str, float] = {}
        mean, std = _nan_mean_std(self.total)
        out["reward/mean"], out["reward/std"] = mean, std
        out["reward/unscored_frac"] = float(np.mean(np.isnan(self.total))) if self.num_rows else 0.0
        for name, s in self.stats.items():
            for key, value in s.items():
                out[f"rewards/{name}/{key}"] = float(value)
        for key, values in self.details.items():
            out[f"rewards/{key}/mean"] = _nan_mean_std(values)[0]
        for key, value in self.metrics.items():
            out[f"rewards/{key}"] = float(value)
        if self.judges:
            # One judge is the common case; with several, judge/* describes their pooled scores.
            pooled = np.concatenate([self.per_func[j] for j in self.judges])
            out["judge/mean"], out["judge/std"] = _nan_mean_std(pooled)
            out["judge/failures"] = float(sum(self.stats[j]["failures"] for j in self.judges))
        return out


def _nan_mean_std(x: np.ndarray) -> tuple[float, float]:
    finite = x[~np.isnan(x)]
    if finite.size == 0:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std())


def reward_name(func: Callable) -> str:
    """A function's display name: its `reward_name` attribute, else `__name__`."""
    name = getattr(func, "reward_name", None) or getattr(func, "__name__", None)
    if name is None and hasattr(func, "func"):  # functools.partial
        name = getattr(func.func, "__name__", None)
    return str(name or type(func).__name__)


def _is_async(func: Callable) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)
    )


class _Plan:
    """How to call one function: which columns it takes, whether it is async, and whether it is
    called positionally, f(prompts, completions, ...), or by keyword, f(completions=..., ...), as
    TRL-style functions such as `def f(completions, **kwargs)` expect."""

    def __init__(self, func: Callable, name: str):
        self.func, self.name = func, name
        self.is_async = _is_async(func)
        self.is_judge = bool(getattr(func, "is_judge", False))
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            sig = None
        P = inspect.Parameter
        params = list(sig.parameters.values()) if sig is not None else []
        self.takes_all = sig is None or any(p.kind is P.VAR_KEYWORD for p in params)
        by_name = {p.name: p for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
        self.by_keyword = "completions" in by_name
        self.pass_prompts = not self.by_keyword or "prompts" in by_name or self.takes_all
        if sig is not None and not self.by_keyword:
            positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
            if len(positional) < 2 and not any(p.kind is P.VAR_POSITIONAL for p in params):
                raise MlxRftError(
                    f"reward {name!r} must accept (prompts, completions, **columns); its signature is "
                    f"{name}{sig}"
                )
        column_params = (
            [p for p in params if p.name not in ("prompts", "completions")] if self.by_keyword else params[2:]
        )
        self.named = [p.name for p in column_params if p.kind in (P.KEYWORD_ONLY, P.POSITIONAL_OR_KEYWORD)]
        self.required = [p.name for p in column_params if p.name in self.named and p.default is P.empty]

    def kwargs(self, columns: Mapping[str, list]) -> dict[str, list]:
        missing = [c for c in self.required if c not in columns]
        if missing:
            have = ", ".join(sorted(columns)) or "none"
            raise MlxRftError(
                f"reward {self.name!r} needs dataset column(s) {', '.join(map(repr, missing))} but the "
                f"batch has only: {have}; add the column to the dataset or drop this reward"
            )
        if self.takes_all:
            return dict(columns)
        return {k: columns[k] for k in self.named if k in columns}


class RewardTimeout(Exception):
    """A reward function ran past its time limit."""


# The watchdog interrupts a sync reward on the main thread with this signal. SIGALRM is not
# usable: math-verify sets and clears its own alarm inside the accuracy reward.
_WATCHDOG_SIGNAL = getattr(signal, "SIGUSR2", None)


@contextlib.contextmanager
def _deadline(seconds: float, name: str):
    """Raise RewardTimeout in the main thread once `seconds` have passed (0 = no limit).

    A watchdog thread sends a real signal, so a reward blocked in `sleep`, a socket or a lock is
    woken too; code that holds the GIL inside one C call (a runaway regex) is not interruptible.
    Off the main thread no handler can be set, and the limit applies to async rewards only."""
    on_main = threading.current_thread() is threading.main_thread()
    if not seconds or _WATCHDOG_SIGNAL is None or not on_main:
        yield
        return
    state = {"done": False, "fired": False}
    lock = threading.Lock()

    def on_signal(signum, frame):
        if state["fired"] and not state["done"]:
            raise RewardTimeout(f"reward {name!r} did not return within {seconds:g} s")

    def fire():
        with lock:
            if not state["done"]:
                state["fired"] = True
                signal.pthread_kill(threading.main_thread().ident, _WATCHDOG_SIGNAL)

    previous = signal.signal(_WATCHDOG_SIGNAL, on_signal)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
        timer.cancel()
        signal.signal(_WATCHDOG_SIGNAL, previous)


class RewardSet:
    """Several reward functions with weights, scored once per batch.

    funcs: callables (or anything `resolve_reward` accepts, e.g. "accuracy", "mod:fn").
    weights: one per function (default all 1.0). The total is the weighted sum over the functions
        that scored a row (NaN-skipping, as TRL does); a row no function scored gets NaN.
    on_error: "raise" -> a function that raises aborts with an MlxRftError naming the function and
        the first failing row; "none" -> the failing rows score None and are counted in
        stats[name]["errors"]. MlxRftError (a configuration problem) always propagates.
    timeout: seconds each function may take on one batch (0 = no limit). Past it the call is
        abandoned: an MlxRftError with on_error "raise", else every row of that function is None
        (stats[name]["timeouts"] = 1). Rows are never retried one by one after a time-out.
    """

    def __init__(
        self,
        funcs: Sequence[RewardFunc | str],
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
        timeout: float = 0.0,
    ):
        funcs = [resolve_reward(f) if isinstance(f, str) else f for f in funcs]
        if not funcs:
            raise MlxRftError("RewardSet needs at least one reward function")
        for f in funcs:
            if not callable(f):
                raise MlxRftError(f"reward {f!r} is not callable; pass a function or a reward name")
        if weights is None:
            weights = [1.0] * len(funcs)
        weights = [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise MlxRftError(
                f"{len(weights)} reward weights for {len(funcs)} reward functions; give one weight each"
            )
        if not all(math.isfinite(w) for w in weights):
            raise MlxRftError(f"reward weights must be finite numbers, got {weights}")
        if on_error not in ON_ERROR:
            raise MlxRftError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout >= 0):
            raise MlxRftError(f"reward timeout must be a number of seconds >= 0 (0 = none), got {timeout!r}")
        self.on_error = on_error
        self.timeout = float(timeout)
        self.weights = weights
        names: list[str] = []
        for f in funcs:
            base = reward_name(f)
            name, k = base, 2
            while name in names:  # the same function twice (e.g. with different weights)
                name, k = f"{base}_{k}", k + 1
            names.append(name)
        self.names = names
        self._plans = [_Plan(f, n) for f, n in zip(funcs, names)]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}*{w:g}" for n, w in zip(self.names, self.weights))
        return f"RewardSet({parts}, on_error={self.on_error!r})"

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, list] | None = None
    ) -> RewardResult:
        """Score N completions (synchronous; runs the async functions on a private event loop)."""
        coro = self.ascore(prompts, completions, columns)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Called from inside a running loop (e.g. a notebook): run ours on a helper thread.
        box: dict[str, Any] = {}

        def target():
            try:
                box["result"] = asyncio.run(coro)
            except BaseException as e:  # re-raised in the caller's thread
                box["error"] = e

        t = threading.Thread(target=target, name="mlx-rft-rewards")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    async def ascore(
        self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, list] | None = None
    ) -> RewardResult:
        """Score N completions; async functions run concurrently with each other and the sync ones."""
        prompts, completions = list(prompts), list(completions)
        columns = dict(columns or {})
        n = len(completions)
        if len(prompts) != n:
            raise MlxRftError(f"{len(prompts)} prompts for {n} completions; pass one prompt per completion")
        for key, values in columns.items():
            if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
                raise MlxRftError(f"column {key!r} must be a list of {n} values, got {type(values).__name__}")
            if len(values) != n:
                raise MlxRftError(
                    f"column {key!r} has {len(values)} values for {n} completions; repeat each prompt's "
                    "value once per completion of its group"
                )
        calls = [(plan, plan.kwargs(columns)) for plan in self._plans]
        outputs: list[Any] = [None] * len(calls)
        seconds = [0.0] * len(calls)

        async def run_async(i: int, plan: _Plan, kwargs: dict):
            t0 = time.perf_counter()
            outputs[i] = await self._guarded(plan, prompts, completions, kwargs)
            seconds[i] = time.perf_counter() - t0

        tasks = [
            asyncio.ensure_future(run_async(i, p, kw)) for i, (p, kw) in enumerate(calls) if p.is_async
        ]
        try:
            if tasks:
                await asyncio.sleep(0)  # let async rewards send their requests before sync work blocks
            # Sync rewards run on this thread, not a pool: math-verify's timeouts need the main thread.
            for i, (plan, kwargs) in enumerate(calls):
                if not plan.is_async:
                    t0 = time.perf_counter()
                    outputs[i] = await self._guarded(plan, prompts, completions, kwargs)
                    seconds[i] = time.perf_counter() - t0
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        return self._combine(outputs, seconds, n)

    async def _guarded(self, plan: _Plan, prompts: list[str], completions: list[str], kwargs: dict):
        """(output, error_rows) for one function; on an exception, find the failing rows one by one."""
        try:
            return await self._timed(plan, prompts, completions, kwargs), []
        except MlxRftError:
            raise
        except RewardTimeout as e:
            if self.on_error == "raise":
                raise MlxRftError(
                    f"{e} on {len(completions)} completions; fix the function, raise "
                    "reward_timeout, or run with reward_on_error none to score such rows as None"
                ) from None
            out = RewardOutput(scores=[None] * len(completions), reason=f"{e} (time limit)")
            out.metrics["timeouts"] = 1.0
            return out, []
        except Exception as batch_error:
            first_error = batch_error
        # The batch call raised: score row by row to find which rows fail, keeping the others.
        n = len(completions)
        scores: list[float | None] = [None] * n
        details: dict[str, list[float | None]] = {}
        bad: list[int] = []
        for r in range(n):
            row_kwargs = {k: [v[r]] for k, v in kwargs.items()}
            try:
                out = _normalize(
                    await self._timed(plan, [prompts[r]], [completions[r]], row_kwargs), plan.name, 1
                )
            except MlxRftError:
                raise
            except RewardTimeout as e:
                raise MlxRftError(
                    f"{e} on one row after the batch call raised {type(first_error).__name__}: "
                    f"{first_error}; fix the function"
                ) from None
            except Exception as e:
                bad.append(r)
                if self.on_error == "raise":
                    raise MlxRftError(
                        f"reward {plan.name!r} raised {type(e).__name__}: {e} at row {r} "
                        f"(completion {_snippet(completions[r])}); fix the function or run with "
                        "on_error='none' to score such rows as None"
                    ) from e
                continue
            scores[r] = out.scores[0]
            for key, vals in out.details.items():
                details.setdefault(key, [None] * n)[r] = vals[0]
        if not bad and self.on_error == "raise":
            # Every row passes alone, so the failure depends on the batch as a whole.
            raise MlxRftError(
                f"reward {plan.name!r} raised {type(first_error).__name__}: {first_error} on the batch "
                f"of {n} rows, though each row scores alone; fix the function"
            ) from first_error
        reason = f"{len(bad)} rows raised, first {type(first_error).__name__}: {first_error}"
        return RewardOutput(scores=scores, details=details, reason=reason), bad

    async def _timed(self, plan: _Plan, prompts: list[str], completions: list[str], kwargs: dict):
        """One call of a function under the time limit (async: wait_for; sync: the watchdog)."""
        if plan.is_async:
            try:
                return await asyncio.wait_for(
                    _invoke(plan, prompts, completions, kwargs), self.timeout or None
                )
            except asyncio.TimeoutError:
                raise RewardTimeout(
                    f"reward {plan.name!r} did not return within {self.timeout:g} s"
                ) from None
        with _deadline(self.timeout, plan.name):
            return await _invoke(plan, prompts, completions, kwargs)

    def _combine(self, outputs: list, seconds: list[float], n: int) -> RewardResult:
        per_func: dict[str, np.ndarray] = {}
        details: dict[str, np.ndarray] = {}
        stats: dict[str, dict[str, float]] = {}
        metrics: dict[str, float] = {}
        reasons: dict[str, str] = {}
        total = np.zeros(n, dtype=np.float64)
        scored = np.zeros(n, dtype=bool)
        for plan, w, (raw, bad), secs in zip(self._plans, self.weights, outputs, seconds):
            out = _normalize(raw, plan.name, n)
            if out.reason:
                reasons[plan.name] = out.reason
            values = _to_array(out.scores, plan.name, "scores")
            per_func[plan.name] = values
            ok = ~np.isnan(values)
            total[ok] += w * values[ok]
            scored |= ok
            mean, std = _nan_mean_std(values)
            stats[plan.name] = {
                "mean": mean,
                "std": std,
                "failures": float(np.sum(~ok)),
                "errors": float(len(bad)),
                "timeouts": float(out.metrics.pop("timeouts", 0.0)),
                "seconds": secs,
            }
            for key, vals in out.details.items():
                if len(vals) != n:
                    raise MlxRftError(
                        f"reward {plan.name!r} returned {len(vals)} values for detail {key!r} but there "
                        f"are {n} completions; return one value per completion"
                    )
                details[f"{plan.name}/{key}"] = _to_array(vals, plan.name, f"detail {key!r}")
            for key, value in out.metrics.items():
                metrics[f"{plan.name}/{key}"] = float(value)
        total[~scored] = np.nan
        return RewardResult(
            total=total,
            per_func=per_func,
            details=details,
            stats=stats,
            metrics=metrics,
            weights=dict(zip(self.names, self.weights)),
            judges=[p.name for p in self._plans if p.is_judge],
            reasons=reasons,
        )


async def _invoke(plan: _Plan, prompts: list[str], completions: list[str], kwargs: dict):
    if plan.by_keyword:
        kwargs = {**kwargs, "completions": completions}
        if plan.pass_prompts:
            kwargs["prompts"] = prompts
        out = plan.func(**kwargs)
    else:
        out = plan.func(prompts, completions, **kwargs)
    if inspect.isawaitable(out):
        out = await out
    return out


def _normalize(out: Any, name: str, n: int) -> RewardOutput:
    """Any accepted return shape -> RewardOutput with N scores (length checked)."""
    if isinstance(out, RewardOutput):
        result = out
    elif isinstance(out, Mapping):
        if "score" not in out:
            raise MlxRftError(
                f"reward {name!r} returned a mapping without a 'score' key (keys: {sorted(out)}); "
                "return {'score': [...], '<detail>': [...]} or a list of scores"
            )
        result = RewardOutput(
            scores=list(out["score"]), details={k: list(v) for k, v in out.items() if k != "score"}
        )
    elif isinstance(out, np.ndarray):
        result = RewardOutput(scores=out.tolist())
    elif isinstance(out, Sequence) and not isinstance(out, (str, bytes)):
        result = RewardOutput(scores=list(out))
    else:
        raise MlxRftError(
            f"reward {name!r} returned {type(out).__name__}; return a list of {n} floats (None where "
            "it cannot score)"
        )
    if len(result.scores) != n:
        raise MlxRftError(
            f"reward {name!r} returned {len(result.scores)} scores for {n} completions; return exactly "
            "one score (or None) per completion"
        )
    return result


def _to_array(values: Sequence, name: str, what: str) -> np.ndarray:
    arr = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            arr[i] = np.nan
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise MlxRftError(
                f"reward {name!r} {what}: row {i} is {v!r} ({type(v).__name__}); return floats or None"
            ) from None
        if math.isinf(x):
            raise MlxRftError(
                f"reward {name!r} {what}: row {i} is {x}; rewards must be finite (return None to skip)"
            )
        arr[i] = x  # NaN stays NaN: same as None
    return arr


def _snippet(text: str, limit: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---------------------------------------------------------------------------------------------
# Resolving reward specs: "accuracy", "length(target_max=300)", "pkg.mod:fn", "path/file.py:fn"

_CALL_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


def builtin_rewards() -> dict[str, tuple[Callable | None, Callable | None]]:
    """Built-in reward name -> (ready function or None, factory or None)."""
    from . import verifiers

    return verifiers.BUILTINS


def resolve_reward(spec: str | Callable) -> Callable:
    """A reward function from a spec.

    - a built-in name (`accuracy`, `format`, `think_format`, `length`, `overlong`, `repetition`,
      `code`), optionally with factory arguments: `accuracy(extract=boxed)`, `overlong(max_length=512)`;
    - `judge(rubric='r.yaml', url='http://127.0.0.1:8080/v1', model='m')` or
      `judge(rubric='r.yaml', local_model='path/to/model')` (an LLM judge, see judge.py);
    - `package.module:function` (importable), or `path/to/file.py:function`.
    Unknown names raise MlxRftError listing the built-ins.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise MlxRftError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    table = builtin_rewards()
    m = _CALL_RE.match(spec)
    if m and m.group(1) in table:
        func, factory = table[m.group(1)]
        if m.group(2) is None:
            if func is None:
                raise MlxRftError(
                    f"reward {m.group(1)!r} needs arguments, e.g. judge(rubric='rubric.yaml', "
                    "url='http://127.0.0.1:8080/v1', model='default_model')"
                )
            return func
        if factory is None:
            raise MlxRftError(f"built-in reward {m.group(1)!r} takes no arguments; use it as {m.group(1)!r}")
        kwargs = _parse_kwargs(m.group(2), spec)
        try:
            return factory(**kwargs)
        except TypeError as e:
            raise MlxRftError(f"bad arguments in reward spec {spec!r}: {e}") from e
    if ":" in spec:
        target, _, attr = spec.rpartition(":")
        if not attr.isidentifier():
            raise MlxRftError(f"reward spec {spec!r}: {attr!r} is not a function name; use MODULE:FUNCTION")
        module = _load_module(target, spec)
        func = getattr(module, attr, None)
        if func is None:
            raise MlxRftError(f"reward spec {spec!r}: {target} has no attribute {attr!r}")
        if not callable(func):
            raise MlxRftError(f"reward spec {spec!r}: {attr!r} is not callable")
        return func
    raise MlxRftError(
        f"unknown reward {spec!r}; use a built-in ({', '.join(sorted(table))}), "
        "a module:function, or a path/to/file.py:function"
    )


def _parse_kwargs(text: str, spec: str) -> dict[str, Any]:
    import ast

    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError as e:
        raise MlxRftError(f"cannot parse arguments in reward spec {spec!r}: {e.msg}") from None
    if call.args:
        raise MlxRftError(f"reward spec {spec!r}: pass arguments by name, e.g. name(key=value)")
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            if isinstance(kw.value, ast.Name):  # bare words are strings: extract=boxed
                kwargs[kw.arg] = kw.value.id
            else:
                raise MlxRftError(
                    f"reward spec {spec!r}: the value of {kw.arg!r} must be a literal (number, string, list)"
                ) from None
    return kwargs


def _load_module(target: str, spec: str):
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise MlxRftError(f"reward spec {spec!r}: file {str(path)!r} does not exist")
        mod_name = f"mlx_rft_user_reward_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise MlxRftError(f"reward spec {spec!r}: cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise MlxRftError(f"reward spec {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise MlxRftError(
            f"reward spec {spec!r}: cannot import module {target!r} ({e}); check the name or use "
            "path/to/file.py:function"
        ) from e
