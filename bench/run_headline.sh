#!/bin/bash

# Reruns BENCHMARKS.md's headline figures end to end, one benchmark at a time, and writes a report.
# About 20 minutes on a 2-core x86 CPU; the peers (TRL, torch) and the default job add theirs.
#
# 1) The mlx-rft figures: GEMM, rollouts, GRPO step (plain and checkpointed), training pass
#      bash bench/run_headline.sh
# 2) With the same-machine peers: TRL's GRPOTrainer for the step, torch + transformers for the
#    training pass (environments set up as in bench/bench_trl.py's docstring)
#      TRL_PYTHON=trl-env/bin/python TORCH_PYTHON=trl-env/bin/python bash bench/run_headline.sh
# 3) Also the default job (`mlx-rft train`, ~9 minutes)
#      DEFAULT_JOB=1 bash bench/run_headline.sh
# 4) A quick check that everything runs (figures not comparable)
#      STEPS=3 REPEATS=1 bash bench/run_headline.sh
#
# The report and every benchmark's output go to runs/headline/<UTC start time>/ (or $OUT).
# The machine should be otherwise idle: these benchmarks use every core, and figures move with load.

set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-10}      # GRPO steps per step benchmark (medians over steps 3 on)
REPEATS=${REPEATS:-3}   # best-of repeats of the rollout and training-pass benchmarks
OUT=${OUT:-runs/headline/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
date -u +"%Y-%m-%d %H:%M UTC" > "$OUT/started"
cut -d' ' -f1 /proc/loadavg > "$OUT/load" 2>/dev/null || true
say() { echo "[$(date -u +%H:%M:%S)] $*"; }

# The default model's folder (imported from its GGUF on first use); the peers load it from there.
MODEL_DIR=$("$PY" -c "import mlx_rft; from mlx_rft.models import resolve_model_path; print(resolve_model_path(None))")
"$PY" -m mlx_rft doctor > "$OUT/doctor.log"

# -----------------------------------------------------------------------------
# float32 GEMM with the preloaded BLAS against MLX's bundled one (a process each)
say "GEMM"
"$PY" bench/bench_gemm.py --json "$OUT/gemm.json" > "$OUT/gemm.log"

# -----------------------------------------------------------------------------
# Rollout engine at 4 x 4 x 64 against mlx_lm.batch_generate and a one-sequence loop
say "rollouts"
"$PY" bench/bench_rollout.py --quick --repeats "$REPEATS" --json "$OUT/rollout.json" > "$OUT/rollout.log"

# -----------------------------------------------------------------------------
# GRPO step, plain and with gradient checkpointing; TRL's right before each when asked
for mode in plain checkpointed; do
    flag=()
    [ "$mode" = checkpointed ] && flag=(--gradient-checkpointing)
    if [ -n "${TRL_PYTHON:-}" ]; then
        say "TRL step, $mode"
        "$TRL_PYTHON" bench/bench_trl.py --model "$MODEL_DIR" --steps "$STEPS" "${flag[@]}" \
            > "$OUT/trl_$mode.json" 2> "$OUT/trl_$mode.log"
    fi
    say "GRPO step, $mode"
    "$PY" bench/bench_step.py --steps "$STEPS" "${flag[@]}" --json "$OUT/step_$mode.json" > "$OUT/step_$mode.log"
done

# -----------------------------------------------------------------------------
# Training forward + backward: the trainer's path against plain MLX (and torch when asked)
say "training pass"
"$PY" bench/bench_train_tokens.py --repeats "$REPEATS" --only "plain MLX,ours" \
    --json "$OUT/train_tokens.json" > "$OUT/train_tokens.log"
if [ -n "${TORCH_PYTHON:-}" ]; then
    say "training pass, torch"
    "$TORCH_PYTHON" bench/bench_train_tokens.py --torch --model "$MODEL_DIR" --repeats "$REPEATS" \
        --json "$OUT/train_tokens_torch.json" > "$OUT/train_tokens_torch.log"
fi

# -----------------------------------------------------------------------------
# The default job: held-out accuracy before and after 60 steps, and its wall time
if [ -n "${DEFAULT_JOB:-}" ]; then
    say "default job"
    start=$(date +%s)
    "$PY" -m mlx_rft train --output-dir "$OUT/default-job" > "$OUT/default_job.log" 2>&1
    echo $(( $(date +%s) - start )) > "$OUT/default_job.seconds"
fi

cut -d' ' -f1 /proc/loadavg >> "$OUT/load" 2>/dev/null || true
"$PY" bench/headline_report.py "$OUT"
say "report: $OUT/report.md"
