#!/usr/bin/env bash
# The GPU sizes of the performance benchmarks in one run, trimmed to about 5 minutes at most on one
# H200 so that it fits one device lease beside the CUDA tests and the main job
# (benchmarks/gpu_check.sh). Runs from the source tree (no install needed; torch >= 2.11 with CUDA).
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
RESULTS="${RESULTS:-${OUT:-benchmarks/results}}"
mkdir -p "$RESULTS"
START=$(date +%s)

run() {  # run NAME SECONDS ARGS...: one benchmark, output teed to $RESULTS/NAME.txt
  local name=$1 limit=$2
  shift 2
  if [ -n "${DEADLINE:-}" ]; then  # an overall deadline (epoch seconds) caps every part
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then echo "== $name skipped: the deadline has passed"; return; fi
  fi
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - START ))s)"
  timeout "$limit" "$PY" "$@" 2>&1 | tee "$RESULTS/$name.txt"
  echo "   exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s"
}

"$PY" -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())" | tee "$RESULTS/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee -a "$RESULTS/versions.txt"

# US-MobileNetV2, batch 256, 224 px: fp32, bf16 + channels_last, each with and without cuDNN
# autotuning; fixed widths, then random widths (steady state after warm_up_widths).
run train_fixed   70 benchmarks/train_step.py --size gpu --device cuda --widths fixed --steps 5
run train_random 100 benchmarks/train_step.py --size gpu --device cuda --widths random --steps 4 \
  --variants bf16_cl+bench,fp32+bench,bf16_cl,fp32
run inference     30 benchmarks/inference.py --size gpu --device cuda
run calibrate     20 benchmarks/calibrate.py --size gpu --device cuda
run memory_fp32   15 benchmarks/train_step.py --size gpu --device cuda --memory
run memory_bf16   15 benchmarks/train_step.py --size gpu --device cuda --memory --variants bf16_cl
# torch.compile at the small size (US-ConvNet, batch 64, 28 px): the 224 px graphs take minutes
# to build on each side, more than the lease holds.
run compile       45 benchmarks/train_step.py --size cpu --device cuda --compile --steps 10 --rounds 3
echo "== total $(( $(date +%s) - START ))s"
