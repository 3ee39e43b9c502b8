"""Hugging Face datasets as input: in-memory Dataset / DatasetDict, and save_to_disk folders.

Every dataset is built here with `Dataset.from_list` (no hub). The rows must come out exactly as the
same rows do from a JSONL file: same prompts, same columns, same errors, same skip counts.
"""

import json
import subprocess
import sys

import pytest

datasets = pytest.importorskip("datasets")

from mlx_rft.config import GRPOConfig, build_config  # noqa: E402
from mlx_rft.data import load_prompt_dataset  # noqa: E402
from mlx_rft.errors import MlxRftError  # noqa: E402
from mlx_rft.train.run_data import build_run_data  # noqa: E402

CHAT = [{"role": "user", "content": "Compute 12 * 7."}]
# Arrow gives every row every column, so plain-prompt rows hold messages=None (and vice versa).
ROWS = [{"prompt": f"What is {i} + 3?", "messages": None, "answer": str(i + 3)} for i in range(6)]
ROWS.append({"prompt": None, "messages": CHAT, "answer": "84"})
TEST_ROWS = [{"prompt": f"Test {i}?", "messages": None, "answer": str(i)} for i in range(3)]
NO_PROMPT_ERROR = "row has no 'prompt' or 'messages' column (columns: answer, question)"


@pytest.fixture(scope="module", autouse=True)
def quiet():
    datasets.disable_progress_bars()  # save_to_disk's bars would flood the test log
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_qwen3)


def reward(prompts, completions, **kw):
    return [0.0] * len(completions)


def cfg_for(tmp_path, **kw):
    return GRPOConfig(output_dir=str(tmp_path / "run"), prompts_per_step=2, eval_size=2, **kw).validate()


def run_data(cfg, tok, train=None, eval_=None):
    return build_run_data(cfg, tok, train, eval_, reward_specs=[reward])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts(ds):
    return [(e.prompt, e.prompt_ids, e.columns["answer"]) for e in ds]


def as_dict(*, train=ROWS, **splits):
    parts = {"train": train, **splits} if train else splits
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()})


# ---------------------------------------------------------------------------------------------
# In memory (the Python API)


def test_a_dataset_renders_exactly_like_the_same_jsonl(tmp_path, tok):
    from_file = load_prompt_dataset(write_jsonl(tmp_path / "d.jsonl", ROWS), tok)
    data = run_data(cfg_for(tmp_path), tok, datasets.Dataset.from_list(ROWS), TEST_ROWS)
    assert prompts(data.train) == prompts(from_file)
    assert data.train[6].prompt.endswith("<|im_start|>assistant\n")  # the chat row went through the template
    assert [e.columns["answer"] for e in data.eval] == ["0", "1", "2"]


def test_a_numpy_formatted_dataset_still_gives_plain_rows(tmp_path, tok):
    """`set_format("numpy")` makes rows arrays; a chat row would then fail the list check."""
    ds = datasets.Dataset.from_list(ROWS).with_format("numpy")
    data = run_data(cfg_for(tmp_path), tok, ds, TEST_ROWS)
    assert len(data.train) == len(ROWS)
    assert all(type(e.columns["answer"]) is str for e in data.train)


def test_a_dataset_dict_gives_train_and_its_test_split_as_eval(tmp_path, tok):
    cfg = cfg_for(tmp_path)
    data = run_data(cfg, tok, as_dict(test=TEST_ROWS))
    assert [e.columns["answer"] for e in data.train] == [r["answer"] for r in ROWS]  # nothing split off
    assert [e.columns["answer"] for e in data.eval] == ["0", "1", "2"]
    # "validation" when there is no "test"; a given eval_dataset wins over either.
    data = run_data(cfg, tok, as_dict(validation=TEST_ROWS[:2]))
    assert [e.columns["answer"] for e in data.eval] == ["0", "1"]
    data = run_data(cfg, tok, as_dict(test=TEST_ROWS), datasets.Dataset.from_list(TEST_ROWS[2:]))
    assert [e.columns["answer"] for e in data.eval] == ["2"]
    # Without a held-out split, eval is split off the train split as for any rows.
    data = run_data(cfg, tok, as_dict())
    assert len(data.train) + len(data.eval) == len(ROWS) and len(data.eval) == 2


def test_a_dataset_dict_as_eval_dataset_gives_its_test_split(tmp_path, tok):
    data = run_data(cfg_for(tmp_path), tok, ROWS, as_dict(test=TEST_ROWS[:1]))
    assert [e.columns["answer"] for e in data.eval] == ["0"]
    with pytest.raises(MlxRftError) as e:
        run_data(cfg_for(tmp_path), tok, ROWS, as_dict())
    assert str(e.value) == (
        "eval_dataset is a DatasetDict with splits ['train'] but no 'test' or 'validation' split; "
        "name the held-out split 'test', or pass that Dataset itself"
    )


def test_a_dataset_dict_without_a_train_split_names_its_splits(tmp_path, tok):
    with pytest.raises(MlxRftError) as e:
        run_data(cfg_for(tmp_path), tok, as_dict(train=None, test=TEST_ROWS, extra=TEST_ROWS))
    assert str(e.value) == (
        "train_dataset is a DatasetDict with splits ['test', 'extra'] but no 'train' split; name the "
        "training split 'train' (DatasetDict({'train': ...})), or pass that Dataset itself"
    )


def test_a_bad_column_gives_the_jsonl_error(tmp_path, tok):
    rows = [{"question": "2 + 3?", "answer": "5"}]
    with pytest.raises(MlxRftError) as from_file:
        load_prompt_dataset(write_jsonl(tmp_path / "bad.jsonl", rows), tok)
    with pytest.raises(MlxRftError) as from_dataset:
        run_data(cfg_for(tmp_path), tok, datasets.Dataset.from_list(rows), TEST_ROWS)
    where = f"{tmp_path / 'bad.jsonl'}:1"
    fix = "fix or remove the row, or skip malformed rows with on_bad_row='skip'"
    assert str(from_file.value) == f"{where}: {NO_PROMPT_ERROR}; {fix}"
    assert str(from_dataset.value) == f"<rows>[0]: {NO_PROMPT_ERROR}; {fix}"
    with pytest.raises(MlxRftError, match=r"^train_dataset\['train'\]\[0\]: row has no 'prompt'"):
        run_data(cfg_for(tmp_path), tok, as_dict(train=rows, test=TEST_ROWS))


def test_skipped_rows_are_counted_as_for_jsonl(tmp_path, tok):
    bad = [
        {"prompt": None, "messages": None, "answer": "x"},  # neither column
        {"prompt": "", "messages": None, "answer": "y"},  # empty prompt
        {"prompt": None, "messages": [{"role": "robot", "content": "hi"}], "answer": "z"},  # bad role
    ]
    rows = ROWS[:3] + bad + ROWS[3:]
    cfg = cfg_for(tmp_path, on_bad_row="skip")
    from_file = load_prompt_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, on_bad_row="skip")
    data = run_data(cfg, tok, datasets.Dataset.from_list(rows), TEST_ROWS)
    assert from_file.skipped_bad == data.train.skipped_bad == 3
    assert data.train.skipped_where == ["<rows>[3]", "<rows>[4]", "<rows>[5]"]
    assert prompts(data.train) == prompts(from_file)


def test_the_trainer_takes_a_dataset_dict(tmp_path, tok, tiny_qwen3):
    from mlx_rft import GRPOTrainer

    cfg = GRPOConfig(model=str(tiny_qwen3), output_dir=str(tmp_path), prompts_per_step=2)
    trainer = GRPOTrainer(cfg, reward_funcs=[reward], train_dataset=as_dict(test=TEST_ROWS), tokenizer=tok)
    trainer._setup_data()
    assert len(trainer.train_data) == len(ROWS) and len(trainer.eval_data) == len(TEST_ROWS)


# ---------------------------------------------------------------------------------------------
# save_to_disk folders (the CLI: --train-file / --eval-file, and `mlx-rft eval --data`)


def cli_cfg(tmp_path, **fields):
    """The config as the CLI builds it (flags over defaults), validated."""
    return build_config({"output_dir": str(tmp_path / "run"), "prompts_per_step": 2, "eval_size": 2,
                         "on_bad_row": "error", **fields}).validate()


def test_a_saved_dataset_folder_is_a_train_file(tmp_path, tok):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    cfg = cli_cfg(tmp_path, train_file=str(folder))  # a folder passes config validation
    data = run_data(cfg, tok)
    from_file = load_prompt_dataset(write_jsonl(tmp_path / "d.jsonl", ROWS), tok)
    assert sorted(prompts(data.train) + prompts(data.eval)) == sorted(prompts(from_file))
    assert len(data.eval) == 2  # split off: a single Dataset has no held-out split
    # As --eval-file too.
    data = run_data(cli_cfg(tmp_path, train_file=str(tmp_path / "d.jsonl"), eval_file=str(folder)), tok)
    assert prompts(data.train) == prompts(from_file) == prompts(data.eval)


def test_a_saved_dataset_dict_gives_train_and_test(tmp_path, tok):
    folder = tmp_path / "dd"
    as_dict(test=TEST_ROWS).save_to_disk(str(folder))
    data = run_data(cli_cfg(tmp_path, train_file=str(folder)), tok)
    assert [e.columns["answer"] for e in data.train] == [r["answer"] for r in ROWS]
    assert [e.columns["answer"] for e in data.eval] == ["0", "1", "2"]
    # An eval_file wins; a DatasetDict as eval_file gives its test split.
    other = tmp_path / "other"
    as_dict(test=TEST_ROWS[:1]).save_to_disk(str(other))
    data = run_data(cli_cfg(tmp_path, train_file=str(folder), eval_file=str(other)), tok)
    assert [e.columns["answer"] for e in data.eval] == ["0"]
    # One split's own folder is a plain saved Dataset.
    data = run_data(cli_cfg(tmp_path, train_file=str(folder / "test"), eval_file=str(other)), tok)
    assert [e.columns["answer"] for e in data.train] == ["0", "1", "2"]


def test_saved_rows_are_located_in_their_split_folder(tmp_path, tok):
    folder = tmp_path / "dd"
    empty = {"prompt": "", "messages": None, "answer": "1"}
    as_dict(train=ROWS + [empty], test=TEST_ROWS).save_to_disk(str(folder))
    with pytest.raises(MlxRftError) as e:
        run_data(cli_cfg(tmp_path, train_file=str(folder)), tok)
    assert str(e.value) == (
        f"{folder / 'train'}[7]: row 'prompt' must be a non-empty string; fix or remove the row, or "
        "skip malformed rows with on_bad_row='skip'"
    )
    data = run_data(cli_cfg(tmp_path, train_file=str(folder), on_bad_row="skip"), tok)
    assert data.train.skipped_bad == 1 and data.train.skipped_where == [f"{folder / 'train'}[7]"]


def test_a_saved_dataset_dict_without_the_split_names_its_splits(tmp_path, tok):
    folder = tmp_path / "dd"
    as_dict(train=None, test=TEST_ROWS).save_to_disk(str(folder))
    with pytest.raises(MlxRftError) as e:
        run_data(cli_cfg(tmp_path, train_file=str(folder)), tok)
    assert str(e.value) == (
        f"{folder} is a DatasetDict with splits ['test'] but no 'train' split; point at one split's "
        f"folder instead (e.g. {folder / 'test'})"
    )
    as_dict().save_to_disk(str(tmp_path / "only_train"))
    with pytest.raises(MlxRftError, match=r"splits \['train'\] but no 'test' or 'validation' split"):
        load_prompt_dataset(tmp_path / "only_train", tok, splits=("test", "validation"))


def test_a_folder_that_is_not_a_saved_dataset(tmp_path, tok):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(MlxRftError) as e:
        run_data(cli_cfg(tmp_path, train_file=str(folder)), tok)
    assert str(e.value) == (
        f"data file {str(folder)!r} is a directory but not a saved Hugging Face dataset (it has no "
        "dataset_dict.json, or no dataset_info.json and state.json); pass a .jsonl/.json/.csv/.parquet "
        "file or a folder written by Dataset.save_to_disk"
    )
    # Marker files around damaged data: still one line, naming the fix.
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text("not json")
    with pytest.raises(MlxRftError) as e:
        load_prompt_dataset(folder, tok)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{folder} is not a readable saved dataset (")
    assert str(e.value).endswith("); re-save it with save_to_disk")


def test_eval_command_reads_the_test_split_of_a_saved_dataset_dict(tmp_path, tiny_qwen3, capsys):
    from mlx_rft import evaluate

    folder = tmp_path / "dd"
    as_dict(test=TEST_ROWS[:2]).save_to_disk(str(folder))
    evaluate.main(["--model", str(tiny_qwen3), "--data", str(folder), "--reward-funcs", "accuracy",
                   "--limit", "10", "--max-new-tokens", "1"])
    assert json.loads(capsys.readouterr().out)["prompts"] == 2  # the test split, not the 7 train rows


def test_plain_files_do_not_import_datasets(tmp_path):
    """datasets takes about a second to import; only a saved folder may pay for it."""
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    code = (
        "import sys; from mlx_rft.data import read_raw_rows; import mlx_rft.train.run_data; "
        f"rows = list(read_raw_rows({str(path)!r})); assert 'datasets' not in sys.modules; print(len(rows))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr[-2000:]
