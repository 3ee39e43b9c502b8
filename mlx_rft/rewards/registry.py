"""Reward specs to functions: built-in names (with factory arguments), `module:function`,
`path/to/file.py:function`. The one place that resolves them (train, eval and RewardSet use it)."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

from ..errors import MlxRftError
from ..user_code import load_object

_CALL_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


def builtin_rewards() -> dict[str, tuple[Callable | None, Callable | None]]:
    """Built-in reward name -> (ready function or None, factory or None)."""
    from .verifiers import BUILTINS

    return BUILTINS


def resolve_reward(spec: str | Callable) -> Callable:
    """A reward function from a spec.

    - a built-in name (`accuracy`, `format`, `think_format`, `length`, `overlong`, `repetition`,
      `code`), optionally with factory arguments: `accuracy(extract=boxed)`, `overlong(max_length=512)`;
    - `judge(rubric='r.yaml', url='http://127.0.0.1:8080/v1', model='m')` or
      `judge(rubric='r.yaml', local_model='path/to/model')` (an LLM judge, see judge.py), with
      `method='probs'` (default), `'text'` or `'pairwise'`;
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
        func = load_object(spec, "reward spec")
        if not callable(func):
            raise MlxRftError(f"reward spec {spec!r} names {type(func).__name__} {func!r:.40}, not a function")
        return func
    raise MlxRftError(
        f"unknown reward {spec!r}; use a built-in ({', '.join(sorted(table))}), "
        "a module:function, or a path/to/file.py:function"
    )


def _parse_kwargs(text: str, spec: str) -> dict[str, Any]:
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
