"""Rubrics for an LLM judge: YAML -> judge chat messages, and the judge's reply -> scores in [0, 1].

A rubric file:

    name: helpfulness
    instructions: You are a strict grader of answers to user questions.
    scale: {min: 1, max: 10}
    criteria:
      - {name: correctness, description: Is the answer factually right?, weight: 2}
      - {name: clarity, description: Is it easy to follow?, weight: 1}
    reference_column: answer        # optional: show the row's reference answer to the judge
    examples:                       # optional few-shot examples
      - prompt: What is 2 + 2?
        completion: "4"
        scores: {correctness: 10, clarity: 9}
    calibration:                    # optional: clear pairs to check the judge with (judge_calibrate.py)
      - prompt: What is 2 + 2?
        better: "4"
        worse: "5"
        reference: "4"              # needed when reference_column is set

With the text method the judge is asked for a JSON object `{"correctness": N, "clarity": N}`.
Parsing is forgiving, in order: a JSON object anywhere in the reply (per criterion;
`{"scores": {...}}` and `{"c": {"score": N}}` too), then "correctness: 7/10"-style lines per
criterion, then one overall "Score: 7/10" or a lone number applied to every criterion. Anything
else is unparseable (None). Each criterion is normalised to [0, 1] ("x/y" as x/y, else
(x - min) / (max - min); values off the scale are rejected) and the criteria are combined by
weight.

With the probability method (`score_messages`) the judge is asked for one overall integer on
the scale, weighing the criteria itself; the few-shot answers are the examples' weighted scores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MlxRftError


@dataclass
class Criterion:
    name: str  # a short identifier, used as the JSON key
    description: str
    weight: float = 1.0


@dataclass
class RubricExample:
    """A few-shot example: a graded (prompt, completion) pair; scores on the rubric's scale."""

    prompt: str
    completion: str
    scores: dict[str, float]
    reference: str | None = None


@dataclass
class CalibrationPair:
    """Two responses to one prompt where any useful judge must prefer `better`."""

    prompt: str
    better: str
    worse: str
    reference: str | None = None


@dataclass
class JudgeScores:
    """One parsed judge reply.

    raw: criterion -> the number the judge gave; normalized: criterion -> [0, 1];
    score: weighted mean of `normalized`; method: which parser matched ("json", "lines", "overall").
    """

    raw: dict[str, float]
    normalized: dict[str, float]
    score: float
    method: str


@dataclass
class Rubric:
    name: str
    criteria: list[Criterion]
    scale_min: float = 1.0
    scale_max: float = 10.0
    instructions: str = "You are an impartial judge of an AI assistant's response to a user."
    examples: list[RubricExample] = field(default_factory=list)
    reference_column: str | None = None
    calibration: list[CalibrationPair] = field(default_factory=list)
    source: str | None = None  # the file it came from, for messages

    def __post_init__(self):
        if not self.criteria:
            raise MlxRftError(f"rubric {self.name!r} has no criteria; add at least one under 'criteria'")
        seen = set()
        for c in self.criteria:
            if not re.fullmatch(r"[A-Za-z][\w-]*", c.name):
                raise MlxRftError(
                    f"rubric {self.name!r}: criterion name {c.name!r} must be one word (letters, digits, "
                    "_ or -), as the judge answers with it as a JSON key"
                )
            if _key(c.name) in seen:
                raise MlxRftError(f"rubric {self.name!r}: criterion {c.name!r} appears twice")
            seen.add(_key(c.name))
            if not c.weight >= 0:
                raise MlxRftError(f"rubric {self.name!r}: criterion {c.name!r} has a negative weight")
        if sum(c.weight for c in self.criteria) <= 0:
            raise MlxRftError(f"rubric {self.name!r}: criteria weights sum to 0; give one a positive weight")
        if not self.scale_max > self.scale_min:
            raise MlxRftError(
                f"rubric {self.name!r}: scale max ({self.scale_max}) must exceed min ({self.scale_min})"
            )
        for ex in self.examples:
            missing = [c.name for c in self.criteria if c.name not in ex.scores]
            if missing:
                raise MlxRftError(f"rubric {self.name!r}: a few-shot example lacks scores for {missing}")
        if self.reference_column and any(p.reference is None for p in self.calibration):
            raise MlxRftError(
                f"rubric {self.name!r} shows the judge a reference answer, so every calibration pair "
                "needs a 'reference'"
            )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> Rubric:
        """A Rubric from a parsed YAML mapping; `source` (the file) names it in error messages."""
        path, source = source, source or "rubric"
        if not isinstance(data, dict):
            raise MlxRftError(f"{source}: a rubric must be a mapping with name, criteria and scale")
        fields = {"name", "criteria", "scale", "instructions", "examples", "reference_column", "calibration"}
        unknown = set(data) - fields
        if unknown:
            raise MlxRftError(
                f"{source}: unknown rubric field(s) {sorted(unknown)}; allowed: name, criteria, scale, "
                "instructions, examples, reference_column, calibration"
            )
        criteria = []
        for i, c in enumerate(data.get("criteria") or []):
            if isinstance(c, str):
                c = {"name": c, "description": c}
            if not isinstance(c, dict) or "name" not in c:
                raise MlxRftError(f"{source}: criteria[{i}] needs at least a name (and a description)")
            try:
                criteria.append(
                    Criterion(str(c["name"]), str(c.get("description", c["name"])), float(c.get("weight", 1.0)))
                )
            except (TypeError, ValueError):
                raise MlxRftError(f"{source}: criteria[{i}] weight must be a number") from None
        scale = data.get("scale") or {}
        if isinstance(scale, (list, tuple)) and len(scale) == 2:
            scale = {"min": scale[0], "max": scale[1]}
        if not isinstance(scale, dict):
            raise MlxRftError(f"{source}: scale must be {{min: 1, max: 10}}")
        examples = []
        for i, ex in enumerate(data.get("examples") or []):
            if not isinstance(ex, dict) or not {"prompt", "completion", "scores"} <= set(ex):
                raise MlxRftError(f"{source}: examples[{i}] needs prompt, completion and scores")
            if not isinstance(ex["scores"], dict):
                raise MlxRftError(f"{source}: examples[{i}].scores must map criterion names to numbers")
            examples.append(
                RubricExample(
                    str(ex["prompt"]), str(ex["completion"]),
                    {str(k): float(v) for k, v in ex["scores"].items()},
                    None if ex.get("reference") is None else str(ex["reference"]),
                )
            )
        calibration = []
        for i, pair in enumerate(data.get("calibration") or []):
            if not isinstance(pair, dict) or not {"prompt", "better", "worse"} <= set(pair):
                raise MlxRftError(f"{source}: calibration[{i}] needs prompt, better and worse")
            ref = pair.get("reference")
            calibration.append(
                CalibrationPair(
                    str(pair["prompt"]), str(pair["better"]), str(pair["worse"]), None if ref is None else str(ref)
                )
            )
        try:
            lo, hi = float(scale.get("min", 1)), float(scale.get("max", 10))
        except (TypeError, ValueError):
            raise MlxRftError(f"{source}: scale min and max must be numbers") from None
        kwargs = {}
        if data.get("instructions"):
            kwargs["instructions"] = str(data["instructions"]).strip()
        return cls(
            name=str(data.get("name") or "rubric"),
            criteria=criteria,
            scale_min=lo,
            scale_max=hi,
            examples=examples,
            reference_column=data.get("reference_column"),
            calibration=calibration,
            source=path,
            **kwargs,
        )

    # -- prompts -----------------------------------------------------------------------------

    def _fmt(self, x: float) -> str:
        return f"{x:g}"

    def system_prompt(self) -> str:
        lo, hi = self._fmt(self.scale_min), self._fmt(self.scale_max)
        lines = [self.instructions.strip(), ""]
        lines.append(f"Score the response on each criterion with an integer from {lo} (worst) to {hi} (best):")
        for c in self.criteria:
            lines.append(f"- {c.name}: {c.description.strip()}")
        example = ", ".join(f'"{c.name}": N' for c in self.criteria)
        lines += [
            "",
            f"Reply with only a JSON object, {{{example}}}, where each N is your score from {lo} to {hi}.",
        ]
        return "\n".join(lines)

    def user_prompt(self, prompt: str, completion: str, reference: str | None = None) -> str:
        parts = [f"[Question]\n{prompt.strip()}"]
        if reference is not None:
            parts.append(f"[Reference answer]\n{str(reference).strip()}")
        parts.append(f"[Response]\n{completion.strip()}")
        return "\n\n".join(parts)

    def messages(self, prompt: str, completion: str, reference: str | None = None) -> list[dict[str, str]]:
        """The judge's chat messages: system rubric, few-shot pairs, then the response to grade."""
        msgs = [{"role": "system", "content": self.system_prompt()}]
        for ex in self.examples:
            msgs.append({"role": "user", "content": self.user_prompt(ex.prompt, ex.completion, ex.reference)})
            scores = {c.name: _plain_number(ex.scores[c.name]) for c in self.criteria}
            msgs.append({"role": "assistant", "content": json.dumps(scores)})
        msgs.append({"role": "user", "content": self.user_prompt(prompt, completion, reference)})
        return msgs

    def overall_score(self, scores: dict[str, float]) -> int:
        """A few-shot example's per-criterion scores as one integer on the scale (by weight)."""
        norm = {c.name: self.normalize(scores[c.name]) or 0.0 for c in self.criteria}
        return round(self.scale_min + self.combine(norm) * (self.scale_max - self.scale_min))

    def score_system_prompt(self) -> str:
        lo, hi = self._fmt(self.scale_min), self._fmt(self.scale_max)
        weighted = len({c.weight for c in self.criteria}) > 1
        head = "Weigh these criteria" + (" (weights in brackets):" if weighted else ":")
        lines = [self.instructions.strip(), "", head]
        for c in self.criteria:
            lines.append(f"- {c.name}: {c.description.strip()}" + (f" [{c.weight:g}]" if weighted else ""))
        lines += ["", f"Reply with only one integer from {lo} (worst) to {hi} (best): your overall score."]
        return "\n".join(lines)

    def score_messages(self, prompt: str, completion: str, reference: str | None = None) -> list[dict[str, str]]:
        """The judge's chat for one overall score: the reply's first token is the number."""
        msgs = [{"role": "system", "content": self.score_system_prompt()}]
        for ex in self.examples:
            msgs.append({"role": "user", "content": self.user_prompt(ex.prompt, ex.completion, ex.reference)})
            msgs.append({"role": "assistant", "content": str(self.overall_score(ex.scores))})
        msgs.append({"role": "user", "content": self.user_prompt(prompt, completion, reference)})
        return msgs

    # -- parsing -----------------------------------------------------------------------------

    def normalize(self, value: float, denominator: float | None = None) -> float | None:
        """A score in [0, 1], or None when it is off the scale."""
        if denominator is not None:
            if denominator <= 0 or not 0 <= value <= denominator:
                return None
            return value / denominator
        if not self.scale_min <= value <= self.scale_max:
            return None
        return (value - self.scale_min) / (self.scale_max - self.scale_min)

    def combine(self, normalized: dict[str, float]) -> float:
        total = sum(c.weight for c in self.criteria)
        return sum(c.weight * normalized[c.name] for c in self.criteria) / total

    def parse(self, text: str | None) -> JudgeScores | None:
        """The judge's reply -> scores, or None when no complete set of scores can be read."""
        if not text:
            return None
        text = _THINK_RE.sub("", text).replace("<think>", "").replace("</think>", "")
        for method, reader in (("json", self._from_json), ("lines", self._from_lines), ("overall", self._from_overall)):
            found = reader(text)
            if found is not None:
                raw = {k: v for k, (v, _) in found.items()}
                norm = {k: self.normalize(v, d) for k, (v, d) in found.items()}
                if any(x is None for x in norm.values()):
                    continue  # off-scale numbers: probably not scores, try the next reading
                return JudgeScores(raw=raw, normalized=norm, score=self.combine(norm), method=method)
        return None

    def _from_json(self, text: str) -> dict[str, tuple[float, float | None]] | None:
        decoder = json.JSONDecoder()
        objects = []
        for m in re.finditer(r"\{", text):
            try:
                obj, _ = decoder.raw_decode(text, m.start())
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                objects.append(obj)
        for obj in reversed(objects):  # the last complete object is the verdict
            for candidate in (obj.get("scores"), obj):
                if isinstance(candidate, dict):
                    found = self._match_keys(candidate)
                    if found is not None:
                        return found
        return None

    def _match_keys(self, obj: dict) -> dict[str, tuple[float, float | None]] | None:
        by_key = {_key(str(k)): v for k, v in obj.items()}
        found = {}
        for c in self.criteria:
            value = by_key.get(_key(c.name))
            if value is None and len(self.criteria) == 1:
                value = next((by_key[k] for k in ("score", "rating", "overall") if k in by_key), None)
            parsed = _number(value)
            if parsed is None:
                return None
            found[c.name] = parsed
        return found

    def _from_lines(self, text: str) -> dict[str, tuple[float, float | None]] | None:
        found = {}
        for c in self.criteria:
            name = re.escape(c.name).replace("_", "[_ ]").replace("\\-", "[- ]")
            matches = re.findall(
                rf"(?i)\b{name}\b[*\s\"']*(?:score)?[*\s\"']*[:=\-][*\s]*(-?\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+(?:\.\d+)?))?",
                text,
            )
            if not matches:
                return None
            value, denom = matches[-1]
            found[c.name] = (float(value), float(denom) if denom else None)
        return found

    def _from_overall(self, text: str) -> dict[str, tuple[float, float | None]] | None:
        matches = re.findall(
            r"(?i)\b(?:score|rating|grade)\b[*\s]*(?:is|of|=|:)?[*\s:]*(-?\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+(?:\.\d+)?))?",
            text,
        )
        if matches:
            value, denom = matches[-1]
        else:
            lone = re.fullmatch(r"[\s*`\"'.]*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?[\s*`\"'.]*", text)
            if lone is None:
                return None
            value, denom = lone.groups()
        pair = (float(value), float(denom) if denom else None)
        return {c.name: pair for c in self.criteria}


_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", "_", name.strip().casefold())


def _plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _number(value: Any) -> tuple[float, float | None] | None:
    """(value, denominator or None) from a JSON value: 7, 7.5, "7", "7/10", {"score": 7}."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value), None
    if isinstance(value, dict):
        for k in ("score", "rating", "value"):
            if k in value:
                return _number(value[k])
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:(?:/|out of)\s*(\d+(?:\.\d+)?))?\s*", value)
        if m:
            return float(m.group(1)), float(m.group(2)) if m.group(2) else None
    return None


def load_rubric(path: str | Path) -> Rubric:
    """A Rubric from a YAML (or JSON) file."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise MlxRftError(f"rubric file {str(path)!r} does not exist; see examples/rubrics/ for the format")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MlxRftError(f"rubric {path} is not valid YAML: {e}") from None
    return Rubric.from_dict(data, source=str(path))
