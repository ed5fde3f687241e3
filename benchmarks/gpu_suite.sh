#!/usr/bin/env bash
# The GPU sizes of the performance benchmarks, about 8 minutes on one H200 (each part capped by
# its own timeout, most important first; $DEADLINE, epoch seconds, caps them all, as
# benchmarks/gpu_check.sh sets it). Runs from the source tree (torch >= 2.11 with CUDA).
#
#   bash benchmarks/gpu_suite.sh                      # results in benchmarks/results/ (or $OUT)
#   bash benchmarks/gpu_suite.sh calibrate compile    # some parts only
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

want() { [ -z "$PARTS" ] || [[ " $PARTS " == *" $1 "* ]]; }
PARTS="${*:-}"  # part names to run (default: all), e.g. `bash benchmarks/gpu_suite.sh calibrate`

# US-MobileNetV2, batch 256, 224 px, n=4: bf16 + channels_last and fp32, each with and without
# cuDNN autotuning; fixed widths, then random widths from 6 distinct widths (the steady state after
# warm_up_widths; a finite set bounds the one-off warm-up: on an H200 every new bf16
# channels_last shape costs seconds of cuDNN kernel compilation).
want train_bf16 && run train_bf16 120 benchmarks/train_step.py --size gpu --device cuda \
  --widths fixed,random --variants bf16_cl+bench,bf16_cl --random-choices 6 --steps 4 --rounds 3
want train_fp32 && run train_fp32 100 benchmarks/train_step.py --size gpu --device cuda \
  --widths fixed,random --variants fp32+bench,fp32 --random-choices 6 --steps 4 --rounds 3
# US-ViT-Small (issue 14), batch 256, 224 px, n=4: bf16 and fp32 with fixed and random widths.
want train_vit && run train_vit 150 benchmarks/train_step.py --size gpu --device cuda --model vit \
  --widths fixed,random --variants bf16_cl,fp32 --random-choices 6 --steps 4 --rounds 3
want calibrate && run calibrate 45 benchmarks/calibrate.py --size gpu --device cuda --rounds 3
# torch.compile at the small size (US-ConvNet, batch 64, 28 px): the 224 px graphs take minutes
# to build on each side.
want compile && run compile 70 benchmarks/train_step.py --size cpu --device cuda --compile --steps 10 --rounds 3
want inference && run inference 60 benchmarks/inference.py --size gpu --device cuda
want memory_fp32 && run memory_fp32 30 benchmarks/train_step.py --size gpu --device cuda --memory
want memory_bf16 && run memory_bf16 40 benchmarks/train_step.py --size gpu --device cuda --memory --variants bf16_cl
echo "== total $(( $(date +%s) - START ))s"
