#!/usr/bin/env bash
# Set up everything usnet needs on a fresh machine; fast when run again.
#   1. the default dataset (Debian's dataset-fashion-mnist) when missing;
#   2. a virtual environment with the pinned dependencies (requirements/lock.txt), cached outside
#      the checkout under $USNET_VENV_CACHE (default ~/.cache/usnet/venvs), keyed by the lock
#      file's hash;
#   3. ./.venv, a small environment of this checkout's own that sees the cached dependencies
#      (a .pth file) and holds this checkout in editable mode (the `usnet` command). Several
#      checkouts share the cache but never each other's code.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
source scripts/build_venv.sh
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
install_locked() {  # the pinned dependencies (usnet's own, read from pyproject, then removed)
  "$1/bin/python" -m pip install -q --disable-pip-version-check \
    -c requirements/lock.txt -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  "$1/bin/python" -m pip uninstall -q -y usnet
}
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: building virtual environment $venv (first time: a few minutes)"
  build_venv "$venv" install_locked
fi
# The checkout's own environment: seconds to build, rebuilt when the dependencies change.
site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if compgen -G "$(site_of "$venv/bin/python")/__editable__*usnet*" >/dev/null; then
  "$venv/bin/python" -m pip uninstall -q -y usnet  # left by an older setup: code is per checkout
fi
if [ -L .venv ] || [ "$(cat .venv/usnet-deps 2>/dev/null)" != "$venv" ]; then
  rm -rf .venv
  "$PYTHON" -m venv --without-pip .venv
  echo "import site; site.addsitedir('$(site_of "$venv/bin/python")')" > "$(site_of .venv/bin/python)/usnet-deps.pth"
  echo "$venv" > .venv/usnet-deps
fi
"$venv/bin/python" -m pip --python .venv/bin/python install -q --disable-pip-version-check \
  --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither" >&2)
echo "setup: ready (.venv on $venv)"
