#!/usr/bin/env bash
# The test suite against another torch/torchvision pair than the lock's, e.g. the GPU image's:
#   bash scripts/test_torch_pair.sh 2.11.0 0.26.0 [pytest arguments]
# Builds once a virtual environment with that pair and the lock's other pins, cached beside
# setup.sh's (under $USNET_VENV_CACHE, default ~/.cache/usnet/venvs), and runs this checkout
# from source in it (PYTHONPATH: nothing is installed into the cache).
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/test_torch_pair.sh TORCH_VERSION TORCHVISION_VERSION [pytest arguments]"
torch_version=${1:?$usage}
vision_version=${2:?$usage}
shift 2
PYTHON=${PYTHON:-python3}
source scripts/build_venv.sh
cache=${USNET_VENV_CACHE:-$HOME/.cache/usnet/venvs}
venv="$cache/pair-torch$torch_version-torchvision$vision_version"
install_pair() {
  # The lock's other pins; torch brings the CUDA and triton packages of its own version.
  grep -v -E '^(torch|torchvision|triton|cuda-[a-z-]+|nvidia-[a-z0-9-]+)==' requirements/lock.txt \
    >"$1/others.txt"
  # A pip configuration may cap torch at the lock's version (a constraints file): not for this pair.
  PIP_CONSTRAINT="" "$1/bin/python" -m pip install -q --disable-pip-version-check \
    "torch==$torch_version" "torchvision==$vision_version" -r "$1/others.txt" \
    2> >(grep -v "is ignored: it is neither" >&2)
}
if [ ! -x "$venv/bin/python" ]; then
  echo "test_torch_pair: building $venv (first time: a few minutes)"
  build_venv "$venv" install_pair
fi
"$venv/bin/python" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")'
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
