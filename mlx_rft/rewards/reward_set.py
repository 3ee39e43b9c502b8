"""`RewardSet`: several reward functions scored once per batch, with weights and time limits.

It runs every function once per batch (async ones concurrently), checks the shapes, turns
exceptions into errors that name the function and the row, and returns a `RewardResult` that
carries everything the step's metrics need, so nothing is ever scored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import MlxRftError
from .base import RewardFunc, RewardOutput, RewardResult, reward_name, row_stats
from .registry import resolve_reward

ON_ERROR = ("raise", "none")


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

    @property
    def has_judge(self) -> bool:
        """Whether an LLM judge is among the functions (each call costs judge requests)."""
        return any(p.is_judge for p in self._plans)

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
        """(output, error_rows, timed_out) for one function; on an exception, find the failing
        rows one by one (never after a time-out)."""
        try:
            return await self._timed(plan, prompts, completions, kwargs), [], False
        except MlxRftError:
            raise
        except RewardTimeout as e:
            if self.on_error == "raise":
                raise MlxRftError(
                    f"{e} on {len(completions)} completions; fix the function, raise "
                    "reward_timeout, or run with reward_on_error none to score such rows as None"
                ) from None
            return RewardOutput(scores=[None] * len(completions), reason=f"{e} (time limit)"), [], True
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
        return RewardOutput(scores=scores, details=details, reason=reason), bad, False

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
        for plan, w, (raw, bad, timed_out), secs in zip(self._plans, self.weights, outputs, seconds):
            out = _normalize(raw, plan.name, n)
            if out.reason:
                reasons[plan.name] = out.reason
            values = _to_array(out.scores, plan.name, "scores")
            per_func[plan.name] = values
            ok = ~np.isnan(values)
            total[ok] += w * values[ok]
            scored |= ok
            stats[plan.name] = {
                **row_stats(values),
                "errors": float(len(bad)),
                "timeouts": float(timed_out),
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
