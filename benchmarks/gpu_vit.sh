#!/usr/bin/env bash
# The one device run of the vision-transformer issue (14), under 10 minutes on one H200, each part
# capped by its own timeout and all by one deadline; logs and raw results are packed into
# $OUT/gpu_vit.tar.gz after every part (a run stopped from outside still returns what it did).
#   1. the ViT training step against its limit (US-ViT-Small, batch 256, 224 px), alone on the GPU;
#   2. then at once, until the deadline: quality, the Fashion-MNIST US-ViT against ViTs trained
#      alone at 0.25/0.5/0.75/1.0 with the same recipe and epochs (configs/fashion_mnist_vit.yaml),
#      seeds 0-2; and the main job's 15-epoch headline rows (issue 18), seeds 0-2.
#
#   bash benchmarks/gpu_vit.sh        # from the repository root, on a CUDA machine
#
# The default dataset must be in /usr/share/datasets/fashion-mnist or in .gpu_data/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOGS=/tmp/gpu_vit
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$LOGS" "$OUT_DIR"
START=$(date +%s)
DEADLINE=$(( START + ${BUDGET_S:-560} ))
stamp() { echo "== $1 at $(( $(date +%s) - START ))s"; }
pack() { tar -czf "$OUT_DIR/gpu_vit.tar.gz" -C /tmp gpu_vit; }
left() { local l=$(( DEADLINE - $(date +%s) )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -d .gpu_data ]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu_data/*.gz /usr/share/datasets/fashion-mnist/
fi
"$PY" -c "import os, torch, torchvision, usnet; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(), 'cpu cores', os.cpu_count())" 2>&1 | tee "$LOGS/env.txt"

stamp "ViT training step"
timeout "$(left 150)" "$PY" benchmarks/train_step.py --size gpu --device cuda --model vit \
  --widths fixed,random --variants bf16_cl,fp32 --random-choices 6 --steps 4 --rounds 3 \
  > "$LOGS/train_step_vit.txt" 2>&1
tail -8 "$LOGS/train_step_vit.txt"
pack

# The trainings are small and launch-bound: one CPU thread each, all on the GPU at once.
stamp "US-ViT against ViTs trained alone + the main job's 15-epoch headline rows"
timeout "$(left 600)" "$PY" benchmarks/paper_claims.py --config configs/fashion_mnist_vit.yaml \
  --rows us_net,individual --seeds 0,1,2 --jobs 5 --threads 1 --set device=cuda \
  --out /tmp/gpu_vit/runs-vit --results /tmp/gpu_vit/paper_claims-fashion_mnist_vit-E4 \
  > "$LOGS/vit_claims.txt" 2>&1 &
timeout "$(left 600)" "$PY" benchmarks/paper_claims.py --rows us_net,individual --epochs 15 \
  --seeds 0,1,2 --jobs 9 --threads 1 --set device=cuda --out /tmp/gpu_vit/runs-E15 \
  --results /tmp/gpu_vit/paper_claims-E15-gpu > "$LOGS/e15.txt" 2>&1 &
while [ -n "$(jobs -r)" ]; do sleep 15; pack; done
grep -v "^|" "$LOGS/vit_claims.txt" | tail -20
grep -v "^|" "$LOGS/e15.txt" | tail -20
stamp "done"
pack
