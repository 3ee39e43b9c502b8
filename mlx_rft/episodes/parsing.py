"""Tool calls in a model's text: Hermes/Qwen `<tool_call>` tags and Llama-3 JSON messages.

A multi-turn episode needs to know, after each assistant turn, which tools the model asked for.
Small models get the format wrong often, and those mistakes are what training must correct, so a
malformed call never raises: it becomes an error message written for the model to read (it is
sent back as the tool's reply), next to the well-formed calls.

Two formats are understood:

- Hermes/Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number per
  message. A last `<tool_call>{...}` left open at the very end counts, because generation is
  often stopped at the closing tag, which then never appears in the text.
- Llama-3: the whole message (optionally after `<|python_tag|>`) is one JSON object
  `{"name": ..., "parameters": {...}}`, or a JSON list of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
# Llama-3 end-of-message tokens that survive decoding when special tokens are kept.
_END_TOKENS = ("<|eom_id|>", "<|eot_id|>")
FORMAT_HINT = 'write <tool_call>{"name": "...", "arguments": {...}}</tool_call>'
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call: the tool's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedCalls:
    """The calls in one message: well-formed ones, and one message per malformed one."""

    calls: list[ToolCall]  # in text order
    errors: list[str]  # readable by the model; each names the call and the format to use


def parse_tool_calls(text: str) -> ParsedCalls:
    """The tool calls in `text`; text without any call gives no calls and no errors."""
    items = scan_tool_calls(text)
    return ParsedCalls(
        calls=[item for item in items if isinstance(item, ToolCall)],
        errors=[item for item in items if isinstance(item, str)],
    )


def scan_tool_calls(text: str) -> list[ToolCall | str]:
    """Calls and error messages in text order (a str item is the error for a malformed call)."""
    if OPEN in text:
        return _scan_tags(text)
    return _scan_llama(text)


def _scan_tags(text: str) -> list[ToolCall | str]:
    items: list[ToolCall | str] = []
    pos = text.find(OPEN)
    number = 0
    while pos != -1:
        number += 1
        start = pos + len(OPEN)
        close = text.find(CLOSE, start)
        nxt = text.find(OPEN, start)
        if close != -1 and (nxt == -1 or close < nxt):
            items.append(_call_from_json(text[start:close], number))
            pos = text.find(OPEN, close + len(CLOSE))
        elif nxt == -1:
            # Left open at the very end: generation stopped at the closing tag.
            items.append(_call_from_json(text[start:], number))
            pos = -1
        else:
            # Left open before another call: the model lost track of the format; say so rather
            # than guess where this call ends.
            items.append(f"error: tool call {number} is not closed with {CLOSE}; {FORMAT_HINT}")
            pos = nxt
    return items


def _scan_llama(text: str) -> list[ToolCall | str]:
    body = text.strip()
    for token in _END_TOKENS:
        body = body.removesuffix(token).rstrip()
    tagged = body.startswith(PYTHON_TAG)
    if tagged:
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith(("{", "[")):
        if tagged:
            return [f"error: tool call 1 after {PYTHON_TAG} is not a JSON object; {FORMAT_HINT}"]
        return []
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        # Without the tag, a message that merely starts with a brace is not necessarily a call;
        # one that mentions "name" was meant as one.
        if tagged or '"name"' in body:
            return [_json_error(1, e)]
        return []
    objects = data if isinstance(data, list) else [data]
    if not tagged and not all(_looks_like_call(obj) for obj in objects):
        return []  # a JSON answer, not a call
    return [_call_from_object(obj, number) for number, obj in enumerate(objects, 1)]


def _looks_like_call(obj: Any) -> bool:
    return isinstance(obj, dict) and ("name" in obj or any(k in obj for k in _ARGUMENT_KEYS))


def _json_error(number: int, e: json.JSONDecodeError) -> str:
    return f"error: tool call {number} is not valid JSON ({e.msg} at char {e.pos}); {FORMAT_HINT}"


def _call_from_json(body: str, number: int) -> ToolCall | str:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return _json_error(number, e)
    return _call_from_object(obj, number)


def _call_from_object(obj: Any, number: int) -> ToolCall | str:
    if not isinstance(obj, dict):
        return f"error: tool call {number} must be a JSON object, not {_json_type(obj)}; {FORMAT_HINT}"
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        what = "has no \"name\"" if name is None else f"has a \"name\" that is {_json_type(name)}, not a string"
        return f"error: tool call {number} {what}; {FORMAT_HINT}"
    key = next((k for k in _ARGUMENT_KEYS if k in obj), None)
    arguments = obj[key] if key else {}  # a tool without arguments may be called without any
    if isinstance(arguments, str):
        # Some templates (OpenAI style) carry arguments as a JSON string.
        if not arguments.strip():
            arguments = {}
        else:
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return (f"error: the \"{key}\" of tool call {number} ({name}) is a string that is not "
                        f"valid JSON ({e.msg} at char {e.pos}); {FORMAT_HINT}")
    if not isinstance(arguments, dict):
        return (f"error: the \"{key}\" of tool call {number} ({name}) must be a JSON object, not "
                f"{_json_type(arguments)}; {FORMAT_HINT}")
    return ToolCall(name=name.strip(), arguments=arguments)


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as the model wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
