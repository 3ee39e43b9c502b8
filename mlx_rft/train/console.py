"""What a person watching `mlx-rft train` sees: log lines, alarms, one line per step, and live
progress bars (training steps, and each evaluation) with elapsed time and ETA.

`RunConsole(console, progress=True)` draws bars only on a rich Console attached to an interactive
terminal, so logs and CI output stay plain lines; with console=None every line is a plain `print`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn,
)
from rich.text import Text

WIDTH = 100  # the per-step line fits a 100-column terminal
ALARM_PREFIX = "!! "  # visible without colour too (logs, CI)
WARN_PREFIX = "! "
KEEP = 99  # a step-line field that is never left out


def _num(v: float, places: int) -> str:
    """Fixed decimals for everyday magnitudes; exponent form for the rest keeps fields narrow."""
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v == 0 or 10.0 ** -places <= abs(v) < 1e4:
        return f"{v:.{places}f}"
    return f"{v:.2g}" if abs(v) < 1 else f"{v:.1e}"  # 0.00034, 3.4e-07, 1.2e+05


def _pct(v: float) -> str:
    if not math.isfinite(v) or not -10 <= v <= 10:  # far from a fraction: the number, not 1e+302%
        return _num(v, 2)
    return f"{v:.1%}" if 0 < abs(v) < 0.1 else f"{v:.0%}"


def _secs(v: float) -> str:
    if math.isfinite(v) and abs(v) < 10:
        return f"{v:.1f}"  # 0.0 for a step that took milliseconds, not an exponent
    return _num(v, 0)


def _duration(v: float) -> str:
    return _secs(v) + ("s" if math.isfinite(v) else " s")  # "nan s", not "nans"


def _get(m: dict[str, Any], key: str) -> float | None:
    v = m.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _step_fields(step: int, total: int, m: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(label, value, keep) for each field m has; when the line is too wide, the fields with the
    lowest `keep` are left out first; step and reward (keep = KEEP) always stay."""
    fields = [("", f"[{step:>{len(str(total))}}/{total}]", KEEP)]  # padded: the columns line up
    mean, std = _get(m, "reward/mean"), _get(m, "reward/std")
    if mean is not None:
        fields.append(("reward", _num(mean, 2) + ("" if std is None else "±" + _num(std, 2)), KEEP))
    entropy = _get(m, "entropy/sampled")
    entropy = _get(m, "entropy") if entropy is None else entropy
    time_step, gen, upd = _get(m, "time/step"), _get(m, "time/generate"), _get(m, "time/update")
    split = None if gen is None or upd is None else f"(gen {_secs(gen)} upd {_secs(upd)})"
    for label, v, fmt, keep in (
        ("loss", _get(m, "loss"), lambda v: _num(v, 3), 7),
        ("kl", _get(m, "kl"), lambda v: _num(v, 4), 5),  # reported only with a reference (beta > 0)
        ("clip", _get(m, "clip/region_frac"), _pct, 3),
        ("ent", entropy, lambda v: _num(v, 2), 2),
        ("len", _get(m, "completion/mean_length"), lambda v: _num(v, 0), 6),
        ("zero-std", _get(m, "frac_zero_std_groups"), _pct, 4),
        ("", time_step, _duration, 8),
        ("", split if time_step is not None else None, str, 1),  # the first to go
    ):
        if v is not None:
            fields.append((label, fmt(v), keep))
    return fields


def _fit(fields: list[tuple[str, str, int]], width: int) -> list[tuple[str, str, int]]:
    def length(fs):
        return sum(len(lab) + bool(lab) + len(val) for lab, val, _ in fs) + len(fs) - 1

    fields = list(fields)
    while length(fields) > width:
        optional = [f for f in fields if f[2] < KEEP]
        if not optional:
            break
        fields.remove(min(optional, key=lambda f: f[2]))
    return fields


def format_step_line(step: int, total: int, m: dict[str, Any], width: int = WIDTH) -> str:
    """One console line per step, at most `width` columns: [step/total], reward mean±std, loss,
    kl, clipped fraction, entropy, mean length, zero-std group fraction, step time (generate,
    update). A metric the step did not report is left out, not shown as a dash."""
    return " ".join(f"{lab} {val}" if lab else val for lab, val, _ in _fit(_step_fields(step, total, m), width))


def _step_text(step: int, total: int, m: dict[str, Any]) -> Text:
    """format_step_line with dim labels, so the eye finds the numbers."""
    text = Text()
    for i, (lab, val, _) in enumerate(_fit(_step_fields(step, total, m), WIDTH)):
        text.append(" " if i else "")
        if lab:
            text.append(lab + " ", style="dim")
        text.append(val, style="bold" if i == 0 else "")
    return text


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class EtaColumn(ProgressColumn):
    """Time left at the average pace since the bar started, counting down between advances.

    rich's own estimate looks back only 30 seconds, shorter than one training step on a laptop,
    so it would never show. Reads the task fields `first` (completed when the bar started, e.g.
    a resumed step), `done_at` (task.elapsed at the last advance) and, before the first advance,
    `pace` (seconds per unit an earlier bar of the same kind took), if any."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("")
        done, done_at = task.completed - task.fields.get("first", 0), task.fields.get("done_at")
        if task.total is None or task.elapsed is None:
            pace = None
        elif done > 0 and done_at:
            pace, since = done_at / done, task.elapsed - done_at
        else:
            pace, since = task.fields.get("pace"), task.elapsed
        if not pace:
            return Text("eta -:--:--", style="cyan")
        left = pace * (task.total - task.completed) - since
        return Text("eta " + _clock(max(left, 0.0)), style="cyan")


class RunConsole:
    """Log lines, alarms, step lines and progress bars for one run.

    console: a rich Console, or None for plain `print` lines (the Python API's default).
    progress: draw live bars; they are drawn only when the console is an interactive terminal.
    """

    def __init__(self, console: Console | None = None, progress: bool = True):
        self.console = console
        # Not on a dumb terminal (TERM=dumb) either: it cannot redraw a line.
        self.bars = bool(progress and console is not None and console.is_interactive)
        self._progress: Progress | None = None
        self._open = 0  # bars shown; the live display runs while this is > 0
        # Seconds per prompt of the last evaluation: an evaluation done in one batch (64 prompts
        # or fewer) advances only at its end, so the next one's ETA starts from this.
        self._eval_pace: float | None = None

    # ------------------------------------------------------------------ lines
    def _print(self, text: str | Text, style: str = "") -> None:
        if self.console is None:
            print(text.plain if isinstance(text, Text) else text, flush=True)
            return
        text = text if isinstance(text, Text) else Text(text, style=style)
        # Off a terminal, one message is one line in the log, not wrapped at 80 columns.
        self.console.print(text, soft_wrap=not self.console.is_terminal)

    def log(self, msg: str) -> None:
        self._print(msg)

    def warn(self, msg: str) -> None:
        """Something the user should look at; the run goes on."""
        self._print(WARN_PREFIX + msg, "bold yellow")

    def alarm(self, msg: str) -> None:
        """A sign the run is going wrong (health alarms)."""
        self._print(ALARM_PREFIX + msg, "bold red")

    def step_line(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        if self.console is None:
            self._print(format_step_line(step, total, metrics))
        else:
            self._print(_step_text(step, total, metrics))

    # ------------------------------------------------------------------ bars
    def _add(self, description: str, total: int, done: int, unit: str, **fields) -> int | None:
        if not self.bars:
            return None
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=28),
                TextColumn("{task.completed:.0f}/{task.total:.0f} {task.fields[unit]}"),
                TimeElapsedColumn(), EtaColumn(), TextColumn("{task.fields[status]}"),
                console=self.console, transient=True,
                refresh_per_second=2,  # the CPUs are busy training; the clock ticks in seconds
            )
            self._progress.start()
        self._open += 1
        task = self._progress.add_task(
            description, total=total, completed=done, unit=unit, status="", first=done, **fields
        )
        self._progress.refresh()
        return task

    def _task(self, task: int) -> Task:
        return next(t for t in self._progress.tasks if t.id == task)

    def _advance(self, task: int, n: int, **fields) -> None:
        done_at = self._task(task).elapsed  # EtaColumn's pace
        self._progress.update(task, advance=n, done_at=done_at, refresh=True, **fields)

    def _remove(self, task: int | None) -> None:
        if task is None:
            return
        self._progress.remove_task(task)
        self._open -= 1
        if self._open:
            self._progress.refresh()  # else the next line printed above the bars redraws this one
        else:
            self._progress.stop()
            self._progress = None

    @contextmanager
    def train_progress(self, total: int, done: int = 0, show: bool = True) -> Iterator[Callable]:
        """`with train_progress(num_steps, done=resumed_step) as advance:` call `advance(metrics)`
        after each step; the bar's status shows that step's mean reward."""
        task = self._add("train", total, done, "steps") if show else None

        def advance(metrics: dict[str, Any] | None = None) -> None:
            if task is not None:
                mean = _get(metrics or {}, "reward/mean")
                status = "" if mean is None else f"reward {_num(mean, 2)}"
                self._advance(task, 1, status=status)

        try:
            yield advance
        finally:
            self._remove(task)

    @contextmanager
    def eval_progress(self, total: int, label: str = "eval") -> Iterator[Callable[[int], None]]:
        """`with eval_progress(num_prompts) as advance:` call `advance(n)` as n more prompts are
        scored (evaluate_prompts' `progress`)."""
        task = self._add(label, total, 0, "prompts", pace=self._eval_pace)

        def advance(n: int) -> None:
            if task is not None:
                self._advance(task, n)

        try:
            yield advance
        finally:
            if task is not None:
                t = self._task(task)
                if t.completed:
                    self._eval_pace = t.fields["done_at"] / t.completed
            self._remove(task)
