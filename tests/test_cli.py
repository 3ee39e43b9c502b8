"""The command line: lazy help, one-line errors with a non-zero exit, the fast BLAS path."""

import os
import subprocess
import sys

import pytest


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_rft", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for name in ("train", "eval", "generate", "import-gguf", "export", "doctor"):
        assert name in r.stdout
    assert run("nope").returncode == 2


def test_train_help_shows_fields():
    r = run("train", "--help")
    assert r.returncode == 0
    assert "--loss-type" in r.stdout and "--group-size" in r.stdout and "dr_grpo" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["generate", "--model", "/no/such/model", "--prompt", "hi"], ["does not exist"]),
        (["train", "--group-size", "1"], ["group_size=1"]),
        (["train", "--loss-type", "ppo"], ["loss_type='ppo'"]),
    ],
)
def test_errors_are_one_line_and_exit_nonzero(args, words):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0]


def test_model_path_that_is_a_file(tmp_path):
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"GGUF")
    r = run("generate", "--model", str(f), "--prompt", "hi")
    assert r.returncode == 2 and "import-gguf" in r.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS swap is Linux-only")
def test_fast_blas_is_loaded_before_mlx_and_used():
    code = (
        "import mlx_rft, mlx.core as mx\n"
        "from mlx_rft.cpu.blas import blas_status\n"
        "s = blas_status()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(s.path); print(bool(s.path) and os.path.realpath(s.path) in maps)\n"
    )
    r = subprocess.run([sys.executable, "-c", "import os\n" + code], capture_output=True, text=True)
    path, mapped = r.stdout.split()
    assert path != "None", "no optimized BLAS found: install mkl or libopenblas0-pthread"
    assert mapped == "True"
    # Importing mlx.core first is too late: the status says so and a warning names the fix.
    r = subprocess.run([sys.executable, "-c", "import mlx.core, mlx_rft\nfrom mlx_rft.cpu.blas import blas_status\nprint(blas_status().reason)"],
                       capture_output=True, text=True)
    assert "too late" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import mlx_rft\nfrom mlx_rft.cpu.blas import blas_status\nprint(blas_status())"],
                       capture_output=True, text=True, env={**os.environ, "MLX_RFT_BLAS": "none"})
    assert "path=None" in r.stdout


def test_bad_blas_env_is_a_clear_error():
    r = subprocess.run([sys.executable, "-c", "import mlx_rft"], capture_output=True, text=True,
                       env={**os.environ, "MLX_RFT_BLAS": "/no/such/lib.so"})
    assert r.returncode != 0 and "MLX_RFT_BLAS" in r.stderr and "pip install mkl" in r.stderr
