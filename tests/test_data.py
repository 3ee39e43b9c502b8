"""Prompt data: file formats, validation errors, chat rendering, sampling, splitting."""

import csv
import json
import shutil

import numpy as np
import pytest

from mlx_rft.data import (
    PromptDataset,
    PromptSampler,
    load_prompt_dataset,
    render_prompt,
    train_eval_split,
)
from mlx_rft.errors import MlxRftError
from mlx_rft.types import PromptExample


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_qwen3)


def chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, tok.encode(text, add_special_tokens=False)


ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "5", "level": 1},
    {"messages": [{"role": "user", "content": "Compute 12 * 7."}], "answer": "84", "level": 2},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_rows(ds, tok, system=None):
    assert len(ds) == 2
    sys_msgs = [{"role": "system", "content": system}] if system else []
    text0, ids0 = chat_ids(tok, sys_msgs + [{"role": "user", "content": "What is 2 + 3?"}])
    text1, ids1 = chat_ids(tok, sys_msgs + [{"role": "user", "content": "Compute 12 * 7."}])
    assert isinstance(ds[0], PromptExample)
    assert (ds[0].prompt, ds[0].prompt_ids) == (text0, ids0)
    assert (ds[1].prompt, ds[1].prompt_ids) == (text1, ids1)
    assert ds[0].columns["answer"] == "5" and ds[1].columns["answer"] == "84"
    assert int(ds[0].columns["level"]) == 1 and int(ds[1].columns["level"]) == 2
    assert ds[0].prompt.endswith("<|im_start|>assistant\n")


def test_jsonl_prompt_and_messages_with_extra_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are not rows
    check_rows(load_prompt_dataset(path, tok), tok)


def test_json_list_and_data_object(tmp_path, tok):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS, "version": 1}))
    check_rows(load_prompt_dataset(tmp_path / "a.json", tok), tok)
    check_rows(load_prompt_dataset(tmp_path / "b.json", tok), tok)


def test_csv_mixed_prompt_and_messages_cells(tmp_path, tok):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "messages", "answer", "level"])
        w.writerow(["What is 2 + 3?", "", "5", "1"])  # empty cell = no messages
        w.writerow(["", json.dumps(ROWS[1]["messages"]), "84", "2"])
        w.writerow(["Hi", json.dumps(ROWS[1]["messages"]), "0", "3"])
    with pytest.raises(MlxRftError, match=r"d\.csv:4: row has both 'prompt' and 'messages'"):
        load_prompt_dataset(path, tok)
    ds = load_prompt_dataset(path, tok, on_bad_row="skip")
    assert ds.skipped_bad == 1
    check_rows(PromptDataset(ds.examples), tok)
    tsv = tmp_path / "d.tsv"
    tsv.write_text("prompt\tanswer\tlevel\nWhat is 2 + 3?\t5\t1\nCompute 12 * 7.\t84\t2\n")
    check_rows(load_prompt_dataset(tsv, tok), tok)


def test_csv_messages_column(tmp_path, tok):
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages", "answer", "level"])
        w.writerow([json.dumps([{"role": "user", "content": "What is 2 + 3?"}]), "5", "1"])
        w.writerow([json.dumps(ROWS[1]["messages"]), "84", "2"])
    check_rows(load_prompt_dataset(path, tok), tok)


def test_parquet(tmp_path, tok):
    import pyarrow as pa  # a required dependency: a missing one must fail, not skip
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5", "level": 1},
        {"messages": ROWS[1]["messages"], "answer": "84", "level": 2},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    check_rows(load_prompt_dataset(tmp_path / "d.parquet", tok), tok)
    bad = rows + [{"messages": None, "answer": "1", "level": 3}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(MlxRftError, match=r"bad\.parquet\[2\]: row has no 'prompt' or 'messages'"):
        load_prompt_dataset(tmp_path / "bad.parquet", tok)


def test_system_prompt_prepended_unless_present(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    check_rows(load_prompt_dataset(path, tok, system_prompt="Be brief."), tok, system="Be brief.")
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]
    ds = PromptDataset.from_rows([{"messages": own}], tok, system_prompt="Be brief.")
    assert ds[0].prompt_ids == chat_ids(tok, own)[1]
    assert "Be brief." not in ds[0].prompt


MALFORMED_JSONL = [
    json.dumps(ROWS[0]),
    "{not json",
    json.dumps(ROWS[1]),
    "",
    json.dumps({"question": "no prompt here", "answer": "1"}),
    json.dumps({"prompt": "", "answer": "1"}),
    json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    json.dumps(["a", "list"]),
]


def test_malformed_jsonl_error_names_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(MALFORMED_JSONL) + "\n")
    with pytest.raises(MlxRftError, match=r"bad\.jsonl:2: row invalid JSON") as e:
        load_prompt_dataset(path, tok)
    assert "on_bad_row='skip'" in str(e.value)  # names the fix
    path.write_text("\n".join(MALFORMED_JSONL[:1] + MALFORMED_JSONL[2:]) + "\n")
    # line 4 is now the row without a prompt (line 3 is blank)
    no_prompt = r"bad\.jsonl:4: row has no 'prompt' or 'messages' column \(columns: answer, question\)"
    with pytest.raises(MlxRftError, match=no_prompt):
        load_prompt_dataset(path, tok)


def test_malformed_rows_skipped_and_counted(tmp_path, tok, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(MALFORMED_JSONL) + "\n")
    ds = load_prompt_dataset(path, tok, on_bad_row="skip")
    assert len(ds) == 2 and ds.skipped_bad == 5
    assert [w.rsplit(":", 1)[1] for w in ds.skipped_where] == ["2", "5", "6", "7", "8"]
    assert [e.columns["answer"] for e in ds] == ["5", "84"]
    assert "skipped 5 malformed" in caplog.text


def test_malformed_json_and_csv_locations(tmp_path, tok):
    (tmp_path / "bad.json").write_text(json.dumps([ROWS[0], ROWS[1], {"prompt": 3}]))
    with pytest.raises(MlxRftError, match=r"bad\.json\[2\]: row 'prompt' must be a non-empty string"):
        load_prompt_dataset(tmp_path / "bad.json", tok)
    (tmp_path / "whole.json").write_text("[{]")
    with pytest.raises(MlxRftError, match=r"whole\.json is not valid JSON"):
        load_prompt_dataset(tmp_path / "whole.json", tok, on_bad_row="skip")
    # A quoted field spanning two lines: later line numbers must still be physical lines.
    (tmp_path / "bad.csv").write_text(
        'prompt,answer\n"line one\nline two",1\nok,2\ntoo,many,fields\n'
    )
    with pytest.raises(MlxRftError, match=r"bad\.csv:5: row has 3 fields but the header has 2"):
        load_prompt_dataset(tmp_path / "bad.csv", tok)
    ds = load_prompt_dataset(tmp_path / "bad.csv", tok, on_bad_row="skip")
    assert len(ds) == 2 and ds.skipped_bad == 1
    assert "line one\nline two" in ds[0].prompt


def test_bad_arguments_and_files(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(MlxRftError, match="does not exist"):
        load_prompt_dataset(tmp_path / "missing.jsonl", tok)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(MlxRftError, match="suffix '.txt'"):
        load_prompt_dataset(tmp_path / "d.txt", tok)
    with pytest.raises(MlxRftError, match="on_bad_row"):
        load_prompt_dataset(path, tok, on_bad_row="ignore")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MlxRftError, match="no usable rows"):
        load_prompt_dataset(tmp_path / "empty.jsonl", tok)


def test_max_prompt_length(tmp_path, tok):
    rows = [{"prompt": "hi", "answer": "a"}, {"prompt": "word " * 40, "answer": "b"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    n_short = len(chat_ids(tok, [{"role": "user", "content": "hi"}])[1])
    full = chat_ids(tok, [{"role": "user", "content": "word " * 40}])[1]
    limit = n_short + 5
    assert len(full) > limit
    too_long = rf"long\.jsonl:2: the prompt is {len(full)} tokens, over max_prompt_length={limit}"
    with pytest.raises(MlxRftError, match=too_long):
        load_prompt_dataset(path, tok, max_prompt_length=limit)
    ds = load_prompt_dataset(path, tok, max_prompt_length=limit, on_long_prompt="skip")
    assert len(ds) == 1 and ds.skipped_long == 1 and ds[0].columns["answer"] == "a"
    ds = load_prompt_dataset(path, tok, max_prompt_length=limit, on_long_prompt="truncate")
    assert ds.truncated == 1 and ds[1].prompt_ids == full[-limit:]
    assert ds[1].prompt.endswith("<|im_start|>assistant\n")  # the generation prompt survives


def test_no_double_bos(tmp_path, tiny_qwen3):
    """A template that writes BOS itself plus a tokenizer that adds BOS: still exactly one BOS."""
    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer, processors

    path = tmp_path / "bos_model"
    shutil.copytree(tiny_qwen3, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["bos_token"] = "<|endoftext|>"
    cfg["add_bos_token"] = True
    cfg["chat_template"] = "{{ bos_token }}" + cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = t.token_to_id("<|endoftext|>")
    t.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    t.save(str(path / "tokenizer.json"))
    tok = load_tokenizer(path)
    assert tok.encode("hi")[0] == bos  # the tokenizer really adds a BOS on its own

    text, ids = render_prompt(tok, [{"role": "user", "content": "hi"}], system_prompt="S")
    assert text.startswith("<|endoftext|><|im_start|>system\nS")
    assert ids[0] == bos and ids.count(bos) == 1
    # The naive path (encode with special tokens) is the bug this guards against.
    assert tok.encode(text)[:2] == [bos, bos]


def test_without_chat_template(tmp_path, tiny_qwen3):
    from mlx_lm.utils import load_tokenizer

    path = tmp_path / "plain_model"
    shutil.copytree(tiny_qwen3, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(path)
    ds = PromptDataset.from_rows([{"prompt": "What is 2 + 3?"}], tok, system_prompt="Be brief.")
    assert ds[0].prompt == "Be brief.\n\nWhat is 2 + 3?"
    assert ds[0].prompt_ids == tok.encode("Be brief.\n\nWhat is 2 + 3?")
    with pytest.raises(MlxRftError, match="need a chat template"):
        PromptDataset.from_rows([ROWS[1]], tok)


# ---------------------------------------------------------------------------------------------
# Sampler


def take(sampler, steps):
    return [next(sampler) for _ in range(steps)]


def test_sampler_deterministic_and_epochs_are_permutations():
    a = take(PromptSampler(10, 4, seed=3), 10)
    b = take(PromptSampler(10, 4, seed=3), 10)
    c = take(PromptSampler(10, 4, seed=4), 10)
    assert a == b and a != c
    flat = [i for batch in a for i in batch]  # 40 indices = 4 full epochs
    assert all(len(batch) == 4 for batch in a)
    for e in range(4):
        epoch = flat[10 * e : 10 * (e + 1)]
        assert sorted(epoch) == list(range(10))
        assert epoch == np.random.default_rng([3, e]).permutation(10).tolist()
    assert flat[:10] != flat[10:20]  # each epoch is reshuffled


def test_sampler_epoch_rollover_inside_a_batch():
    s = PromptSampler(5, 4, seed=0)
    first, second = next(s), next(s)
    p0 = np.random.default_rng([0, 0]).permutation(5).tolist()
    p1 = np.random.default_rng([0, 1]).permutation(5).tolist()
    assert first == p0[:4]
    assert second == p0[4:] + p1[:3]  # finishes epoch 0, continues into epoch 1
    assert (s.epoch, s.position, s.steps) == (1, 3, 2)


def test_sampler_resume_is_exact():
    ref = PromptSampler(7, 3, seed=11)
    expected = take(ref, 9)
    s = PromptSampler(7, 3, seed=11)
    take(s, 4)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(7, 3, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 5) == expected[4:]
    assert resumed.steps == 9
    with pytest.raises(MlxRftError, match="saved for 7 prompts with seed 11"):
        PromptSampler(8, 3, seed=11).load_state_dict(state)


def test_sampler_rank_shards_are_disjoint_and_cover_the_global_batch():
    world = 4
    single = take(PromptSampler(50, 8, seed=5), 12)
    ranks = [take(PromptSampler(50, 8, seed=5, rank=r, world_size=world), 12) for r in range(world)]
    for step in range(12):
        shards = [ranks[r][step] for r in range(world)]
        assert all(len(s) == 2 for s in shards)
        union = [i for s in shards for i in s]
        assert len(set(union)) == 8  # no two ranks share a prompt
        assert union == single[step]  # together they are the global batch
    with pytest.raises(MlxRftError, match="does not split evenly over 3 ranks"):
        PromptSampler(50, 8, rank=0, world_size=3)
    with pytest.raises(MlxRftError, match="outside world_size"):
        PromptSampler(50, 8, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# Held-out split


def test_train_eval_split(tok):
    rows = [{"prompt": f"question {i}", "answer": str(i)} for i in range(20)]
    rows += [{"prompt": "question 3", "answer": "dup"}]  # same prompt as row 3
    ds = PromptDataset.from_rows(rows, tok)
    for kwargs in (dict(eval_size=5), dict(eval_fraction=0.25)):
        train, ev = train_eval_split(ds, seed=1, **kwargs)
        assert isinstance(train, PromptDataset) and len(train) + len(ev) == len(ds)
        assert len(ev) == 5
        assert not {e.prompt for e in train} & {e.prompt for e in ev}
    again = train_eval_split(ds, eval_size=5, seed=1)[1]
    other = train_eval_split(ds, eval_size=5, seed=2)[1]
    assert [e.prompt for e in again] == [e.prompt for e in ev]
    assert [e.prompt for e in other] != [e.prompt for e in ev]
    # plain lists of rows split the same way
    train_rows, eval_rows = train_eval_split(rows, eval_size=4, seed=0)
    assert len(eval_rows) == 4 and not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    with pytest.raises(MlxRftError, match="exactly one of eval_size or eval_fraction"):
        train_eval_split(rows)
    with pytest.raises(MlxRftError, match="between 1 and 20"):
        train_eval_split(rows, eval_size=21)
