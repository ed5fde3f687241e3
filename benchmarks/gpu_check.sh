#!/usr/bin/env bash
# The one device run of the GPU issue, under 10 minutes on one H200: the CUDA tests, the main job
# on the GPU, the data-loading check and the trimmed GPU suite, each capped by its own timeout and
# all by one deadline. Logs go to /tmp/gpu and are packed into $OUT/gpu_results.tar.gz after
# every part (so a run stopped from outside still returns what it did).
#
#   bash benchmarks/gpu_check.sh      # from the repository root, on a CUDA machine
#
# The default dataset must be in /usr/share/datasets/fashion-mnist (Debian's package) or in
# .gpu_data/ (copied there first; the lease machine has no apt).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
export RESULTS=/tmp/gpu
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS" "$OUT_DIR"
START=$(date +%s)
export DEADLINE=$(( START + ${BUDGET_S:-570} ))
stamp() { echo "== $1 at $(( $(date +%s) - START ))s"; }
pack() { tar -czf "$OUT_DIR/gpu_results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -d .gpu_data ]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu_data/*.gz /usr/share/datasets/fashion-mnist/
fi
"$PY" -c "import os, torch, torchvision, usnet; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(), 'cpu cores', os.cpu_count())" 2>&1 | tee "$RESULTS/env.txt"
nvidia-smi >> "$RESULTS/env.txt" 2>&1

stamp "CUDA tests"
timeout 140 "$PY" -m pytest tests/test_cuda.py -m cuda -q -rA -p no:cacheprovider > "$RESULTS/cuda_tests.txt" 2>&1
tail -25 "$RESULTS/cuda_tests.txt"
pack

stamp "main job on the GPU"
rm -rf /tmp/gpu_main
t0=$(date +%s%N)
timeout 150 "$PY" -m usnet train configs/fashion_mnist.yaml --out /tmp/gpu_main --set device=cuda \
  > "$RESULTS/main_job.txt" 2>&1
echo "exit $? wall time: $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$RESULTS/main_job.txt"
grep -v "it/s\]" "$RESULTS/main_job.txt" | tail -32
cp /tmp/gpu_main/metrics.jsonl /tmp/gpu_main/spectrum.csv "$RESULTS/" 2>/dev/null
pack

stamp "data loading"
timeout 30 "$PY" benchmarks/data_loading.py --device cuda > "$RESULTS/data_loading.txt" 2>&1
tail -7 "$RESULTS/data_loading.txt"
pack

stamp "GPU suite"
PYTHON="$PY" bash benchmarks/gpu_suite.sh > "$RESULTS/suite.txt" 2>&1
grep -v "^  [a-z]" "$RESULTS/suite.txt" | grep "^==\|^|\|exit\|graphs\|Error" | cut -c1-200
stamp "done"
pack
