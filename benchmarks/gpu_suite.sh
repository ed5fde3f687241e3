#!/usr/bin/env bash
# The GPU sizes of every issue-5 benchmark in one run: under 8 minutes on one H100 (estimate; see
# docs/benchmarks.md). Runs from the source tree (no install needed; torch >= 2.11 with CUDA).
#
#   bash benchmarks/gpu_suite.sh            # results in benchmarks/results/ (or $OUT if set)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh
#
# Each benchmark prints a markdown table ready for docs/benchmarks.md and is capped by its own
# timeout, most important first, so one slow part cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
START=$(date +%s)

run() {  # run NAME SECONDS ARGS...: one benchmark, output teed to $RESULTS/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - START ))s)"
  timeout "$limit" "$PY" "$@" 2>&1 | tee "$RESULTS/$name.txt"
  echo "   exit ${PIPESTATUS[0]}"
}

"$PY" -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())" | tee "$RESULTS/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$RESULTS/versions.txt"

run train_fixed   100 benchmarks/train_step.py --size gpu --device cuda --widths fixed
run train_random  150 benchmarks/train_step.py --size gpu --device cuda --widths random
run inference      45 benchmarks/inference.py --size gpu --device cuda
run calibrate      30 benchmarks/calibrate.py --size gpu --device cuda
run memory_fp32    25 benchmarks/train_step.py --size gpu --device cuda --memory
run memory_bf16    25 benchmarks/train_step.py --size gpu --device cuda --memory --variants bf16_cl
run compile       100 benchmarks/train_step.py --size gpu --device cuda --compile --steps 6 --rounds 2
echo "== total $(( $(date +%s) - START ))s"
