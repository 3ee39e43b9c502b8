"""The run report: one self-contained report.html with the run's numbers, plots and samples.

`write_report(run_dir, history, summary)` reads the trainer's history (one dict per logged row,
each with "step"; two rows may share a step, e.g. the last training step and the eval after
training, so rows are merged by step) and `run_dir/rollouts.jsonl`, and writes:

    summary      the held-out score before -> after, then the summary dict, rounded
    panels       one matplotlib figure per kind of data the run logged (absent data: no panel)
    alarms       each health alarm with the first step it held
    samples      for each sampled step, its best and worst completion by reward

Figures are PNGs embedded as base64, so the page needs no other file, no network and no script.
They are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so a
report leaves matplotlib's global state (and any interactive backend) alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

HEADLINE = "eval/accuracy"  # the held-out score the page leads with (pass@1, or mean score)
TIME_PARTS = ("generate", "reward", "logprobs", "update")
BAR_STEPS = 60  # the step-time panel draws one bar per step up to this many steps
MAX_SAMPLE_STEPS = 12  # more sampled steps than this: an even spread of them, first and last kept
PROMPT_CHARS, COMPLETION_CHARS = 240, 2000
DASHES = ("-", "--", ":", "-.")
ALARM_COLORS = ("#d62728", "#7f7f7f", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
DPI = 150  # figures are drawn at about 1.6x their on-page size, so text stays sharp
FIGSIZE = (4.8, 3.0)  # inches


# --------------------------------------------------------------------------- numbers and series
def fmt_value(v: Any) -> str:
    """A number as a person reads it: ints as ints, floats to 3 decimals (3 significant digits
    when tiny or huge), NaN and inf spelled out; anything else as its str."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return "-" if v is None else str(v)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    v = float(v)
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    a = abs(v)
    if v.is_integer() and a < 1e15:
        return str(int(v))  # counts logged as floats (eval/unscored 0.0)
    if a >= 1e6 or a < 0.01:
        return f"{v:.3g}"
    return f"{v:.1f}" if a >= 100 else f"{v:.3f}"


def _num(v: Any) -> float:
    """A logged value as a float, NaN for anything that is not a finite number (so matplotlib
    leaves a gap instead of stretching the axis to infinity)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return math.nan
    v = float(v)
    return v if math.isfinite(v) else math.nan


def merge_by_step(history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step, sorted; a later row's keys win (the eval after training shares the last
    training step)."""
    merged: dict[int, dict[str, Any]] = {}
    for row in history:
        step = row.get("step")
        if isinstance(step, numbers.Real) and math.isfinite(step):
            merged.setdefault(int(step), {}).update(row)
    return [merged[s] | {"step": s} for s in sorted(merged)]


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of the rows that logged `key`; None when no value is a finite number."""
    pts = [(r["step"], _num(r[key])) for r in rows if key in r]
    if not pts or not any(math.isfinite(y) for _, y in pts):
        return None
    x, y = zip(*pts)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def smoothing_window(n: int) -> int:
    """10% of the points, at least 1."""
    return max(1, round(0.1 * n))


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over `window` points, NaNs skipped (NaN only where a window has no value)."""
    ok = np.isfinite(y)
    with np.errstate(all="ignore"):  # huge rewards may overflow the sums; those points are NaN
        s = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
        c = np.concatenate([[0], np.cumsum(ok)])
        i = np.arange(len(y))
        lo, hi = np.clip(i - window // 2, 0, len(y)), np.clip(i - window // 2 + window, 0, len(y))
        count = c[hi] - c[lo]
        out = (s[hi] - s[lo]) / np.maximum(count, 1)
    return np.where(count > 0, out, np.nan)


def reward_functions(rows: list[dict]) -> list[str]:
    """The reward functions' names, from RewardResult.summary()'s `rewards/<name>/mean` (a name
    with a further "/" is a function's detail or metric, not a function)."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r:
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "rewards" and parts[2] == "mean":
                names[parts[1]] = None
    return list(names)


def alarm_spans(rows: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """health/<alarm> -> the (first, last) steps of each stretch where the alarm held."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        for k, v in r.items():
            if not k.startswith("health/"):
                continue
            name = k[len("health/"):]
            spans.setdefault(name, [])
            if _num(v) > 0.5:
                s = spans[name]
                if s and s[-1][1] == r["step"] - 1:
                    s[-1] = (s[-1][0], r["step"])
                else:
                    s.append((r["step"], r["step"]))
    return spans


# --------------------------------------------------------------------------- panels
@dataclass
class Panel:
    """One figure of the page: `id` is its stable HTML id (panel-<id>)."""

    id: str
    title: str
    figure: Figure
    note: str = ""


def _axes(ylabel: str) -> tuple[Figure, Any]:
    """A figure with one styled axes; the title is the page's <h3>, not drawn."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlabel("step", fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _legend(ax, *more_axes) -> None:
    """One legend for the axes (and a twin), above the plot so it never hides a line."""
    handles, labels = [], []
    for a in (ax, *more_axes):
        h, lab = a.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        # One row when the labels fit across the plot, else rows of 3 (2 for long labels).
        wide = sum(len(x) + 6 for x in labels) > 50
        ncols = (3 if max(map(len, labels)) <= 12 else 2) if wide else len(handles)
        ax.legend(handles, labels, fontsize=8.5, frameon=False, loc="lower left",
                  bbox_to_anchor=(0, 1.0), ncols=ncols, borderaxespad=0.2, handlelength=1.8)


def _raw_and_smoothed(ax, x, y, window: int, label: str, color: str) -> None:
    """The raw values faint, their moving average bold (one line when the window is 1)."""
    if window > 1:
        ax.plot(x, y, color=color, alpha=0.3, linewidth=1)
        ax.plot(x, moving_average(y, window), color=color, linewidth=2, label=label)
    else:
        ax.plot(x, y, color=color, linewidth=2, marker="o", markersize=3, label=label)


def _reward_panel(rows: list[dict]) -> Panel | None:
    funcs = [(s, n) for n in reward_functions(rows) if (s := series(rows, f"rewards/{n}/mean"))]
    total = series(rows, "reward/mean")
    # The weighted total, in black, unless it is just the one function's curve again.
    if total is not None and not (len(funcs) == 1 and _same(total, funcs[0][0])):
        funcs.insert(0, (total, "total (weighted)"))
    if not funcs:
        return None
    window = smoothing_window(max(len(s[0]) for s, _ in funcs))
    fig, ax = _axes("mean reward")
    colors = iter(f"C{i % 10}" for i in range(len(funcs)))
    for (x, y), label in funcs:
        color = "black" if label == "total (weighted)" else next(colors)
        _raw_and_smoothed(ax, x, y, window, label, color)
    fired = {k: v for k, v in sorted(alarm_spans(rows).items()) if v}
    for j, (name, spans) in enumerate(fired.items()):
        for k, (a, b) in enumerate(spans):
            ax.axvspan(a - 0.5, b + 0.5, color=ALARM_COLORS[j % len(ALARM_COLORS)], alpha=0.25,
                       linewidth=0, label=f"alarm: {name}" if k == 0 else None)
    _legend(ax)
    note = (f"faint: each step; bold: moving average over {window} steps" if window > 1
            else "each step (too few steps to smooth)")
    if fired:
        note += "; shaded: steps where a health alarm held"
    return Panel("reward", "Reward per reward function", fig, note)


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and np.allclose(
        a[1], b[1], equal_nan=True)


def eval_points(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """eval/accuracy, eval/pass@k and the constant-answer baseline over the eval steps."""
    keys = [HEADLINE] + sorted({k for r in rows for k in r if k.startswith("eval/pass@")})
    keys.append("eval/constant_baseline")
    return {k: s for k in keys if (s := series(rows, k)) is not None}


def _heldout_panel(rows: list[dict]) -> Panel | None:
    pts = eval_points(rows)
    scores = {k: v for k, v in pts.items() if k != "eval/constant_baseline"}
    if not scores:
        return None
    fig, ax = _axes("score")
    for i, (key, (x, y)) in enumerate(scores.items()):
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], color=f"C{i}", marker="o", linewidth=2, label=key.removeprefix("eval/"))
    if "eval/constant_baseline" in pts:
        x, y = pts["eval/constant_baseline"]
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], color="gray", linestyle="--", linewidth=1.5,
                drawstyle="steps-post" if ok.sum() > 1 else "default",
                marker="" if ok.sum() > 1 else "_", markersize=20, label="constant answer")
    x, y = scores[HEADLINE] if HEADLINE in scores else next(iter(scores.values()))
    ok = np.flatnonzero(np.isfinite(y))
    for i in sorted({ok[0], ok[-1]}):  # the before and after values, written on the plot
        ax.annotate(fmt_value(y[i]), (x[i], y[i]), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=9)
    finite = np.concatenate([v[1][np.isfinite(v[1])] for v in pts.values()])
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        ax.set_ylim(-0.02, 1.08)  # a share: the whole [0, 1] range, so a small gain looks small
    _legend(ax)
    return Panel("heldout", "Held-out score", fig, "step 0: before training; the last point: after")


def _length_panel(rows: list[dict]) -> Panel | None:
    length, trunc = series(rows, "completion/mean_length"), series(rows, "completion/truncated_frac")
    if length is None and trunc is None:
        return None
    fig, ax = _axes("mean tokens")
    if length is not None:
        ax.plot(*length, color="C0", linewidth=2, label="mean length")
    if trunc is not None:
        ax2 = ax.twinx() if length is not None else ax
        ax2.plot(*trunc, color="C3", linewidth=1.5, linestyle="--", label="truncated fraction")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("truncated fraction", fontsize=10, color="C3")
        ax2.tick_params(labelsize=9)
        ax2.spines["top"].set_visible(False)
        if ax2 is not ax:
            _legend(ax, ax2)
            return Panel("length", "Completion length", fig)
    _legend(ax)
    return Panel("length", "Completion length", fig)


def _lines_panel(rows, pid: str, title: str, ylabel: str, keys: dict[str, str],
                 ylim: tuple[float, float] | None = None) -> Panel | None:
    """A panel of plain lines, one per key present (label per key)."""
    found = [(s, label) for key, label in keys.items() if (s := series(rows, key)) is not None]
    if not found:
        return None
    fig, ax = _axes(ylabel)
    for i, ((x, y), label) in enumerate(found):
        # Dashes of their own, so lines that coincide (clip fractions all 0) still all show.
        ax.plot(x, y, color=f"C{i}", linewidth=1.8, label=label, linestyle=DASHES[i % len(DASHES)],
                marker="o" if len(x) <= 30 else "", markersize=3)
    if ylim:
        ax.set_ylim(*ylim)
    _legend(ax)
    return Panel(pid, title, fig)


def _zero_std_panel(rows: list[dict]) -> Panel | None:
    s = series(rows, "frac_zero_std_groups")
    if s is None:
        return None
    window = smoothing_window(len(s[0]))
    fig, ax = _axes("fraction of groups")
    _raw_and_smoothed(ax, *s, window, "all completions scored the same", "C4")
    ax.set_ylim(-0.02, 1.02)
    _legend(ax)
    return Panel("zero_std", "Zero-variance groups", fig,
                 "groups whose completions all got the same reward teach nothing")


def _time_panel(rows: list[dict]) -> Panel | None:
    parts = {p: series(rows, f"time/{p}") for p in TIME_PARTS}
    parts = {p: s for p, s in parts.items() if s is not None}
    if not parts:
        return None
    total = series(rows, "time/step")
    steps = np.asarray(sorted({float(v) for s in [*parts.values(), total] if s for v in s[0]}))
    index = {v: i for i, v in enumerate(steps)}

    def on_steps(s) -> np.ndarray:
        out = np.zeros(len(steps))
        for x, y in zip(*s):
            out[index[float(x)]] = y if math.isfinite(y) else 0.0
        return out

    heights = {p: on_steps(s) for p, s in parts.items()}
    if total is not None:  # whatever the step spent outside the four stages
        other = np.maximum(on_steps(total) - sum(heights.values()), 0.0)
        if other.max() > 0.01 * max(on_steps(total).max(), 1e-9):
            heights["other"] = other
    fig, ax = _axes("seconds")
    colors = [f"C{i}" for i in range(len(heights))]
    if len(steps) <= BAR_STEPS:
        bottom = np.zeros(len(steps))
        for (p, h), color in zip(heights.items(), colors):
            ax.bar(steps, h, bottom=bottom, width=0.8, color=color, linewidth=0, label=p)
            bottom = bottom + h
    else:  # thousands of bars take seconds to draw; stacked areas look the same at that width
        ax.stackplot(steps, *heights.values(), labels=list(heights), colors=colors, step="mid",
                     linewidth=0)
    ax.set_ylim(0, max(sum(heights.values()).max(), 1e-9) * 1.05)
    _legend(ax)
    return Panel("time", "Step time", fig, "stacked: where each step's seconds went")


PANELS: list[Callable[[list[dict]], Panel | None]] = [
    _reward_panel,
    _heldout_panel,
    _length_panel,
    lambda r: _lines_panel(r, "kl", "KL to the reference", "KL", {"kl": "KL"}),
    lambda r: _lines_panel(r, "entropy", "Entropy", "nats per token",
                           {"entropy": "entropy (loss tokens)", "entropy/sampled": "entropy (sampled)"}),
    lambda r: _lines_panel(r, "clip", "Clipped tokens", "fraction of tokens",
                           {"clip/low_frac": "low", "clip/high_frac": "high",
                            "clip/region_frac": "in a clip region"}, ylim=(-0.02, 1.02)),
    lambda r: _lines_panel(r, "loss", "Loss", "loss", {"loss": "loss"}),
    _zero_std_panel,
    _time_panel,
]


def build_panels(rows: list[dict]) -> list[Panel]:
    """The panels the merged rows have data for, in page order."""
    return [p for make in PANELS if (p := make(rows)) is not None]


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- samples
def read_samples(path: Path) -> list[dict[str, Any]]:
    """Per sampled step of rollouts.jsonl: {"step", "count", "best", "worst"} by reward. Streamed,
    keeping two records per step; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    steps: dict[int, dict[str, Any]] = {}
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(rec, dict):
                continue
            s = steps.setdefault(step, {"step": step, "count": 0, "best": None, "worst": None})
            s["count"] += 1
            r = _num(rec.get("reward"))
            if not math.isfinite(r):
                continue  # unscored: neither best nor worst
            if s["best"] is None or r > _num(s["best"].get("reward")):
                s["best"] = rec
            if s["worst"] is None or r < _num(s["worst"].get("reward")):
                s["worst"] = rec
    out = [steps[k] for k in sorted(steps)]
    if len(out) > MAX_SAMPLE_STEPS:
        keep = np.unique(np.linspace(0, len(out) - 1, MAX_SAMPLE_STEPS).round().astype(int))
        out = [out[i] for i in keep]
    return out


def _clip(text: str, n: int, tail: bool = False) -> str:
    if len(text) <= n:
        return text
    # A chat-templated prompt ends with the question; its start is boilerplate.
    return "…" + text[-n:] if tail else text[:n] + "…"


def _sample_cell(rec: dict | None) -> str:
    if rec is None:
        return "<td><em>no scored completion</em></td>"
    parts = [f"reward <b>{fmt_value(rec.get('reward'))}</b>"]
    per_func = [f"{html.escape(k[len('reward/'):])} {fmt_value(v)}"
                for k, v in rec.items() if k.startswith("reward/")]
    if len(per_func) > 1:  # one function: its score is the reward already shown
        parts.append(", ".join(per_func))
    if rec.get("finish_reason"):
        parts.append(html.escape(str(rec["finish_reason"])))
    text = html.escape(_clip(str(rec.get("completion", "")), COMPLETION_CHARS))
    return f"<td><div class='meta'>{' · '.join(parts)}</div><pre>{text}</pre></td>"


def _samples_html(samples: list[dict]) -> str:
    if not samples:
        return ""
    rows = []
    for s in samples:
        best, worst = s["best"], s["worst"]
        prompt = (best or worst or {}).get("prompt", "")
        same = best is not None and worst is not None and _num(best["reward"]) == _num(worst["reward"])
        worst_cell = (f"<td><em>all {s['count']} completions scored the same</em></td>"
                      if same else _sample_cell(worst))
        rows.append(
            f"<tr><td class='n'>{s['step']}</td>"
            f"<td><pre class='prompt'>{html.escape(_clip(str(prompt), PROMPT_CHARS, tail=True))}</pre></td>"
            f"{_sample_cell(best)}{worst_cell}</tr>"
        )
    return (
        "<h2 id='samples'>Sample completions</h2>"
        "<p class='note'>the best and the worst completion of each sampled step, by total reward "
        f"(prompts keep their last {PROMPT_CHARS} characters)</p>"
        "<table class='samples'><tr><th>step</th><th>prompt</th><th>best</th><th>worst</th></tr>"
        + "".join(rows) + "</table>"
    )


# --------------------------------------------------------------------------- the page
def _headline(rows: list[dict], summary: dict[str, Any]) -> str:
    before = summary.get(f"before {HEADLINE}")
    after = summary.get(f"after {HEADLINE}")
    if before is None and rows and rows[0]["step"] == 0:
        before = rows[0].get(HEADLINE)
    if before is None and after is None:
        return ""
    change = ""
    if math.isfinite(_num(before)) and math.isfinite(_num(after)):
        d = _num(after) - _num(before)
        change = f" <span class='delta'>({'+' if d >= 0 else ''}{fmt_value(d)})</span>"
    shown_after = fmt_value(after) if after is not None else "not measured (the run stopped early)"
    baseline = summary.get("after eval/constant_baseline", summary.get("before eval/constant_baseline"))
    base = (f"<div class='note'>a constant answer scores {fmt_value(baseline)}</div>"
            if baseline is not None else "")
    return (
        f"<div class='headline'><div class='label'>held-out score ({HEADLINE})</div>"
        f"<div class='big'>{fmt_value(before)} → {shown_after}{change}</div>{base}</div>"
    )


def _summary_html(summary: dict[str, Any]) -> str:
    evals: dict[str, dict[str, Any]] = {}
    plain = []
    for k, v in summary.items():
        when, _, metric = str(k).partition(" ")
        if when in ("before", "after") and metric:
            evals.setdefault(metric, {})[when] = v
        else:
            plain.append((k, v))
    out = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt_value(v))}</td></tr>"
                  for k, v in plain)
    out = f"<table class='kv'>{out}</table>" if out else ""
    if evals:
        body = "".join(
            f"<tr><th>{html.escape(m)}</th><td class='n'>{html.escape(fmt_value(v.get('before')))}</td>"
            f"<td class='n'>{html.escape(fmt_value(v.get('after')))}</td></tr>"
            for m, v in evals.items()
        )
        out += ("<table class='kv evals'><tr><th>held-out</th><th>before</th><th>after</th></tr>"
                f"{body}</table>")
    return f"<div class='tables'>{out}</div>"


def _alarms_html(rows: list[dict]) -> str:
    spans = alarm_spans(rows)
    if not spans:
        return ""  # no health metrics logged
    fired = {k: s for k, s in spans.items() if s}
    if not fired:
        return "<h2 id='alarms'>Health alarms</h2><p class='note'>no alarm fired</p>"
    body = "".join(
        f"<tr><th>{html.escape(name)}</th><td class='n'>{s[0][0]}</td>"
        f"<td class='n'>{sum(b - a + 1 for a, b in s)}</td></tr>"
        for name, s in sorted(fired.items(), key=lambda kv: kv[1][0][0])
    )
    return ("<h2 id='alarms'>Health alarms</h2><table class='kv alarms'><tr><th>alarm</th>"
            f"<th>first step</th><th>steps held</th></tr>{body}</table>")


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:1.5em auto;
max-width:1400px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin:.2em 0;font-size:1em}
.headline{background:#f3f7fb;border:1px solid #cfe0f0;border-radius:6px;padding:.8em 1.2em;
margin:1em 0;display:inline-block}
.headline .big{font-size:2em;font-weight:600} .delta{font-size:.6em;color:#555}
.label,.note{color:#666;font-size:.9em}
.tables{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
table{border-collapse:collapse} th,td{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top} .n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:1.2em}
figure{margin:0;border:1px solid #e5e5e5;border-radius:6px;padding:.5em}
figure img{width:100%;height:auto;display:block} figcaption{color:#666;font-size:.85em}
table.samples{width:100%;table-layout:fixed} table.samples td:first-child,
table.samples th:first-child{width:3em} table.samples td:nth-child(2),
table.samples th:nth-child(2){width:24%}
pre{white-space:pre-wrap;word-break:break-word;margin:.3em 0;font-size:.85em;background:#fafafa;
padding:.4em;border-radius:4px;max-height:22em;overflow:auto} .meta{font-size:.85em;color:#444}
pre.prompt{color:#555}
"""


def render_page(history: list[dict[str, Any]], summary: dict[str, Any],
                samples: list[dict[str, Any]]) -> str:
    """The report's HTML for a history, a summary dict and read_samples() output."""
    rows = merge_by_step(history)
    panels = build_panels(rows)
    figures = "".join(
        f"<figure id='panel-{p.id}'><h3>{html.escape(p.title)}</h3>"
        f"<img alt='{html.escape(p.title)}' src='data:image/png;base64,{_png(p.figure)}'>"
        + (f"<figcaption>{html.escape(p.note)}</figcaption>" if p.note else "")
        + "</figure>"
        for p in panels
    )
    trained = [r for r in rows if "loss" in r or "reward/mean" in r]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>mlx-rft run report</title><style>{CSS}</style></head><body>",
        "<h1>mlx-rft run report</h1>",
        f"<div class='note'>{len(trained)} training step{'s' if len(trained) != 1 else ''} logged</div>",
        _headline(rows, summary),
        _summary_html(summary),
        f"<h2 id='plots'>Training</h2><div class='grid'>{figures}</div>" if figures
        else "<p class='note'>no metrics were logged yet</p>",
        _alarms_html(rows),
        _samples_html(samples),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _health_log(run_dir: Path) -> list[dict[str, Any]]:
    """health/* values from metrics.jsonl: the trainer copies a step into its history before the
    health monitor adds them, so the log (complete once the reporters closed) is where they are."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                health = {k: v for k, v in rec.items() if k.startswith("health/")}
                if health:
                    out.append({"step": rec["step"], **health})
    return out


def write_report(run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """Write run_dir/report.html (atomically) and return its path."""
    run_dir = Path(run_dir)
    if not any(k.startswith("health/") for row in history for k in row):
        history = [*history, *_health_log(run_dir)]
    page = render_page(history, summary, read_samples(run_dir / "rollouts.jsonl"))
    path = run_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # a reader (or a crash) never sees half a report
    return path
