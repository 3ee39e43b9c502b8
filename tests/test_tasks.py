"""Built-in reasoning-gym tasks, answer extraction and rewards, answer-column file tasks."""

import json
import socket

import pytest

from mlx_rft.data import PromptDataset
from mlx_rft.errors import MlxRftError
from mlx_rft.rewards import resolve_reward
from mlx_rft.data.tasks import (
    DEFAULT_EVAL_SIZE,
    DEFAULT_TASK,
    available_tasks,
    extract_answer,
    load_default_task,
    load_task,
)

SMALL = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def rewards(task, rows, completions):
    """Call every reward function the way the trainer does: columns as lists aligned with rows."""
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    prompts = [r["question"] for r in rows]
    return [f(prompts, completions, **cols) for f in task.reward_funcs]


def test_extract_answer():
    assert extract_answer("so <answer> 12 </answer>") == "12"
    assert extract_answer("<answer>1</answer> no wait <answer>2</answer>") == "2"  # the last one
    assert extract_answer("<answer>a\nb</answer>") == "a\nb"
    assert extract_answer("the answer is 7") is None
    assert extract_answer("<answer>7") is None  # unclosed tag does not count
    assert extract_answer("3 + 4 = 7, so -1,234.5 or 8.", fallback="number") == "8"
    assert extract_answer("-1,234.5 is it", fallback="number") == "-1,234.5"
    assert extract_answer("<answer>5</answer> then 9", fallback="number") == "5"  # tag wins
    assert extract_answer("no digits", fallback="number") is None
    assert extract_answer("work\n\n  final line \n", fallback="last_line") == "final line"
    with pytest.raises(MlxRftError, match="unknown answer fallback"):
        extract_answer("x", fallback="first_word")


def test_a_file_task_scores_as_the_built_in_accuracy_does(tmp_path):
    """One reward stack: `--task FILE` uses the built-in accuracy (tag extraction), so it scores
    a file exactly as `--reward-funcs "accuracy(extract=answer_tag)"` does."""
    path = tmp_path / "qa.jsonl"
    answers = ["1000", "-4", "paris", "Paris", "1/2", "3"]
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers)))
    completions = ["<answer>+1,000.0</answer>", "<answer>-4</answer>", "<answer> Paris </answer>",
                   "<answer>Lyon</answer>", "<answer>0.5</answer>", "3"]
    (task_acc,) = load_task(str(path)).reward_funcs
    builtin = resolve_reward("accuracy(extract=answer_tag)")
    got = task_acc(["p"] * 6, completions, answer=answers)
    assert got == builtin(["p"] * 6, completions, answer=answers)
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_reasoning_gym_task_offline_and_rewards(no_network):
    task = load_task("chain_sum", size=40, seed=0, eval_size=16, **SMALL)
    assert task.name == "chain_sum" and len(task.rows) == 40 and len(task.eval_rows) == 16
    assert task.reward_names == ["accuracy"] and task.reward_weights == [1.0]
    row = task.rows[0]
    entry = json.loads(row["entry"])
    a, b = map(int, entry["metadata"]["expression"].split(" ")[::2])
    op = entry["metadata"]["expression"].split(" ")[1]
    truth = a + b if op == "+" else a - b  # hand-derived answer
    assert row["answer"] == str(truth)
    assert row["messages"][-1] == {"role": "user", "content": entry["question"]}
    completions = [
        f"<answer>{truth}</answer>",  # right
        f"<answer>{truth + 1}</answer>",  # wrong
        f"The answer is {truth}.",  # right number but no tag: strict scoring gives 0
        "",  # nothing
    ]
    (acc,) = rewards(task, [row] * 4, completions)
    assert acc == [1.0, 0.0, 0.0, 0.0]
    # With the documented fallback the untagged number counts.
    lenient = load_task("chain_sum", size=40, seed=0, answer_fallback="number", **SMALL)
    (acc,) = rewards(lenient, [lenient.rows[0]] * 4, completions)
    assert acc == [1.0, 0.0, 1.0, 0.0]


def test_task_rows_are_deterministic_and_eval_is_held_out():
    t0 = load_task("chain_sum", size=200, seed=0, eval_size=32, **SMALL)
    t0b = load_task("chain_sum", size=200, seed=0, eval_size=32, **SMALL)
    t1 = load_task("chain_sum", size=200, seed=1, eval_size=32, **SMALL)
    assert [r["entry"] for r in t0.rows] == [r["entry"] for r in t0b.rows]
    assert [r["entry"] for r in t0.rows] != [r["entry"] for r in t1.rows]
    # the eval set is fixed: it does not move with the training seed
    assert [r["question"] for r in t0.eval_rows] == [r["question"] for r in t1.eval_rows]
    eval_q = [r["question"] for r in t0.eval_rows]
    assert len(set(eval_q)) == len(eval_q)  # distinct eval questions
    # few-shot examples are earlier chat turns, the same for every row, never a train/eval question
    shots = [m["content"] for m in t0.rows[0]["messages"][:-1] if m["role"] == "user"]
    assert len(shots) == 2
    assert all(r["messages"][:-1] == t0.rows[0]["messages"][:-1] for r in t0.rows + t0.eval_rows)
    for t in (t0, t1):
        train_q = {r["question"] for r in t.rows}
        assert not train_q & set(eval_q) and not train_q & set(shots) and not set(eval_q) & set(shots)
    direct = load_task("chain_sum", size=5, seed=0, prompt_format="direct", **SMALL)
    assert [m["role"] for m in direct.rows[0]["messages"]] == ["user"]


def test_other_reasoning_gym_tasks_score_their_answers():
    for name, options in [
        ("spell_backward", dict(min_word_len=3, max_word_len=5)),
        ("leg_counting", dict(min_animals=1, max_animals=2)),
        ("number_sorting", dict(min_numbers=3, max_numbers=3)),
    ]:
        task = load_task(name, size=3, seed=0, num_shots=1, format_weight=0.5, **options)
        assert task.reward_names == ["accuracy", "format"] and task.reward_weights == [1.0, 0.5]
        assert len(task.eval_rows) == DEFAULT_EVAL_SIZE  # every task gets a held-out set
        rows = task.rows[:2]
        acc, fmt = rewards(task, rows, [f"<answer>{r['answer']}</answer>" for r in rows])
        assert acc == [1.0, 1.0] and fmt == [1.0, 1.0]
        acc, fmt = rewards(task, rows, ["<answer>zzzz</answer>", "no tag"])
        assert acc == [0.0, 0.0] and fmt == [1.0, 0.0]


def test_unknown_task_and_options():
    assert "chain_sum" in available_tasks() and len(available_tasks()) > 50
    with pytest.raises(MlxRftError, match=r"unknown task 'chain_summ'; did you mean chain_sum.*leg_counting"):
        load_task("chain_summ")
    with pytest.raises(MlxRftError, match="has no option max_termz; its options are .*max_terms"):
        load_task("chain_sum", size=2, max_termz=3)
    with pytest.raises(MlxRftError, match="invalid options"):
        load_task("chain_sum", size=2, min_terms=5, max_terms=2)
    with pytest.raises(MlxRftError, match="prompt_format"):
        load_task("chain_sum", size=2, prompt_format="cot")
    # two one-digit terms and +/- make only 10 * 10 * 2 = 200 distinct questions
    with pytest.raises(MlxRftError, match=r"produced only 1\d\d of 250 distinct questions"):
        load_task("chain_sum", size=2, eval_size=250, num_shots=0, **SMALL)


def test_task_rows_render_and_score_through_prompt_dataset(tiny_qwen3):
    """End to end: task rows -> PromptDataset (chat template) -> reward on the example columns."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_qwen3)
    task = load_task("chain_sum", size=6, seed=0, **SMALL)
    ds = PromptDataset.from_rows(task.rows, tok, system_prompt=task.system_prompt)
    ex = ds[0]
    assert ex.prompt.startswith("<|im_start|>system\n" + task.system_prompt)
    assert ex.prompt.count("<|im_start|>assistant\n<answer>") == 2  # the two shots
    assert ex.prompt.endswith(task.rows[0]["question"] + "<|im_end|>\n<|im_start|>assistant\n")
    cols = {k: [e.columns[k] for e in ds] for k in ex.columns}
    (acc,) = [f([e.prompt for e in ds], [f"<answer>{a}</answer>" for a in cols["answer"]], **cols)
              for f in task.reward_funcs]
    assert acc == [1.0] * 6


def test_file_task_with_answer_column(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": "2+2?", "answer": "4"},
        {"messages": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris"},
        {"prompt": "open question", "answer": None},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(path))
    assert task.name == "qa" and len(task.rows) == 3 and task.eval_rows == []
    assert task.reward_funcs[0].__name__ == "accuracy"
    (acc,) = [f(["p"] * 3, ["<answer>4.0</answer>", "<answer> paris</answer>", "<answer>x</answer>"],
                answer=[r["answer"] for r in rows]) for f in task.reward_funcs]
    assert acc == [1.0, 1.0, None]
    path.write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    with pytest.raises(MlxRftError, match=r"qa\.jsonl:1: row has no 'answer' column"):
        load_task(str(path))
    with pytest.raises(MlxRftError, match=r"options \['min_terms', 'num_shots'\] apply to reasoning-gym"):
        load_task(str(path), min_terms=2, num_shots=1)


def test_default_task_preset():
    assert DEFAULT_TASK.name in available_tasks()
    task = load_default_task(size=64)
    assert task.name == DEFAULT_TASK.name == task.info["preset"]
    assert task.info["dataset"] == DEFAULT_TASK.dataset
    assert len(task.rows) == 64 and len(task.eval_rows) == DEFAULT_TASK.eval_size == DEFAULT_EVAL_SIZE
    assert task.max_new_tokens <= 64
    # same eval set whatever the training seed, and as `mlx-rft eval` loads it (by name only)
    again = load_task(DEFAULT_TASK.name, size=8, seed=7)
    assert [r["entry"] for r in again.eval_rows] == [r["entry"] for r in task.eval_rows]
    # the preset's options are defaults: explicit options override them
    plain = load_task(DEFAULT_TASK.name, size=4, eval_size=2, prompt_format="direct")
    assert [m["role"] for m in plain.rows[0]["messages"]] == ["user"] and len(plain.eval_rows) == 2


def test_worked_shot_format():
    task = load_task("chain_sum", size=2, eval_size=0, num_shots=1,
                     shot_format="{metadata[expression]} = {answer}\n<answer>{answer}</answer>", **SMALL)
    question, reply = task.rows[0]["messages"][:2]
    expression = question["content"].split(": ")[1].rstrip(" =")
    a, op, b = expression.split(" ")
    truth = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert reply == {"role": "assistant", "content": f"{expression} = {truth}\n<answer>{truth}</answer>"}
    with pytest.raises(MlxRftError, match=r"shot_format .* does not fit.*expression"):
        load_task("chain_sum", size=2, eval_size=0, shot_format="{metadata[steps]}", **SMALL)


def test_unreadable_answer_scores_zero():
    """prime_factorization's own scorer raises ValueError on "[["; that is a wrong answer, not a crash."""
    task = load_task("prime_factorization", size=1, eval_size=0, num_shots=0)
    row = task.rows[0]
    with pytest.raises(ValueError):
        task.reward_funcs[0].dataset.score_answer("[[", json.loads(row["entry"]))
    (acc,) = rewards(task, [row] * 2, [f"<answer>{row['answer']}</answer>", "<answer>[[</answer>"])
    assert acc == [1.0, 0.0]


def test_partial_credit_switch():
    """reasoning-gym's chain_sum gives partial credit when the answer's digits appear in a wrong one."""
    lenient = load_task("chain_sum", size=30, eval_size=0, **SMALL)
    strict = load_task("chain_sum", size=30, eval_size=0, partial_credit=False, **SMALL)
    row = next(r for r in lenient.rows if int(r["answer"]) > 0)
    wrong = "1" + row["answer"]  # e.g. 17 for 7: contains the right digits, but is wrong
    completions = [f"<answer>{wrong}</answer>", f"<answer>{row['answer']}</answer>"]
    (partial,) = rewards(lenient, [row] * 2, completions)
    (exact,) = rewards(strict, [row] * 2, completions)
    assert partial == [len(row["answer"]) / len(wrong), 1.0]
    assert exact == [0.0, 1.0]
    assert load_default_task(size=1).info["partial_credit"] is False
