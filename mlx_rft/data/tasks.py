"""Built-in tasks with verifiable rewards, from the reasoning-gym library, and answer-column tasks.

A `Task` is rows (chat prompts plus the columns the rewards need), a disjoint held-out eval set,
reward functions, and the system prompt that states the answer format. Any of reasoning-gym's
procedural generators is a task by name (`load_task("chain_sum")`), presets fix a dataset's options
and prompt (`load_task("default")`, the task `mlx-rft train` uses), and a JSONL/JSON/CSV/Parquet
file with an `answer` column is a task too (`load_task("data.jsonl")`).

Reward functions follow one convention, shared with the trainer: `f(prompts, completions, **columns)`
where `prompts` and `completions` are N strings and each column is a list of N values (the
column of the prompt each completion answers); they return N floats, or None where a reward does
not apply to a row.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MlxRftError
from ..rewards.base import RewardFunc
from ..rewards.verifiers import extract_final_answer, format_reward, make_accuracy
from .prompts import row_messages
from .readers import FORMATS, BadRow, read_raw_rows

ANSWER_FORMAT_SYSTEM_PROMPT = (
    "Answer the question. Put only the final answer between <answer> and </answer> tags, "
    "for example: <answer>42</answer>"
)
PROMPT_FORMATS = ("fewshot", "direct")

DEFAULT_EVAL_SIZE = 64
# Eval questions and few-shot examples come from seeds far from any training seed: reasoning-gym
# item i of seed s is generated from Random(s + i), so nearby seeds would share items. Questions
# are also de-duplicated across the splits, which guarantees the held-out set stays held out.
EVAL_SEED = 1 << 30
SHOT_SEED = (1 << 30) + (1 << 24)
_CHUNK_SEED_STRIDE = 1 << 24

# The task option answer_fallback (what counts as the answer without a closed <answer> tag) as
# the answer extraction of rewards/verifiers.py, which every reward here uses.
FALLBACKS = {None: "answer_tag", "number": "answer_tag_or_number", "last_line": "answer_tag_or_line"}


def answer_extraction(fallback: str | None) -> str:
    """The verifiers extraction for a task's answer_fallback (None: only a closed tag counts)."""
    if fallback not in FALLBACKS:
        raise MlxRftError(f"unknown answer fallback {fallback!r}; use one of {tuple(FALLBACKS)}")
    return FALLBACKS[fallback]


def extract_answer(completion: str, fallback: str | None = None) -> str | None:
    """The final answer in a completion as the task's rewards see it (see answer_extraction)."""
    return extract_final_answer(completion, answer_extraction(fallback))


@dataclass
class ReasoningGymAccuracy:
    """reasoning-gym's own scorer, `dataset.score_answer(extracted_answer, entry)`, in [0, 1].

    Rows carry the generator's entry as JSON text in the `entry` column (portable: rows written to a
    file still score). JSON turns tuples into lists, which a few scorers (arc_agi, rearc) care
    about, so entries generated in this process are looked up in their original form first.
    """

    dataset: Any  # the reasoning_gym ProceduralDataset whose score_answer is used
    fallback: str | None = None
    partial_credit: bool = True  # False: scores below 1 count as 0 (e.g. "128" for 28 scores 2/3)
    originals: dict[str, dict] = field(default_factory=dict)  # entry JSON -> entry
    __name__ = "accuracy"  # reward name in logs (class attribute, not a field)

    def __call__(self, prompts, completions, *, entry, **columns) -> list[float]:
        out = []
        for completion, text in zip(completions, entry, strict=True):
            original = self.originals.get(text)
            if original is None:
                original = json.loads(text)
            predicted = extract_answer(completion, self.fallback)
            try:
                score = float(self.dataset.score_answer(predicted, original))
            except Exception:  # noqa: BLE001
                # A few scorers parse the answer without guarding against garbage; an answer the
                # scorer cannot even read is a wrong answer, not a failed reward computation.
                score = 0.0
            out.append(score if self.partial_credit or score >= 1.0 else 0.0)
        return out


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    """Training rows, held-out rows and rewards for one task."""

    name: str
    rows: list[dict]  # training rows: "messages" (or "prompt"), "answer", task columns
    eval_rows: list[dict]  # held-out rows, no question shared with `rows` (may be empty)
    reward_funcs: list[RewardFunc]  # f(prompts, completions, **columns) -> N floats or None
    reward_weights: list[float]  # one per reward function, for the weighted total
    system_prompt: str | None  # prepended by the data loader (states the answer format)
    max_new_tokens: int = 64  # a generation budget that suits the task
    info: dict[str, Any] = field(default_factory=dict)  # how the task was made (for logs/configs)

    @property
    def reward_names(self) -> list[str]:
        return [getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs]


def available_tasks() -> list[str]:
    """Task names: the presets (e.g. "default"), then every reasoning-gym dataset."""
    return list(PRESETS) + sorted(_rg_registry())


def _rg_registry() -> dict:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as e:
        raise MlxRftError(
            "built-in tasks need the reasoning-gym package; install it with "
            "`pip install reasoning-gym`, or pass a data file with an 'answer' column"
        ) from e
    return DATASETS


def _unknown_task(name: str, names: list[str]) -> MlxRftError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    examples = ", ".join(n for n in ("chain_sum", "basic_arithmetic", "leg_counting", "countdown",
                                     "spell_backward", "gsm_symbolic") if n in names)
    return MlxRftError(
        f"unknown task {name!r}; {hint}use a preset ({', '.join(PRESETS)}), a reasoning-gym dataset "
        f"name (e.g. {examples}; "
        f"{len(names)} in all, listed by mlx_rft.data.tasks.available_tasks()) or a path to a "
        ".jsonl/.json/.csv/.parquet file with an 'answer' column"
    )


def _create(name: str, size: int, seed: int, config: dict[str, Any]):
    import dataclasses

    from reasoning_gym import create_dataset

    config_cls = _rg_registry()[name][1]
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"seed", "size"}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise MlxRftError(
            f"task {name!r} has no option {', '.join(unknown)}; its options are "
            f"{', '.join(sorted(fields)) or 'none'}"
        )
    try:
        return create_dataset(name, size=size, seed=seed, **config)
    except (AssertionError, ValueError, TypeError) as e:
        raise MlxRftError(f"invalid options {config} for task {name!r}: {e}; fix the options") from e


def _draw(
    name: str, config: dict, seed: int, count: int, exclude: set[str], distinct: bool, what: str = ""
):
    """`count` entries whose questions are not in `exclude` (and pairwise distinct if asked).

    Draws from seeds seed, seed + 2**24, ... so that chunks never regenerate the same items.
    """
    entries: list[dict] = []
    seen = set(exclude)
    for chunk in range(8):
        need = count - len(entries)
        if need <= 0:
            break
        dataset = _create(name, max(need, 16), seed + chunk * _CHUNK_SEED_STRIDE, config)
        for i in range(len(dataset)):
            entry = dataset[i]
            if entry["question"] in seen:
                continue
            if distinct:
                seen.add(entry["question"])
            entries.append(entry)
            if len(entries) == count:
                break
    if len(entries) < count:
        raise MlxRftError(
            f"task {name!r} with options {config} produced only {len(entries)} of {count} "
            f"distinct questions {what or 'outside the held-out set'}; widen the options (more "
            "terms or digits) or ask for fewer rows"
        )
    return dataset, entries


def _shot_messages(shots: list[dict], shot_format: str) -> list[dict[str, str]]:
    """Solved examples as earlier chat turns: a small model copies the format it has just seen.

    shot_format is a str.format template over the reasoning-gym entry, e.g.
    "{metadata[expression]} = {answer}\n<answer>{answer}</answer>" for a one-line worked solution.
    """
    messages = []
    for e in shots:
        try:
            reply = shot_format.format(**e)
        except (KeyError, IndexError, AttributeError, ValueError) as err:
            raise MlxRftError(
                f"shot_format {shot_format!r} does not fit this task's entries ({type(err).__name__}: "
                f"{err}); use the fields question, answer and metadata[...] of {sorted(e['metadata'])}"
            ) from None
        messages.append({"role": "user", "content": e["question"]})
        messages.append({"role": "assistant", "content": reply})
    return messages


@dataclass(frozen=True)
class TaskPreset:
    """A named built-in task: a reasoning-gym dataset with fixed options and prompt format."""

    name: str  # what --task accepts
    dataset: str  # the reasoning-gym dataset
    options: dict[str, Any] = field(default_factory=dict)  # load_task options (dataset + prompt)
    eval_size: int = DEFAULT_EVAL_SIZE
    max_new_tokens: int = 64
    description: str = ""


# The default task was chosen by measurement (`python bench/base_rate.py`): the untrained default model
# (SmolLM2-135M-Instruct) must be right sometimes but not often, so GRPO groups carry signal in a short
# run. With one-line worked examples ("15 + 7 = 22" then the tag) it is right on about a quarter of
# sampled completions (41% greedy), writes the <answer> tag 87% of the time, and 56% of 4-sample groups
# have mixed rewards. Plain "<answer>N</answer>" examples drop it to 5%; no examples, to 0 tags.
WORKED_SHOT = "{metadata[expression]} = {answer}\n<answer>{answer}</answer>"
PRESETS: dict[str, TaskPreset] = {
    "default": TaskPreset(
        name="default",
        dataset="chain_sum",
        options=dict(
            min_terms=2, max_terms=2, min_digits=1, max_digits=2, shot_format=WORKED_SHOT,
            partial_credit=False,  # reward exact answers only, so eval accuracy means "right"
        ),
        description="a + b or a - b with one- or two-digit numbers; two worked examples in the prompt",
    ),
    # A two-answer task (True/False, about half each): a constant answer already scores about
    # half, so only a score above eval/constant_baseline is learning. The untrained model is right
    # on 44% of sampled completions (69% greedy) and 88% of 4-sample groups have mixed rewards
    # (`python bench/base_rate.py --only isomorphic2_fewshot`).
    "isomorphic": TaskPreset(
        name="isomorphic",
        dataset="isomorphic_strings",
        options=dict(min_string_length=2, max_string_length=2),
        description="True/False: are two 2-letter strings isomorphic; two solved examples in the prompt",
    ),
}
DEFAULT_TASK = PRESETS["default"]


# Prompt and reward options of reasoning-gym tasks (every other option goes to the dataset config).
PROMPT_OPTION_DEFAULTS: dict[str, Any] = dict(
    prompt_format="fewshot",
    num_shots=2,
    shot_format="<answer>{answer}</answer>",
    answer_fallback=None,
    partial_credit=True,
    system_prompt=ANSWER_FORMAT_SYSTEM_PROMPT,
    format_weight=0.0,
)


def load_task(
    name: str, size: int = 1000, seed: int = 0, *, eval_size: int | None = None, **options
) -> Task:
    """A task by preset name (PRESETS, e.g. "default"), reasoning-gym dataset name, or data file.

    size / seed: training rows and their seed. eval_size (default DEFAULT_EVAL_SIZE, or the
    preset's): held-out rows, drawn from a fixed seed (EVAL_SEED) so the eval set does not move with
    the training seed, and never sharing a question with the training rows or the few-shot examples.

    options (a preset's own options are defaults that these override):
      prompt_format: "fewshot" (default) puts `num_shots` (2) solved examples, fixed and drawn from
          SHOT_SEED, before the question as chat turns; "direct" asks the question alone.
      shot_format: the examples' replies, a str.format template over the reasoning-gym entry
          (default "<answer>{answer}</answer>"; e.g. "{metadata[expression]} = {answer}\n<answer>
          {answer}</answer>" shows a one-line worked solution).
      answer_fallback: see extract_answer (None, the default: only a closed <answer> tag counts).
      partial_credit: keep reasoning-gym's partial scores (default True; e.g. chain_sum gives "128"
          2/3 when the answer is 28); False makes the reward 1 for a fully right answer, else 0.
      system_prompt: the task's system message (default ANSWER_FORMAT_SYSTEM_PROMPT).
      format_weight: > 0 adds format_reward with that weight (default 0: accuracy only).
      anything else: the reasoning-gym dataset's config, e.g. min_terms=2 for chain_sum.
    A data file path takes answer_fallback, system_prompt and format_weight only.
    """
    preset = PRESETS.get(name)
    merged = {**PROMPT_OPTION_DEFAULTS, **(preset.options if preset else {}), **options}
    prompt_opts = {k: merged.pop(k) for k in PROMPT_OPTION_DEFAULTS}
    if Path(name).suffix.lower() in FORMATS:
        not_for_files = sorted(
            set(merged) | ({"prompt_format", "num_shots", "shot_format"} & set(options))
        )
        if not_for_files:
            raise MlxRftError(f"options {not_for_files} apply to reasoning-gym tasks, not to a data file")
        extract_answer("", prompt_opts["answer_fallback"])  # validates the fallback name early
        return _file_task(
            Path(name), prompt_opts["answer_fallback"], prompt_opts["system_prompt"],
            prompt_opts["format_weight"],
        )
    if preset is not None:
        task = _rg_task(
            preset.dataset, size, seed, preset.eval_size if eval_size is None else eval_size,
            merged, **prompt_opts,
        )
        task.name, task.max_new_tokens = preset.name, preset.max_new_tokens
        task.info["preset"] = preset.name
        return task
    names = available_tasks()
    if name not in names:
        raise _unknown_task(name, names)
    return _rg_task(
        name, size, seed, DEFAULT_EVAL_SIZE if eval_size is None else eval_size, merged, **prompt_opts
    )


def _rg_task(
    name: str,
    size: int,
    seed: int,
    eval_size: int,
    task_options: dict[str, Any],
    *,
    prompt_format: str,
    num_shots: int,
    shot_format: str,
    answer_fallback: str | None,
    partial_credit: bool,
    system_prompt: str | None,
    format_weight: float,
) -> Task:
    if prompt_format not in PROMPT_FORMATS:
        raise MlxRftError(f"unknown prompt_format {prompt_format!r}; use one of {PROMPT_FORMATS}")
    if size < 1 or eval_size < 0 or num_shots < 0:
        raise MlxRftError(
            f"size ({size}) must be >= 1, eval_size ({eval_size}) and num_shots ({num_shots}) >= 0"
        )
    extract_answer("", answer_fallback)  # validates the fallback name early
    shots = _draw(name, task_options, SHOT_SEED, num_shots, set(), distinct=True)[1] if (
        prompt_format == "fewshot" and num_shots) else []
    shot_questions = {e["question"] for e in shots}
    eval_entries = (
        _draw(name, task_options, EVAL_SEED, eval_size, shot_questions, distinct=True,
              what=f"for the held-out set (eval_size={eval_size})")[1]
        if eval_size else []
    )
    held_out = shot_questions | {e["question"] for e in eval_entries}
    dataset, train_entries = _draw(name, task_options, seed, size, held_out, distinct=False)

    prefix = _shot_messages(shots, shot_format)
    scorer = ReasoningGymAccuracy(dataset, fallback=answer_fallback, partial_credit=partial_credit)

    def to_row(entry: dict) -> dict:
        text = json.dumps(entry, default=str)
        scorer.originals[text] = entry
        return {
            "messages": prefix + [{"role": "user", "content": entry["question"]}],
            "answer": entry["answer"],
            "question": entry["question"],
            "entry": text,
        }

    reward_funcs: list[RewardFunc] = [scorer]
    weights = [1.0]
    if format_weight:
        reward_funcs.append(format_reward)
        weights.append(format_weight)
    return Task(
        name=name,
        rows=[to_row(e) for e in train_entries],
        eval_rows=[to_row(e) for e in eval_entries],
        reward_funcs=reward_funcs,
        reward_weights=weights,
        system_prompt=system_prompt,
        info=dict(
            source="reasoning_gym", dataset=name, options=dict(task_options), size=size, seed=seed,
            eval_size=eval_size, eval_seed=EVAL_SEED, prompt_format=prompt_format,
            num_shots=len(shots), shot_format=shot_format, answer_fallback=answer_fallback,
            partial_credit=partial_credit,
        ),
    )


def _file_task(path: Path, answer_fallback, system_prompt, format_weight) -> Task:
    rows = []
    for raw in read_raw_rows(path):
        try:
            if isinstance(raw.value, BadRow):
                raise raw.value
            row_messages(raw.value)
            if "answer" not in raw.value:
                raise BadRow("has no 'answer' column, which the accuracy reward compares against")
        except BadRow as e:
            raise MlxRftError(f"{raw.where}: row {e}; fix or remove the row") from None
        rows.append(raw.value)
    if not rows:
        raise MlxRftError(f"{path} has no rows; add rows with a prompt and an answer")
    # The built-in accuracy reward, so `--task FILE` scores as `--reward-funcs accuracy` does.
    reward_funcs: list[RewardFunc] = [make_accuracy(answer_extraction(answer_fallback))]
    weights = [1.0]
    if format_weight:
        reward_funcs.append(format_reward)
        weights.append(format_weight)
    return Task(
        name=path.stem, rows=rows, eval_rows=[], reward_funcs=reward_funcs, reward_weights=weights,
        system_prompt=system_prompt,
        info=dict(source=str(path), answer_fallback=answer_fallback),
    )


def load_default_task(size: int = 1000, seed: int = 0) -> Task:
    """The built-in task that `mlx-rft train` uses without --task."""
    return load_task(DEFAULT_TASK.name, size, seed)
