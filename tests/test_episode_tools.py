"""The tool/environment layer of multi-turn episodes: parsing tool calls from model text, tools and
the ToolBox (schemas, argument checks, errors, timeouts, truncation), the built-in calculator and
python tools, the built-in environments, and resolving CLI specs."""

import json
import time

import pytest

from mlx_rft.episodes.envs import (
    BUILTIN_ENVS,
    Arithmetic,
    Environment,
    GuessNumber,
    resolve_env,
)
from mlx_rft.episodes.parsing import ToolCall, parse_tool_calls
from mlx_rft.episodes.tools import (
    BUILTIN_TOOLS,
    Tool,
    ToolBox,
    as_tool,
    calculator,
    python,
    resolve_tools,
)
from mlx_rft.errors import MlxRftError


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


def nap(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def shout(text: str) -> str:
    """Repeat a text many times.

    Args:
        text: What to repeat.
    """
    return text * 1000


def listing(n: int) -> list:
    """The numbers below n.

    Args:
        n: The bound.
    """
    return list(range(n))


def undocumented(x: int) -> int:
    return x


def unhinted(x):
    """No type hint.

    Args:
        x: A value.
    """
    return x


# ---------------------------------------------------------------------------------------------
# Parsing


def test_one_hermes_call_with_whitespace():
    text = 'Let me compute.\n<tool_call>\n  {"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    parsed = parse_tool_calls(text)
    assert parsed.calls == [ToolCall("add", {"a": 1, "b": 2})]
    assert parsed.errors == []


def test_several_calls_in_text_order():
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> and '
        '<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>'
    )
    parsed = parse_tool_calls(text)
    assert [c.name for c in parsed.calls] == ["add", "calculator"]
    assert parsed.calls[1].arguments == {"expression": "2*3"}


def test_unclosed_final_call_counts():
    parsed = parse_tool_calls('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 5}}\n')
    assert parsed.calls == [ToolCall("add", {"a": 5})]
    assert parsed.errors == []


def test_unclosed_call_before_another_is_an_error():
    parsed = parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": {}}<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    )
    assert parsed.calls == [ToolCall("add", {"a": 1})]
    assert len(parsed.errors) == 1 and "tool call 1 is not closed" in parsed.errors[0]


def test_arguments_as_json_string_and_parameters_key():
    parsed = parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>'
        '<tool_call>{"name": "add", "parameters": {"a": 4}}</tool_call>'
    )
    assert parsed.calls == [ToolCall("add", {"a": 3}), ToolCall("add", {"a": 4})]


def test_llama_json_message_python_tag_and_list():
    assert parse_tool_calls('  {"name": "add", "parameters": {"a": 1}}  ').calls == [ToolCall("add", {"a": 1})]
    tagged = parse_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 2}}<|eom_id|>')
    assert tagged.calls == [ToolCall("add", {"a": 2})]
    several = parse_tool_calls('[{"name": "add", "parameters": {"a": 1}}, {"name": "nap", "arguments": {}}]')
    assert [c.name for c in several.calls] == ["add", "nap"]


def test_malformed_json_gives_a_readable_error():
    parsed = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1 "b": 2}}</tool_call>')
    assert parsed.calls == []
    assert len(parsed.errors) == 1
    error = parsed.errors[0]
    assert error.startswith("error: tool call 1 is not valid JSON (Expecting ',' delimiter at char ")
    assert '<tool_call>{"name": "...", "arguments": {...}}</tool_call>' in error


def test_missing_name_and_non_object_arguments():
    parsed = parse_tool_calls(
        '<tool_call>{"arguments": {"a": 1}}</tool_call>'
        '<tool_call>{"name": 7, "arguments": {}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>'
        '<tool_call>["add"]</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    )
    assert parsed.calls == [ToolCall("add", {"a": 1})]
    assert len(parsed.errors) == 4
    assert 'tool call 1 has no "name"' in parsed.errors[0]
    assert "tool call 2" in parsed.errors[1] and "not a string" in parsed.errors[1]
    assert "tool call 3" in parsed.errors[2] and "must be a JSON object, not a list" in parsed.errors[2]
    assert "tool call 4 must be a JSON object" in parsed.errors[3]
    # A Llama-style message that names no tool is an error too, once it is clearly a call.
    assert parse_tool_calls('{"parameters": {"a": 1}}').errors


def test_plain_text_and_json_answers_are_not_calls():
    for text in ("The answer is 42.", "", '{"answer": 42}', "{not json at all"):
        parsed = parse_tool_calls(text)
        assert parsed.calls == [] and parsed.errors == [], text
    # After <|python_tag|> the model has committed to a call: bad JSON there is an error.
    assert parse_tool_calls("<|python_tag|>{oops").errors


# ---------------------------------------------------------------------------------------------
# as_tool and ToolBox


def test_as_tool_reads_the_schema_from_hints_and_docstring():
    tool = as_tool(add, timeout=3.0)
    assert tool.name == "add" and tool.timeout == 3.0
    function = tool.schema["function"]
    assert tool.schema["type"] == "function"
    assert function["description"] == "Add two integers."
    assert function["parameters"]["properties"]["a"] == {"type": "integer", "description": "The first number."}
    assert function["parameters"]["required"] == ["a"]
    assert as_tool(tool) is tool


def test_as_tool_rejects_undocumented_functions_with_the_fix():
    with pytest.raises(MlxRftError, match="undocumented.*Google-style docstring"):
        as_tool(undocumented)
    with pytest.raises(MlxRftError, match="unhinted.*type hint"):
        as_tool(unhinted)
    with pytest.raises(MlxRftError, match="not a function"):
        as_tool(42)


def test_bound_methods_are_tools():
    class Store:
        def lookup(self, key: str) -> str:
            """Look a key up.

            Args:
                key: The key.
            """
            return {"a": "apple"}.get(key, "missing")

    box = ToolBox([Store().lookup])
    assert box.names == ["lookup"]
    assert box.call(ToolCall("lookup", {"key": "a"})).content == "apple"


def test_toolbox_calls_and_converts_results():
    box = ToolBox([add, listing])
    assert box.names == ["add", "listing"]
    assert [s["function"]["name"] for s in box.schemas()] == ["add", "listing"]
    result = box.call(ToolCall("add", {"a": 2, "b": 3}))
    assert (result.name, result.content, result.error) == ("add", "5", False)
    assert box.call(ToolCall("listing", {"n": 3})).content == "[0, 1, 2]"


def test_toolbox_unknown_tool_lists_the_names():
    result = ToolBox([add, divide]).call(ToolCall("mul", {"a": 1}))
    assert result.error
    assert result.content == "error: unknown tool 'mul'; available tools: add, divide"


def test_toolbox_checks_arguments_against_the_schema():
    box = ToolBox([add])
    missing = box.call(ToolCall("add", {"b": 1}))
    assert missing.error and "missing the required argument(s) 'a'" in missing.content
    unexpected = box.call(ToolCall("add", {"a": 1, "c": 2}))
    assert unexpected.error and "unexpected argument(s) 'c'" in unexpected.content
    assert "its arguments are: a, b" in unexpected.content


def test_toolbox_turns_exceptions_into_error_text():
    result = ToolBox([divide]).call(ToolCall("divide", {"a": 1, "b": 0}))
    assert result.error
    assert result.content == "error: ZeroDivisionError: division by zero"


def test_toolbox_timeout_returns_without_waiting_for_the_tool():
    box = ToolBox([nap], timeout=0.2)
    t0 = time.monotonic()
    result = box.call(ToolCall("nap", {"seconds": 2}))
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0
    assert result.error and result.content == "error: tool 'nap' timed out after 0.2 s"
    assert box.call(ToolCall("nap", {"seconds": 0})).content == "awake"


def test_toolbox_truncates_long_results():
    result = ToolBox([shout], max_chars=50).call(ToolCall("shout", {"text": "ab"}))
    assert not result.error
    assert result.content.startswith("ab" * 25 + "\n[... truncated")
    assert "2000 characters" in result.content


def test_toolbox_refuses_duplicate_names():
    with pytest.raises(MlxRftError, match="two tools are named 'add'"):
        ToolBox([add, as_tool(add)])


# ---------------------------------------------------------------------------------------------
# calculator


@pytest.mark.parametrize("expression, expected", [
    ("123 * 45 + 6", "5541"),
    ("2 + 3 * 4", "14"),
    ("(2 + 3) * 4", "20"),
    ("2 ** 3 ** 2", "512"),
    ("-3 - -4", "1"),
    ("7 / 2", "3.5"),
    ("8 / 2", "4"),
    ("17 // 5", "3"),
    ("17 % 5", "2"),
    ("2 ** -2", "0.25"),
    ("0.1 + 0.2", "0.30000000000000004"),
    ("347 * 128 =", "44416"),
    ("987654321 * 123456789", "121932631112635269"),
])
def test_calculator_values(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("x + 1", "names such as 'x'"),
    ("abs(-3)", "function calls"),
    ("(1).__class__", "attributes"),
    ("__import__('os').system('true')", "function calls"),
    ("9 ** 9 ** 9", "exponents are limited"),
    ("99999999999 ** 100", "too large"),
    (" * ".join(["10 ** 100"] * 11), "too large"),  # each factor is fine, the product is not
    ("1e308 * 10", "too large"),
    ("2 ^ 3", "write \\*\\*"),
    ("1 / 0", "division by zero"),
    ("'a' * 3", "not a number"),
    ("1 +", "not a valid expression"),
    ("", "empty"),
])
def test_calculator_refusals(expression, message):
    with pytest.raises(ValueError, match=message):
        calculator(expression)


def test_calculator_errors_read_plainly_through_the_toolbox():
    result = ToolBox([calculator]).call(ToolCall("calculator", {"expression": "foo * 2"}))
    assert result.error and result.content.startswith("error: names such as 'foo' are not allowed")


# ---------------------------------------------------------------------------------------------
# python (the project's code sandbox)


def test_python_tool_runs_code_in_the_sandbox():
    assert python("print(sum(range(10)))\nprint('done')") == "45\ndone"
    assert python("x = 1") == "(no output)"
    box = ToolBox([python])
    assert box["python"].timeout >= 10.0  # room for the sandbox's own 10 s limit to report first
    failed = box.call(ToolCall("python", {"code": "print('before')\n1 / 0"}))
    assert failed.error
    assert failed.content.startswith("error: ZeroDivisionError: division by zero")
    assert "before" in failed.content
    denied = box.call(ToolCall("python", {"code": "import socket\nsocket.create_connection(('127.0.0.1', 9))"}))
    assert denied.error


# ---------------------------------------------------------------------------------------------
# Environments


def test_default_environment_reset_and_bad_rows():
    env = Environment()
    assert env.reset({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert env.reset({"messages": messages}) == messages
    with pytest.raises(MlxRftError, match="episode row has no 'prompt' or 'messages'"):
        env.reset({"question": "q"})


def test_arithmetic_rows_are_deterministic_and_correct():
    rows = Arithmetic.make_rows(20, seed=3)
    assert rows == Arithmetic.make_rows(20, seed=3)
    assert rows != Arithmetic.make_rows(20, seed=4)
    assert len({r["expression"].count("+") for r in rows}) == 2  # products, and products plus a number
    for row in rows:
        assert row["answer"] == str(eval(row["expression"]))  # the expression is plain integer arithmetic
        numbers = row["expression"].replace("*", " ").replace("+", " ").split()
        assert all(100 <= int(t) <= 999 for t in numbers)
        assert all(t in row["question"] for t in numbers)  # the word problem states its numbers
        system, *demo, user = row["messages"]
        assert system["role"] == "system" and user == {
            "role": "user", "content": f"{row['question']} Use the calculator."}
        assert demo == Arithmetic.demonstration() and demo[1]["role"] == "assistant"
        assert "<tools>" in system["content"] and '"name": "calculator"' in system["content"]
        example = '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>'
        assert example in system["content"] and demo[1]["content"] == example
        assert "<answer>NUMBER</answer>" in system["content"]
    schema = system["content"].split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(schema)["function"]["name"] == "calculator"
    assert len(Arithmetic.make_rows(3, seed=0, digits=5)[0]["expression"].split()[0]) == 5


def test_arithmetic_step_runs_the_calculator_and_counts():
    env = Arithmetic()
    row = Arithmetic.make_rows(1, seed=0)[0]
    messages = env.reset(row)
    assert messages == row["messages"]
    messages.append({"role": "assistant", "content": (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "347 * 128"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1 +"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expression": 1 2}}</tool_call>'
    )})
    replies = env.step(messages)
    assert replies[0] == {"role": "tool", "name": "calculator", "content": "44416"}
    assert replies[1]["name"] == "calculator" and replies[1]["content"].startswith("error:")
    assert replies[2]["name"] == "error" and "not valid JSON" in replies[2]["content"]
    assert (env.tool_calls, env.tool_errors) == (3, 2)
    messages += replies + [{"role": "assistant", "content": "So the answer is <answer>44416</answer>."}]
    assert env.step(messages) is None
    assert (env.tool_calls, env.tool_errors) == (3, 2)
    # A fresh instance starts from zero: nothing leaks between episodes.
    assert (Arithmetic().tool_calls, Arithmetic().tool_errors) == (0, 0)


def test_arithmetic_reward():
    env = Arithmetic()
    opening = env.reset(Arithmetic.make_rows(1, seed=1)[0])

    def reward(*turns):
        return env.reward(opening + [{"role": "assistant", "content": t} for t in turns], answer="44416")

    assert reward("<answer>44,416</answer>") == 1.0
    assert reward("<answer> 44 416 </answer>") == 1.0
    assert reward("<answer>44417</answer>") == 0.0
    assert reward("The answer is 44416.") == 0.0
    assert reward("<answer>44416</answer>", "never mind, <answer>1</answer>") == 0.0
    assert env.reward(opening, answer="44416") == 0.0
    # As the trainer calls it: every column of the row by name, its "messages" included.
    row = Arithmetic.make_rows(1, seed=2)[0]
    solved = env.reset(row) + [{"role": "assistant", "content": f"<answer>{row['answer']}</answer>"}]
    assert env.reward(solved, **row) == 1.0


def test_guess_number_game_sequence_and_reward():
    env = GuessNumber()
    messages = env.reset({"secret": 37})
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "<guess>N</guess>" in messages[1]["content"] and "1 to 100" in messages[1]["content"]
    assert messages == GuessNumber().reset({"secret": 37})

    def play(text):
        messages.append({"role": "assistant", "content": text})
        replies = env.step(messages)
        if replies:
            messages.extend(replies)
        return replies

    assert play("The middle: <guess>50</guess>") == [{"role": "user", "content": "50 is too high; guess lower."}]
    assert play("<guess>25</guess>") == [{"role": "user", "content": "25 is too low; guess higher."}]
    format_reply = play("Maybe thirty-something?")
    assert format_reply[0]["role"] == "user" and "<guess>N</guess>" in format_reply[0]["content"]
    assert env.format_errors == 1
    assert play("<guess>37</guess>") is None
    assert env.solved and env.guesses == 4
    assert env.reward(messages) == pytest.approx(1.0 - 0.5 * 3 / 6)
    row = {"messages": GuessNumber.opening(), "secret": 37}  # as the trainer calls it: every column
    assert env.reward(messages, **row) == pytest.approx(1.0 - 0.5 * 3 / 6)


def test_guess_number_ends_after_max_guesses():
    env = GuessNumber()
    messages = env.reset({"secret": 9, "high": 10, "max_guesses": 3})
    replies = []
    for guess in (1, 2, 3):
        messages.append({"role": "assistant", "content": f"<guess>{guess}</guess>"})
        replies.append(env.step(messages))
        if replies[-1]:
            messages.extend(replies[-1])
    assert replies[0] and replies[1] and replies[2] is None
    assert not env.solved
    assert env.reward(messages) == 0.0
    # A first-turn win earns the full reward, a last-turn win half.
    first = GuessNumber()
    won = [{"role": "assistant", "content": "<guess>4</guess>"}]
    assert first.reward(first.reset({"secret": 4}) + won) == 1.0
    last = GuessNumber()
    opening = last.reset({"secret": 4, "max_guesses": 2})
    turns = [{"role": "assistant", "content": f"<guess>{n}</guess>"} for n in (3, 4)]
    assert last.reward(opening + turns) == 0.5
    with pytest.raises(MlxRftError, match="secret"):
        GuessNumber().reset({"secret": 0})


def test_guess_number_rows():
    rows = GuessNumber.make_rows(10, seed=5, high=20, max_guesses=5)
    assert rows == GuessNumber.make_rows(10, seed=5, high=20, max_guesses=5)
    assert all(1 <= r["secret"] <= 20 and r["max_guesses"] == 5 for r in rows)
    assert rows[0]["messages"] == GuessNumber().reset(rows[0])


# ---------------------------------------------------------------------------------------------
# Specs


def test_resolve_env_by_name_and_reference():
    assert resolve_env("arithmetic") is Arithmetic
    assert resolve_env("guess") is GuessNumber
    assert set(BUILTIN_ENVS) == {"arithmetic", "guess"}
    assert resolve_env("mlx_rft.episodes.envs:GuessNumber") is GuessNumber
    with pytest.raises(MlxRftError, match="unknown environment 'chess'.*arithmetic, guess.*module:Class"):
        resolve_env("chess")
    with pytest.raises(MlxRftError, match="no reset, step, reward method"):
        resolve_env("collections:OrderedDict")
    with pytest.raises(MlxRftError, match="not a class"):
        resolve_env("json:dumps")
    with pytest.raises(MlxRftError, match="cannot import module"):
        resolve_env("no_such_module_xyz:Env")


def test_resolve_tools_by_name_and_reference(tmp_path):
    tools = resolve_tools("calculator, python")
    assert [t.name for t in tools] == ["calculator", "python"] == list(BUILTIN_TOOLS)
    assert all(isinstance(t, Tool) for t in tools)
    assert [t.name for t in resolve_tools("mlx_rft.episodes.tools:calculator")] == ["calculator"]
    path = tmp_path / "my_tools.py"
    path.write_text(
        "def echo(text: str) -> str:\n"
        '    """Echo a text.\n\n    Args:\n        text: The text.\n    """\n'
        "    return text\n\n\n"
        "def bare(text: str) -> str:\n"
        "    return text\n"
    )
    (echo,) = resolve_tools([f"{path}:echo"])
    assert ToolBox([echo]).call(ToolCall("echo", {"text": "hi"})).content == "hi"
    with pytest.raises(MlxRftError, match="unknown tool 'search'.*calculator, python.*module:function"):
        resolve_tools("calculator,search")
    with pytest.raises(MlxRftError, match="has no attribute 'nope'"):
        resolve_tools("mlx_rft.episodes.tools:nope")
    with pytest.raises(MlxRftError, match="bare.*Google-style docstring"):
        resolve_tools(f"{path}:bare")
    with pytest.raises(MlxRftError, match="does not exist"):
        resolve_tools(f"{tmp_path}/missing.py:echo")
