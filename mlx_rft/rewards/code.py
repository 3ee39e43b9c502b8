"""A sandboxed code reward: run a completion's Python against a row's tests in a locked-down child.

Score = fraction of tests passed. Tests come from the `tests` column: a list of snippets (each an
assert or a few lines; each is one test), a string of top-level `assert` statements (each is one
test; the other statements are setup), or HumanEval-style `def check(candidate)` code plus an
`entry_point` column (one test: `check(<entry_point>)`).

The code runs in `rewards.sandbox` (see there for its containment layers and their limits).
"""

from __future__ import annotations

import ast
import re
import threading
from typing import Any

from ..errors import MlxRftError
from .sandbox import CodeJob, CodeSandbox, ExecResult, SandboxConfig, detect_isolation

# The sandbox's names too, where the reward's users have always found them.
__all__ = [
    "CodeJob",
    "CodeSandbox",
    "ExecResult",
    "SandboxConfig",
    "build_job",
    "code",
    "detect_isolation",
    "extract_code",
    "make_code_reward",
]

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The Python code in a completion: the last ```python block that defines something (def or
    class), else the last python block, else the last fenced block, else the whole text. An
    unclosed fence (a cut-off completion) runs to the end of the text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
    if not blocks:
        return text
    python = [b for lang, b in blocks if lang in ("python", "py", "python3")]
    defining = [b for b in python if re.search(r"^\s*(def|class|async def)\s", b, re.MULTILINE)]
    for choice in (defining, python, [b for _, b in blocks]):
        if choice:
            return choice[-1]
    return text


def build_job(code: str, tests: Any, entry_point: str | None = None, prefix: str | None = None) -> CodeJob:
    """A CodeJob from solution code and a row's tests (see the module docstring for the forms)."""
    if prefix:
        code = f"{prefix}\n{code}"
    if isinstance(tests, (list, tuple)):
        if not all(isinstance(t, str) for t in tests):
            raise ValueError("a tests list must hold strings of Python code")
        return CodeJob(code=code, tests=list(tests))
    if not isinstance(tests, str):
        raise ValueError(f"tests must be a string or a list of strings, got {type(tests).__name__}")
    if entry_point:
        if not str(entry_point).isidentifier():
            raise ValueError(f"entry_point {entry_point!r} is not a Python name")
        return CodeJob(code=code, setup=tests, tests=[f"check({entry_point})"])
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"the tests do not parse as Python: {e}") from None
    asserts = [s for s in tree.body if isinstance(s, ast.Assert)]
    if not asserts:
        if any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in tree.body):
            raise ValueError("the tests define check(candidate) but the row has no entry_point")
        return CodeJob(code=code, tests=[tests])
    setup = [ast.get_source_segment(tests, s) for s in tree.body if not isinstance(s, ast.Assert)]
    return CodeJob(
        code=code,
        setup="\n".join(s for s in setup if s),
        tests=[ast.get_source_segment(tests, s) or ast.unparse(s) for s in asserts],
    )


def make_code_reward(
    config: SandboxConfig | None = None,
    *,
    tests_column: str = "tests",
    entry_point_column: str = "entry_point",
    prefix_column: str | None = None,
    name: str = "code",
    **config_overrides,
):
    """An async reward: the fraction of a row's tests that the completion's code passes.

    tests_column: the row's tests (see the module docstring); rows where it is None score None.
    entry_point_column: HumanEval's function name for `check(candidate)`, when present.
    prefix_column: a column prepended to the code (e.g. a HumanEval prompt with the signature).
    config_overrides: SandboxConfig fields, e.g. make_code_reward(timeout=5, memory_mb=512).
    The sandbox is created on first use (it probes the OS for namespace support then).
    """
    if config is not None and config_overrides:
        raise MlxRftError("pass either a SandboxConfig or config fields to make_code_reward, not both")
    try:
        cfg = config or SandboxConfig(**config_overrides)
    except TypeError as e:
        raise MlxRftError(f"make_code_reward: {e}; see SandboxConfig for the fields") from None
    state: dict[str, CodeSandbox] = {}
    lock = threading.Lock()

    def sandbox() -> CodeSandbox:
        with lock:
            if "box" not in state:
                state["box"] = CodeSandbox(cfg)
            return state["box"]

    async def code_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        if tests_column not in columns:
            raise MlxRftError(
                f"reward {name!r} needs the dataset column {tests_column!r} (test code per row); "
                f"the batch has: {', '.join(sorted(columns)) or 'none'}"
            )
        tests = columns[tests_column]
        entry = columns.get(entry_point_column) or [None] * len(completions)
        prefix = columns.get(prefix_column) if prefix_column else None
        jobs, rows = [], []
        for i, completion in enumerate(completions):
            if tests[i] is None:
                continue
            try:
                job = build_job(extract_code(completion), tests[i], entry[i], prefix[i] if prefix else None)
            except ValueError as e:
                raise MlxRftError(f"reward {name!r}: row {i} has unusable tests: {e}; fix the dataset") from None
            jobs.append(job)
            rows.append(i)
        box = sandbox()
        results = await box.arun_many(jobs)
        scores: list[float | None] = [None] * len(completions)
        for i, res in zip(rows, results):
            if res.status == "sandbox_error":
                raise MlxRftError(
                    f"reward {name!r}: the code sandbox failed to start ({res.isolation} isolation): "
                    f"{res.stderr.strip()[-500:] or 'no output'}; try isolation='none' or check unshare"
                )
            scores[i] = res.score
        code_reward.last_results = results  # for inspection and tests
        return scores

    code_reward.__name__ = code_reward.__qualname__ = name
    code_reward.sandbox = sandbox
    code_reward.last_results = []
    return code_reward


code = make_code_reward()
