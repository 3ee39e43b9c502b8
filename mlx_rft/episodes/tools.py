"""Tools a model may call during an episode: `Tool`, `ToolBox`, and the built-in tools.

A tool is a plain Python function with type hints and a Google-style docstring; `as_tool` turns
it into the JSON schema that chat templates (and system prompts) show the model. `ToolBox.call`
runs one parsed call and always returns text for the model to read: during training the model's
mistakes (an unknown tool, a wrong argument, code that raises or hangs) are part of what it
learns from, so they come back as "error: ..." replies instead of exceptions.

Built-in tools: `calculator` (exact arithmetic, by walking the expression's syntax tree, never
`eval`) and `python` (code run in the project's code sandbox, see mlx_rft.rewards.sandbox).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MlxRftError
from ..user_code import load_object
from .parsing import ToolCall

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_CHARS = 2000
_SCHEMA_FIX = (
    "give every argument a type hint and write a Google-style docstring: a description line, then "
    "an Args: section with one 'name: description' line per argument"
)


class ToolError(ValueError):
    """An error a tool reports for the model to read as is: ToolBox shows "error: <message>",
    without the exception's type name (a ValueError, so callers may catch it as one)."""


@dataclass
class Tool:
    """A callable the model may use, with the schema the model is shown."""

    name: str
    function: Callable[..., Any]
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}
    timeout: float = DEFAULT_TIMEOUT  # seconds ToolBox.call waits for the function


@dataclass(frozen=True)
class ToolResult:
    """One call's outcome, as the model will read it."""

    name: str
    content: str  # the tool's output as text, or an "error: ..." message
    error: bool
    seconds: float


def as_tool(fn_or_tool: Callable | Tool, timeout: float = DEFAULT_TIMEOUT) -> Tool:
    """A Tool for a function, its schema read from its type hints and docstring; a Tool as is.

    A function may carry a `min_tool_timeout` attribute (seconds): a tool that enforces its own
    time limit (such as `python`) needs at least that long to report its own, clearer, timeout.
    """
    if isinstance(fn_or_tool, Tool):
        return fn_or_tool
    fn = fn_or_tool
    if not callable(fn):
        raise MlxRftError(
            f"{fn!r} is not a function; pass a function with type hints and a Google-style "
            "docstring, or a Tool"
        )
    label = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    from transformers.utils import get_json_schema  # lazy: transformers is slow to import

    try:
        schema = get_json_schema(fn)
    except Exception as e:  # noqa: BLE001  (its parsing exceptions share no base class but Exception)
        raise MlxRftError(f"cannot make a tool of {label}: {e}; {_SCHEMA_FIX}") from e
    timeout = max(float(timeout), float(getattr(fn, "min_tool_timeout", 0.0)))
    return Tool(name=schema["function"]["name"], function=fn, schema=schema, timeout=timeout)


class ToolBox:
    """The tools of one episode, by name; `call` runs one ToolCall and never raises for the model's
    mistakes."""

    def __init__(
        self,
        tools: Sequence[Callable | Tool],
        timeout: float = DEFAULT_TIMEOUT,
        max_chars: int = DEFAULT_MAX_CHARS,
    ):
        if max_chars < 1:
            raise MlxRftError(f"ToolBox max_chars must be at least 1, got {max_chars}")
        self.max_chars = max_chars
        self._tools: dict[str, Tool] = {}
        for item in tools:
            tool = as_tool(item, timeout)
            if tool.name in self._tools:
                raise MlxRftError(
                    f"two tools are named {tool.name!r}; give each tool a different function name"
                )
            self._tools[tool.name] = tool
        self.names: list[str] = list(self._tools)

    def __repr__(self) -> str:
        return f"ToolBox({self.names})"

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def schemas(self) -> list[dict]:
        """The tools' schemas, for a chat template's `tools=` or a system prompt."""
        return [tool.schema for tool in self._tools.values()]

    def call(self, call: ToolCall) -> ToolResult:
        """Run one call; problems come back as a ToolResult with error=True."""
        t0 = time.monotonic()
        tool = self._tools.get(call.name)
        if tool is None:
            available = ", ".join(self.names) or "none"
            message = f"error: unknown tool {call.name!r}; available tools: {available}"
            return self._result(call.name, message, True, t0)
        problem = _argument_problem(tool, call.arguments)
        if problem:
            return self._result(call.name, f"error: {problem}", True, t0)
        outcome: dict[str, Any] = {}

        def target():
            try:
                outcome["value"] = tool.function(**call.arguments)
            except BaseException as e:  # noqa: BLE001  (SystemExit too: it is the model's code)
                outcome["error"] = e

        thread = threading.Thread(target=target, name=f"mlx-rft-tool-{tool.name}", daemon=True)
        thread.start()
        thread.join(tool.timeout)
        if thread.is_alive():
            # Python cannot stop a thread from outside, so a hung tool is left running in the
            # background (a daemon thread: it does not keep the process alive at exit). Tools
            # that may hang on untrusted input should enforce their own limit, as `python` does.
            message = f"error: tool {tool.name!r} timed out after {tool.timeout:g} s"
            return self._result(call.name, message, True, t0)
        if "error" in outcome:
            return self._result(call.name, _describe(outcome["error"]), True, t0)
        return self._result(call.name, _as_text(outcome.get("value")), False, t0)

    def _result(self, name: str, content: str, error: bool, t0: float) -> ToolResult:
        if len(content) > self.max_chars:
            content = (
                content[: self.max_chars]
                + f"\n[... truncated: the output has {len(content)} characters, only the first "
                f"{self.max_chars} are shown]"
            )
        return ToolResult(name=name, content=content, error=error, seconds=time.monotonic() - t0)


def _argument_problem(tool: Tool, arguments: dict[str, Any]) -> str | None:
    """What is wrong with the arguments by the schema (missing or unexpected names), or None."""
    params = tool.schema.get("function", {}).get("parameters")
    if not isinstance(params, dict):
        return None  # a hand-written schema without parameters: let the function judge
    properties = params.get("properties") or {}
    required = params.get("required") or []
    expected = ", ".join(properties) or "none"
    missing = [name for name in required if name not in arguments]
    if missing:
        names = ", ".join(repr(n) for n in missing)
        return f"tool {tool.name!r} is missing the required argument(s) {names}; its arguments are: {expected}"
    unexpected = [name for name in arguments if name not in properties]
    if unexpected:
        names = ", ".join(repr(n) for n in unexpected)
        return f"tool {tool.name!r} got unexpected argument(s) {names}; its arguments are: {expected}"
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, ToolError):
        return f"error: {e}"
    text = str(e)
    return f"error: {type(e).__name__}: {text}" if text else f"error: {type(e).__name__}"


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        try:
            return str(value)
        except Exception as e:  # noqa: BLE001  (a broken __str__ is still the tool's problem)
            return f"error: the tool's result cannot be shown as text ({type(e).__name__}: {e})"


# ---------------------------------------------------------------------------------------------
# calculator

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 100
# Integers up to about 1000 decimal digits: exact, and cheap to multiply and print.
MAX_INT_BITS = 3322
_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_ALLOWED = "use only numbers, + - * / // % ** and parentheses"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly, for example "123 * 45 + 6".

    Args:
        expression: The arithmetic to do: numbers, + - * / // % ** and parentheses.
    """
    if not isinstance(expression, str):
        raise ToolError(f"the expression must be a string, not {type(expression).__name__}")
    text = expression.strip().removesuffix("=").strip()  # "12 * 3 =" is a common way to ask
    if not text:
        raise ToolError(f"the expression is empty; {_ALLOWED}")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters; split it up")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ToolError(f"{text!r} is not a valid expression ({e.msg}); {_ALLOWED}") from None
    except (RecursionError, MemoryError):
        raise ToolError("the expression is nested too deeply") from None
    try:
        value = _evaluate(tree.body)
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None
    return _format_number(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ToolError(f"{value!r} is not a number; {_ALLOWED}")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _checked(_BINARY_OPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result is too large") from None
    raise ToolError(_refusal(node))


def _refusal(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        return "^ is not a power here; write ** for powers (2 ** 10)"
    if isinstance(node, ast.Name):
        return f"names such as {node.id!r} are not allowed; {_ALLOWED}"
    if isinstance(node, ast.Call):
        return f"function calls are not allowed; {_ALLOWED}"
    if isinstance(node, ast.Attribute):
        return f"attributes such as .{node.attr} are not allowed; {_ALLOWED}"
    if isinstance(node, ast.Tuple):
        return f"commas are not allowed (write 1234, not 1,234); {_ALLOWED}"
    return f"{type(node).__name__} is not allowed; {_ALLOWED}"


def _check_power(base: int | float, exponent: int | float) -> None:
    # Refused before computing: 9 ** 9 ** 9 would otherwise run for hours.
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponents are limited to {MAX_EXPONENT} in size, got {exponent!r}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > MAX_INT_BITS + exponent:
            raise ToolError("the result is too large")


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("the result is too large")
    return value


def _format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        # 10 / 2 reads as 5, not 5.0; beyond 1e16 floats are not exact integers, so keep repr.
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# python

PYTHON_TIMEOUT = 10.0
_STDERR_TAIL = 1000
_sandbox = None
_sandbox_lock = threading.Lock()


def _python_sandbox():
    """The process's one sandbox for the python tool, made on first use (probing the machine's
    isolation takes a moment, and most episodes never run code)."""
    global _sandbox
    with _sandbox_lock:
        if _sandbox is None:
            from ..rewards.sandbox import CodeSandbox, SandboxConfig

            _sandbox = CodeSandbox(SandboxConfig(timeout=PYTHON_TIMEOUT))
        return _sandbox


def python(code: str) -> str:
    """Run a Python program in a sandbox (no network, no files outside its folder) and return what it prints.

    Args:
        code: The Python program to run; print the values you want to see.
    """
    from ..rewards.sandbox import CodeJob

    if not isinstance(code, str):
        raise ToolError(f"the code must be a string, not {type(code).__name__}")
    # The child reports a failure of the code only through the tests' results, so one no-op
    # test carries it (with no tests, failing code and working code look the same).
    result = _python_sandbox().run(CodeJob(code=code, tests=["pass"]))
    stdout = result.stdout.rstrip("\n")
    stderr = result.stderr.strip()
    if result.status == "ok":
        problem = result.errors[0]
        if problem is not None:
            problem = problem.removeprefix("solution: ")
        if problem is None or problem in ("SystemExit: 0", "SystemExit: None", "SystemExit: "):
            return _with_stderr(stdout or "(no output)", stderr)
        raise ToolError(_failure(problem, stdout, stderr))
    if result.status == "timeout":
        problem = f"the code ran longer than {PYTHON_TIMEOUT:g} s and was stopped"
        raise ToolError(_failure(problem, stdout, stderr))
    if result.status == "crashed":
        raise ToolError(_failure(
            f"the code crashed (exit status {result.returncode}; memory or CPU limits end a program this way)",
            stdout, stderr,
        ))
    raise ToolError(_failure("the sandbox could not run the code", stdout, stderr))


python.min_tool_timeout = PYTHON_TIMEOUT + 5.0  # room for the sandbox to start and to report its own timeout


def _with_stderr(text: str, stderr: str) -> str:
    return f"{text}\n[stderr]\n{stderr[-_STDERR_TAIL:]}" if stderr else text


def _failure(problem: str, stdout: str, stderr: str) -> str:
    parts = [problem]
    if stdout:
        parts.append(f"[output before the error]\n{stdout}")
    if stderr:
        parts.append(f"[stderr]\n{stderr[-_STDERR_TAIL:]}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Specs

BUILTIN_TOOLS: dict[str, Callable] = {"calculator": calculator, "python": python}


def resolve_tools(spec: str | Sequence) -> list[Tool]:
    """Tools from a spec: a comma-separated string (or a list) of built-in names (calculator,
    python), `package.module:function` or `path/to/file.py:function` references; list items may
    also be functions or Tools."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    tools = []
    for item in items:
        if isinstance(item, str):
            if not item:
                continue
            if item in BUILTIN_TOOLS:
                item = BUILTIN_TOOLS[item]
            elif ":" in item:
                item = load_object(item, "tool")
            else:
                raise MlxRftError(
                    f"unknown tool {item!r}; use a built-in ({', '.join(BUILTIN_TOOLS)}), a "
                    "package.module:function or a path/to/file.py:function"
                )
        tools.append(as_tool(item))
    return tools
