#!/usr/bin/env bash
# One-time setup of the reference certified-training code bases (see README.md beside this file).
#
#   REF_ROOT=/path/to/ref benchmarks/reference/setup.sh [NAME ...]
#
# NAME: Fast-Certified-Robust-Training, expressive-losses, SABR, TAPS (default: all four).
# Expects the checkouts, cloned by the user at the commits below, in $REF_ROOT/<NAME> (and
# auto_LiRPA in $REF_ROOT/auto_LiRPA for the first two). For each NAME it creates
# $REF_ROOT/venvs/<NAME> with the packages pinned in requirements/<NAME>.txt, installs auto_LiRPA
# (--no-deps -e) where needed, writes .pth files that put our shims on the path, and links
# <checkout>/data/MNIST to our data. Once, it writes the MNIST IDX files to $REF_ROOT/data with
# make_mnist_idx.py, run by our own venv.
#
# Environment:
#   REF_ROOT         where the checkouts, venvs, data (and later runs/exports) live (default /work/ref)
#   PYTHON           interpreter for the reference venvs (default python3.11; we used 3.11.7)
#   OUR_PYTHON       tightrope's interpreter, for make_mnist_idx.py (default <repo>/.venv/bin/python)
#   TORCH_INDEX_URL  extra pip index for the CPU build of torch (default empty: pip's own
#                    configuration, which on the project's CPU machines already serves the CPU
#                    build of torch 2.13.0; elsewhere e.g. https://download.pytorch.org/whl/cpu)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
REF_ROOT="$(realpath -m "${REF_ROOT:-/work/ref}")"
PYTHON="${PYTHON:-python3.11}"
OUR_PYTHON="${OUR_PYTHON:-$REPO/.venv/bin/python}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-}"

declare -A COMMIT=(
  [Fast-Certified-Robust-Training]=557797bd2aba1647341c20a057b36c21d69a5642
  [expressive-losses]=3df64fa997e275605c331054499f36cc9f213187
  [SABR]=1a6c2582ec9fa2d81eacdd3c86f90732bb72f4e7
  [TAPS]=6b5c5d9d3453c482f56f00e6f57b99b07b11ca4f
  [auto_LiRPA]=a050a3d61f4cb68b108fa7f07dcb3e4d7ef304df
)
declare -A URL=(
  [Fast-Certified-Robust-Training]=https://github.com/shizhouxing/Fast-Certified-Robust-Training
  [expressive-losses]=https://github.com/alessandrodepalma/expressive-losses
  [SABR]=https://github.com/eth-sri/SABR
  [TAPS]=https://github.com/eth-sri/TAPS
  [auto_LiRPA]=https://github.com/Verified-Intelligence/auto_LiRPA
)
declare -A SHIMS=(  # shims each code base imports: torchvision everywhere, wandb/bunch where used
  [Fast-Certified-Robust-Training]="torchvision_shim wandb_stub"
  [expressive-losses]="torchvision_shim wandb_stub"
  [SABR]="torchvision_shim bunch_stub"
  [TAPS]="torchvision_shim"
)

# A checkout must exist; a git checkout must be at the commit we used (snapshots without .git
# are taken as they are).
check_checkout() {
  local name="$1" dir="$REF_ROOT/$1"
  if [[ ! -d "$dir" ]]; then
    echo "missing $dir; clone it first:" >&2
    echo "  git clone ${URL[$name]} $dir && git -C $dir checkout ${COMMIT[$name]}" >&2
    exit 1
  fi
  if [[ -e "$dir/.git" ]]; then
    local head
    head="$(git -C "$dir" rev-parse HEAD)"
    if [[ "$head" != "${COMMIT[$name]}" ]]; then
      echo "$dir is at $head, expected ${COMMIT[$name]} (git -C $dir checkout ${COMMIT[$name]})" >&2
      exit 1
    fi
  fi
}

setup_venv() {
  local name="$1"
  local venv="$REF_ROOT/venvs/$name"
  local index_args=()
  if [[ -n "$TORCH_INDEX_URL" ]]; then
    index_args=(--extra-index-url "$TORCH_INDEX_URL")
  fi
  echo "== $name: $venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install ${index_args[@]+"${index_args[@]}"} -r "$HERE/requirements/$name.txt"
  if [[ "$name" == Fast-Certified-Robust-Training || "$name" == expressive-losses ]]; then
    # auto_LiRPA's setup.py asks for torch < 2.9; it is used with torch 2.13 anyway (--no-deps).
    "$venv/bin/pip" install --no-deps -e "$REF_ROOT/auto_LiRPA"
  fi
  local site
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  for shim in ${SHIMS[$name]}; do
    echo "$HERE/shims/$shim" > "$site/ref_$shim.pth"
  done
  mkdir -p "$REF_ROOT/$name/data"
  ln -sfn "$REF_ROOT/data/mnist_ours/MNIST" "$REF_ROOT/$name/data/MNIST"
}

main() {
  local names=("$@")
  if [[ ${#names[@]} -eq 0 ]]; then
    names=(Fast-Certified-Robust-Training expressive-losses SABR TAPS)
  fi
  local name
  for name in "${names[@]}"; do
    if [[ -z "${SHIMS[$name]+set}" ]]; then
      echo "unknown name $name (one of: ${!SHIMS[*]})" >&2
      exit 1
    fi
    check_checkout "$name"
    if [[ "$name" == Fast-Certified-Robust-Training || "$name" == expressive-losses ]]; then
      check_checkout auto_LiRPA
    fi
  done
  mkdir -p "$REF_ROOT/venvs"
  (cd "$REPO" && REF_ROOT="$REF_ROOT" "$OUR_PYTHON" "$HERE/make_mnist_idx.py" --out "$REF_ROOT/data")
  for name in "${names[@]}"; do
    setup_venv "$name"
  done
  echo "done: venvs in $REF_ROOT/venvs, data in $REF_ROOT/data"
}

main "$@"
