#!/usr/bin/env bash
# Set up everything usnet needs on a fresh machine; fast when run again.
#   1. the default dataset (Debian's dataset-fashion-mnist) when missing;
#   2. a virtual environment with the pinned dependencies (requirements/lock.txt), cached outside
#      the checkout under $USNET_VENV_CACHE (default ~/.cache/usnet/venvs), keyed by the lock
#      file's hash, and linked as ./.venv;
#   3. this checkout installed into it in editable mode (the `usnet` command).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing dataset-fashion-mnist with apt"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: $FMNIST_DIR missing and apt unavailable; usnet will fall back to torchvision's downloader" >&2
  fi
fi

key=$( (cat requirements/lock.txt pyproject.toml; "$PYTHON" -c 'import sys; print(sys.version)') \
  | sha256sum | cut -c1-16)
cache=${USNET_VENV_CACHE:-$HOME/.cache/usnet/venvs}
venv="$cache/$key"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: building virtual environment $venv (first time: a few minutes)"
  mkdir -p "$cache"
  # Build beside the final path and rename at the end: an interrupted build is never reused.
  partial="$venv.partial-$$"
  trap 'rm -rf "$partial"' EXIT
  "$PYTHON" -m venv "$partial"
  "$partial/bin/python" -m pip install -q --disable-pip-version-check \
    -c requirements/lock.txt -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  "$partial/bin/python" -m pip uninstall -q -y usnet
  mv "$partial" "$venv"
  trap - EXIT
  # Scripts in bin/ name the build path; point them at the final one.
  grep -rlI -- "$partial" "$venv/bin" | xargs -r sed -i "s|$partial|$venv|g"
fi
ln -sfn "$venv" .venv
# Editable install of this checkout (seconds): the environment is shared, the code is ours.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
  2> >(grep -v "is ignored: it is neither" >&2)
echo "setup: ready (.venv -> $venv)"
