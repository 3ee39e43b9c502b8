"""Runs that must never lose work, hang, or succeed on garbage: run folders, resume checks,
signals, unscorable rewards, reward time limits, option checks, bad files. Tiny models only."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_rft import GRPOConfig, GRPOTrainer
from mlx_rft.config import build_config
from mlx_rft.errors import MlxRftError
from mlx_rft.rewards import RewardSet

ROWS = [{"prompt": f"Question {i}: say something", "answer": str(i % 7)} for i in range(40)]


def digits(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def cfg_for(model, out, **kw):
    base = dict(model=str(model), max_new_tokens=6, output_dir=str(out), eval_size=4, save_every=1,
                num_steps=2, group_size=2, prompts_per_step=2, seed=1, lora_rank=4, learning_rate=1e-2)
    base.update(kw)
    return GRPOConfig(**base)


def train(model, out, reward=digits, rows=ROWS, **kw):
    return GRPOTrainer(cfg_for(model, out, **kw), reward_funcs=[reward], train_dataset=rows).train()


def snapshot(folder):
    """Every file under folder -> its bytes (to prove nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_rft", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), r.stderr[-2000:]
    assert not any("Traceback" in x for x in lines), r.stderr[-2000:]
    for w in words:
        assert w in lines[-1], (w, lines[-1])


# ------------------------------------------------------------------ 1. run folders


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(tiny_qwen3, tmp_path):
    train(tiny_qwen3, tmp_path, num_steps=3, keep_last=2)
    before = snapshot(tmp_path)
    with pytest.raises(MlxRftError) as e:
        train(tiny_qwen3, tmp_path, num_steps=2)
    for hint in ("--resume latest", "--output-dir", "--overwrite"):
        assert hint in str(e.value)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_the_old_run_whole(tiny_qwen3, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    train(tiny_qwen3, tmp_path, num_steps=4, keep_last=2)
    train(tiny_qwen3, tmp_path, num_steps=2, keep_last=2, overwrite=True)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-0000001", "step-0000002"]
    assert (root / (root / "latest").read_text().strip()).is_dir()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not a run file: left alone


def test_pruning_keeps_what_this_run_wrote(tiny_qwen3, tmp_path):
    """Step numbers beyond 7 digits sort wrongly as names; pruning goes by number."""
    from mlx_rft.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step in (9_999_999, 10_000_000, 10_000_001):
        (root / f"step-{step:07d}").mkdir(parents=True)
    ckpt.prune(root, 2, keep_path=root / "step-10000001")
    assert sorted(p.name for p in root.iterdir()) == ["step-10000000", "step-10000001"]


def test_resume_auto_starts_fresh_then_continues(tiny_qwen3, tmp_path):
    full = train(tiny_qwen3, tmp_path / "full", num_steps=3)
    first = train(tiny_qwen3, tmp_path / "auto", num_steps=2, resume="auto")
    assert first.steps == 2
    assert first.eval_before["eval/accuracy"] == full.eval_before["eval/accuracy"]
    second = train(tiny_qwen3, tmp_path / "auto", num_steps=3, resume="auto")
    assert second.steps == 3
    a = mx.load(str(tmp_path / "full/checkpoints/step-0000003/adapters.safetensors"))
    b = mx.load(str(tmp_path / "auto/checkpoints/step-0000003/adapters.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    # A finished run restarted with auto has nothing to redo (no second final eval).
    again = train(tiny_qwen3, tmp_path / "auto", num_steps=3, resume="auto")
    assert again.steps == 3 and again.eval_after == second.eval_after
    steps = [json.loads(x)["step"] for x in (tmp_path / "auto/metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3]


# ------------------------------------------------------------------ 2. resume checks


@pytest.mark.parametrize("change, field", [
    (dict(lora_rank=8), "lora_rank"),
    (dict(learning_rate=5e-3), "learning_rate"),
    (dict(loss_type="grpo"), "loss_type"),
    (dict(group_size=4), "group_size"),
])
def test_resume_refuses_other_settings_and_writes_nothing(tiny_qwen3, tmp_path, change, field):
    train(tiny_qwen3, tmp_path, num_steps=1)
    before = snapshot(tmp_path)
    with pytest.raises(MlxRftError, match=f"cannot resume.*{field}"):
        train(tiny_qwen3, tmp_path, num_steps=2, resume="latest", **change)
    assert snapshot(tmp_path) == before


def test_resume_refuses_other_training_rows_and_writes_nothing(tiny_qwen3, tmp_path):
    """Same config, other prompts (an edited file, or a task generated differently): refused."""
    train(tiny_qwen3, tmp_path, num_steps=1)
    before = snapshot(tmp_path)
    other = [{**r, "prompt": r["prompt"].replace("say", "write")} for r in ROWS]
    with pytest.raises(MlxRftError, match="training prompts differ.*PYTHONHASHSEED"):
        train(tiny_qwen3, tmp_path, num_steps=2, resume="latest", rows=other)
    assert snapshot(tmp_path) == before
    assert train(tiny_qwen3, tmp_path, num_steps=2, resume="latest").steps == 2  # the same rows resume


def test_the_command_line_runs_with_a_fixed_hash_seed(monkeypatch):
    """Some reasoning-gym generators follow the string-hash order: the CLI pins the seed (one
    re-exec) so a task gives the same rows in every run; a call from Python changes nothing."""
    from mlx_rft import cli as cli_module

    calls = []
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(cli_module.os, "execv", lambda exe, args: calls.append((exe, args)))
    monkeypatch.setattr(sys, "argv", ["mlx-rft", "--version"])
    cli_module.main()
    assert calls == [(sys.executable, [sys.executable, "-m", "mlx_rft", "--version"])]
    assert os.environ["PYTHONHASHSEED"] == "0"
    calls.clear()
    cli_module.main(["--version"])  # from Python: no re-exec
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    cli_module.main()  # a seed the user chose is kept
    assert calls == [] and os.environ["PYTHONHASHSEED"] == "7"


def test_a_hash_seeded_task_is_what_the_data_check_guards():
    """reasoning-gym's isomorphic_strings draws letters from a set: processes with other hash
    seeds get other rows (so the CLI pins the seed and resume compares the rows)."""
    code = ("import hashlib; from mlx_rft.data.tasks import load_task; "
            "rows = load_task('isomorphic', size=50, seed=0, eval_size=4).rows; "
            "print(hashlib.md5(str([r['question'] for r in rows]).encode()).hexdigest())")
    digests = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2", "1")
    ]
    assert digests[0] and digests[0] == digests[2] and digests[0] != digests[1], digests


def test_resume_refuses_another_model_of_the_same_shapes(tiny_model_factory, tmp_path):
    a, b = tiny_model_factory("qwen3", seed=0), tiny_model_factory("qwen3", seed=5)
    train(a, tmp_path, num_steps=1)
    with pytest.raises(MlxRftError, match="cannot resume.*model.*other weights"):
        train(b, tmp_path, num_steps=2, resume="latest")


def test_resume_refuses_a_decaying_schedule_stretched(tiny_qwen3, tmp_path):
    train(tiny_qwen3, tmp_path, num_steps=1, lr_schedule="cosine")
    with pytest.raises(MlxRftError, match="num_steps.*cosine"):
        train(tiny_qwen3, tmp_path, num_steps=3, lr_schedule="cosine", resume="latest")


def test_resume_from_an_older_checkpoint_is_refused(tiny_qwen3, tmp_path):
    train(tiny_qwen3, tmp_path, num_steps=3, keep_last=3)
    with pytest.raises(MlxRftError, match="newer checkpoints"):
        train(tiny_qwen3, tmp_path, num_steps=3, resume=str(tmp_path / "checkpoints/step-0000001"))


def test_load_checkpoint_checks_names_and_shapes(tiny_qwen3, tmp_path):
    """Even a direct load never puts tensors of other shapes into the model."""
    from mlx_rft.train import checkpoint as ckpt

    train(tiny_qwen3, tmp_path / "r4", num_steps=1)
    t = GRPOTrainer(cfg_for(tiny_qwen3, tmp_path / "r8", lora_rank=8), reward_funcs=[digits],
                    train_dataset=ROWS)
    t.model_dir = tiny_qwen3
    t._setup_model()
    with pytest.raises(MlxRftError, match="does not fit"):
        ckpt.load_checkpoint(tmp_path / "r4/checkpoints/step-0000001", t.model, t.optimizer)


def test_corrupt_checkpoint_names_itself_and_the_one_before(tiny_qwen3, tmp_path):
    train(tiny_qwen3, tmp_path, num_steps=2, keep_last=2)
    bad = tmp_path / "checkpoints/step-0000002/adapters.safetensors"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(MlxRftError, match=r"step-0000002 is damaged.*step-0000001"):
        train(tiny_qwen3, tmp_path, num_steps=3, resume="latest")


# ------------------------------------------------------------------ 3. unscorable runs


def returns_none(prompts, completions, **kw):
    return [None] * len(completions)


def returns_nan(prompts, completions, **kw):
    return [float("nan")] * len(completions)


def always_raises(prompts, completions, **kw):
    raise ValueError("the scoring service is down")


@pytest.mark.parametrize("reward, words, extra", [
    (returns_none, ["returns_none", "None or NaN"], {}),
    (returns_nan, ["returns_nan"], {}),
    (always_raises, ["always_raises", "ValueError", "service is down"], dict(reward_on_error="none")),
])
def test_a_run_that_scores_nothing_stops_with_the_reason(tiny_qwen3, tmp_path, reward, words, extra):
    with pytest.raises(MlxRftError, match="no completion could be scored") as e:
        train(tiny_qwen3, tmp_path, reward=reward, num_steps=5, **extra)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "checkpoints").exists()  # nothing worth saving was trained


def test_null_answers_stop_the_built_in_accuracy(tiny_qwen3, tmp_path):
    rows = [{"prompt": r["prompt"], "answer": None} for r in ROWS]
    with pytest.raises(MlxRftError, match="'accuracy' scored none"):
        train(tiny_qwen3, tmp_path, reward="accuracy", rows=rows, num_steps=3)


def test_unscored_steps_limit_is_configurable(tiny_qwen3, tmp_path):
    calls = []

    def flaky(prompts, completions, **kw):  # scores nothing on the first step only
        calls.append(1)
        return [None] * len(completions) if len(calls) == 2 else digits(prompts, completions)

    res = train(tiny_qwen3, tmp_path, reward=flaky, num_steps=3, max_unscored_steps=2)
    assert res.steps == 3


def test_eval_counts_unscored_rows(tiny_qwen3):
    from mlx_rft.data import PromptDataset
    from mlx_rft.evaluate import evaluate_prompts
    from mlx_rft.models import load_model
    from mlx_rft.types import SamplingConfig

    model, tok = load_model(tiny_qwen3)
    data = PromptDataset.from_rows(ROWS[:6], tok)

    def half(prompts, completions, answer):
        return [1.0 if int(a) % 2 else None for a in answer]

    out = evaluate_prompts(model, tok, list(data), RewardSet([half], on_error="none"),
                           sampling=SamplingConfig(temperature=0.0, max_new_tokens=3))
    expected_none = sum(int(r["answer"]) % 2 == 0 for r in ROWS[:6])
    assert out["eval/unscored"] == expected_none
    assert out["eval/accuracy"] == pytest.approx((6 - expected_none) / 6)


def test_unreachable_judge_is_reported(tmp_path):
    import socket

    from mlx_rft.rewards import resolve_reward

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rubric = os.path.join(os.path.dirname(__file__), "..", "examples", "rubrics", "helpfulness.yaml")
    judge = resolve_reward(f"judge(rubric={rubric!r}, url='http://127.0.0.1:{port}/v1', model='m', "
                           "max_retries=0, timeout=2)")
    result = RewardSet([judge], on_error="none")(["q"] * 2, ["a", "b"])
    assert result.num_unscored == 2
    why = result.unscored_reason()
    assert "judge requests failed" in why and str(port) in why


# ------------------------------------------------------------------ 4. reward time limits


def sleeps_forever(prompts, completions, **kw):
    time.sleep(3600)


async def awaits_forever(prompts, completions, **kw):
    import asyncio

    await asyncio.sleep(3600)


@pytest.mark.parametrize("func", [sleeps_forever, awaits_forever])
def test_a_reward_that_never_returns_is_stopped(func):
    t0 = time.perf_counter()
    with pytest.raises(MlxRftError, match="did not return within 0.5 s"):
        RewardSet([func], timeout=0.5)(["p"] * 3, ["a", "b", "c"])
    result = RewardSet([func, digits], timeout=0.5, on_error="none")(["p"] * 3, ["a", "b", "c"])
    assert np.isnan(result.per_func[func.__name__]).all()
    assert result.stats[func.__name__]["timeouts"] == 1.0
    assert not np.isnan(result.total).any()  # the other reward still scores every row
    assert time.perf_counter() - t0 < 5  # no row-by-row retries after a time-out


def test_the_watchdog_leaves_no_handler_behind():
    before = signal.getsignal(signal.SIGUSR2)
    RewardSet([digits], timeout=5)(["p"], ["1"])
    assert signal.getsignal(signal.SIGUSR2) == before


# ------------------------------------------------------------------ 5. signals


def _train_script(model, out, steps, extra=""):
    # The tiny random model scores 0 on every completion of the default task, so the stop after
    # max_uninformative_steps steps with nothing to learn (whose count a resume carries on) is off.
    return (
        "import mlx_rft\n"
        "from mlx_rft import GRPOConfig\n"
        "from mlx_rft.train.cli import main\n"
        f"main(['--model', {str(model)!r}, '--output-dir', {str(out)!r}, '--num-steps', '{steps}',"
        " '--max-new-tokens', '6', '--eval-size', '4', '--group-size', '2', '--prompts-per-step', '2',"
        " '--lora-rank', '4', '--save-every', '100', '--task-size', '40', '--progress', 'false',"
        f" '--max-uninformative-steps', '0'{extra}])\n"
    )


def _wait_for_step(path, step, proc, limit=240):
    t0 = time.time()
    while time.time() - t0 < limit:
        if path.is_file():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if any(x.get("step", 0) >= step and "loss" in x for x in lines):
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"step {step} never logged")


def test_sigterm_saves_the_step_and_resume_logs_each_step_once(tiny_qwen3, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _train_script(tiny_qwen3, out, 40)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM" in stdout + stderr
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert len(saved) == 1
    step = int(saved[0].split("-")[1])
    assert step >= 2 and (out / "report.html").is_file()
    r = subprocess.run([sys.executable, "-c", _train_script(tiny_qwen3, out, step + 2, ", '--resume', 'auto'")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, step + 3))


# ------------------------------------------------------------------ 6, 7. option checks


def test_yaml_null_for_a_number_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: null\n")
    with pytest.raises(MlxRftError, match="learning_rate.*null"):
        build_config(yaml_path=str(path))


def test_lora_layers_is_what_the_adapter_config_says(tiny_qwen3, tmp_path):
    train(tiny_qwen3, tmp_path, num_steps=1, lora_layers=1)
    ck = tmp_path / "checkpoints/step-0000001"
    assert json.loads((ck / "adapter_config.json").read_text())["num_layers"] == 1
    keys = mx.load(str(ck / "adapters.safetensors")).keys()
    layers = {k.split(".")[2] for k in keys}
    n = json.loads((tiny_qwen3 / "config.json").read_text())["num_hidden_layers"]
    assert layers == {str(n - 1)}


@pytest.mark.parametrize("args, words", [
    (["generate", "-p", "hi", "-m", "-1"], ["max_new_tokens=-1"]),
    (["generate", "-p", "hi", "--temp", "-1"], ["temperature=-1"]),
    (["generate", "-p", "hi", "--top-p", "0"], ["top_p=0"]),
    (["eval", "--limit", "0"], ["--limit 0"]),
    (["train", "--lora-layers", "0"], ["lora_layers=0"]),
    (["train", "--epsilon", "1.0"], ["epsilon=1.0"]),
    (["train", "--output-dir", "/proc/version"], ["is a file"]),
])
def test_command_options_fail_fast_on_one_line(args, words):
    t0 = time.perf_counter()
    one_error_line(cli(*args), *words)
    assert time.perf_counter() - t0 < 60  # refused before any model loads


def test_a_flag_given_twice_is_refused():
    r = cli("train", "--reward-funcs", "accuracy", "--reward-funcs", "format")
    assert r.returncode == 2 and "--reward-funcs given twice" in r.stderr


# ------------------------------------------------------------------ bad files and small data


def test_bad_data_files_get_one_line_errors(tiny_qwen3, tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(MlxRftError, match="is a directory"):
        train(tiny_qwen3, tmp_path / "a", rows=None, train_file=str(folder))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"prompt": "ok"}\n' + b"\xff\xfe\x00garbage\n" + b'{"prompt": "fine"}\n')
    with pytest.raises(MlxRftError, match=r"bin.jsonl:2: row is not UTF-8"):
        train(tiny_qwen3, tmp_path / "b", rows=None, train_file=str(binary))


def test_a_small_file_says_what_the_split_leaves(tiny_qwen3, tmp_path):
    rows = [{"prompt": f"q{i}"} for i in range(20)]
    with pytest.raises(MlxRftError, match=r"20 distinct prompts leave 1 for training.*eval_size 64.*--eval-size \(e.g. 5\)"):
        train(tiny_qwen3, tmp_path, rows=rows, eval_size=64)
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_a_huge_reward_does_not_break_the_report(tiny_qwen3, tmp_path):
    def huge(prompts, completions, **kw):
        return [1e300 if i % 2 else 0.0 for i in range(len(completions))]

    res = train(tiny_qwen3, tmp_path, reward=huge, num_steps=1)
    assert res.steps == 1 and (tmp_path / "report.html").is_file()


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["cannot read the weights", "damaged"]),
    ("empty", ["cannot read the weights"]),
    ("bad-tokenizer", ["not valid JSON", "tokenizer.json"]),
    ("no-tokenizer", ["has no tokenizer"]),
])
def test_a_damaged_model_folder_gets_one_line(tiny_qwen3, tmp_path, damage, words):
    import shutil

    from mlx_rft.models import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen3, folder)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "bad-tokenizer":
        (folder / "tokenizer.json").write_text("garbage")
    else:
        (folder / "tokenizer.json").unlink()
    with pytest.raises(MlxRftError) as e:
        load_model(folder)
    for w in words:
        assert w in str(e.value)


def test_a_huge_row_is_refused_without_tokenizing_it(tiny_qwen3, tmp_path):
    from mlx_rft.data import load_prompt_dataset
    from mlx_rft.models import load_model

    _, tok = load_model(tiny_qwen3)
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 10_000_000}) + "\n" + json.dumps({"prompt": "ok"}) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(MlxRftError, match=r"big.jsonl:1: the prompt has 50,000,000 characters"):
        load_prompt_dataset(path, tok, max_prompt_length=512)
    data = load_prompt_dataset(path, tok, max_prompt_length=512, on_long_prompt="skip")
    assert len(data) == 1 and data.skipped_long == 1
    assert time.perf_counter() - t0 < 10  # tokenizing 50 MB takes minutes


def test_a_run_that_fails_its_checks_leaves_no_files(tiny_qwen3, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(MlxRftError):
        train(tiny_qwen3, out, reward="no_such_reward")
    assert not out.exists() or not any(out.iterdir())
