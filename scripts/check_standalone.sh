#!/usr/bin/env bash
# Build every library package with hatch (wheel and sdist), then install each wheel alone, with
# only its declared dependencies, into a fresh virtual environment; there, check that no other
# Tightrope package is importable and smoke-test the package's public API
# (scripts/standalone_smoke.py: bounds that hold at sampled points, attacks that break a
# breakable point inside the box, losses that are finite with gradients, verify proving and
# falsifying a tiny property, two epochs of training on synthetic data).
#
# Usage: scripts/check_standalone.sh [--dist DIR] [PACKAGE ...]
#   --dist DIR  keep the wheels and sdists in DIR, relative to the repository root (default: a
#               temporary folder, removed)
#   PACKAGE     bounds, attacks, losses, verify or train (default: all five); every package is
#               built either way, since the later ones install the earlier ones' wheels
#
# About 40 s on 2 cores; the first run also makes .venv-tools/ and .venv-torch/ (~40 s more).
#
# Tools. hatch (pinned below) lives in its own environment, .venv-tools/ (gitignored), made here
# on first use and remade when the pin changes; its data and cache folders live there too.
# .venv/ does not carry it: no test imports hatch, and it would add ~50 packages to the
# environment the tests and mypy see.
#
# Environments. torch is ~900 MB installed: installing it takes ~25 s and deleting it, on this
# machine kind's disk, over a minute. So it is installed once into a base environment,
# .venv-torch/ (gitignored), that holds torch==2.13.0 and its own requirements only; it is kept
# between runs and remade when the pin changes or its `pip freeze` differs from the one recorded
# when it was made. Each package gets a fresh environment in a temporary folder
# (`python -m venv --without-pip`) whose site-packages holds one .pth file naming the base's
# site-packages, after its own: pip (the base's) installs into it the package's wheel, the wheels
# of the Tightrope packages it declares (given as files, so pip never looks for a tightrope-*
# project on an index) and whatever its other requirements resolve to; torch is found already
# satisfied. pip never removes a distribution outside the environment it installs into, so the
# base stays torch-only and no package sees another's environment. Copying the base (`cp -a`)
# per package would cost 900 MB each, and `--system-site-packages` would expose the system
# interpreter's packages, not the base's.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

HATCH_PIN="hatch==1.18.2"
TORCH_PIN="torch==2.13.0"  # as scripts/setup.sh: the CPU build this machine kind has on disk
PYTHON="${PYTHON:-python3}"
# The Tightrope packages each library declares; the check fails if the metadata says otherwise.
declare -A SIBLINGS=(
  [bounds]=""
  [attacks]=""
  [losses]="bounds attacks"
  [verify]="bounds attacks"
  [train]="bounds attacks losses"
)
ALL=(bounds attacks losses verify train)

dist=""
selected=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dist) dist="${2:?--dist needs a folder}"; shift 2 ;;
    bounds|attacks|losses|verify|train) selected+=("$1"); shift ;;
    *) echo "unknown argument $1 (use --dist DIR and package names: ${ALL[*]})" >&2; exit 2 ;;
  esac
done
[[ ${#selected[@]} -gt 0 ]] || selected=("${ALL[@]}")

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dist="${dist:-$work/dist}"
mkdir -p "$dist"
dist="$(cd "$dist" && pwd)"
started=$SECONDS

# Run a command with its output in a log that is shown only when the command fails.
quietly() {
  local log="$work/$1.log"
  shift
  if ! "$@" >"$log" 2>&1; then
    echo "failed: $*" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

# -- hatch, in .venv-tools/
tools="$repo/.venv-tools"
export HATCH_DATA_DIR="$tools/hatch-data" HATCH_CACHE_DIR="$tools/hatch-cache"
if [[ ! -x "$tools/bin/hatch" ]] || [[ "$(cat "$tools/.pin" 2>/dev/null)" != "$HATCH_PIN" ]]; then
  echo "installing $HATCH_PIN into .venv-tools/"
  quietly tools-venv "$PYTHON" -m venv --clear "$tools"
  quietly tools-pip "$tools/bin/python" -m pip install --disable-pip-version-check "$HATCH_PIN"
  echo "$HATCH_PIN" >"$tools/.pin"
fi

# -- build: one wheel and one sdist per package, versions from hatch (each __about__.py)
build() { (cd "packages/$1" && "$tools/bin/hatch" build -t wheel -t sdist "$dist"); }
declare -A VERSION WHEEL
for package in "${ALL[@]}"; do
  version="$(cd "packages/$package" && "$tools/bin/hatch" version 2>>"$work/hatch.log")"
  quietly "build-$package" build "$package"
  wheel="$dist/tightrope_$package-$version-py3-none-any.whl"
  sdist="$dist/tightrope_$package-$version.tar.gz"
  for artefact in "$wheel" "$sdist"; do
    [[ -f "$artefact" ]] || { echo "hatch build made no $artefact" >&2; exit 1; }
  done
  # The sdist must be complete: a wheel built from it holds the same files as hatch's wheel.
  quietly "sdist-$package" "$tools/bin/python" -m pip wheel --disable-pip-version-check \
    --no-deps --no-build-isolation -w "$work/from-sdist" "$sdist"
  # The Tightrope requirements in the wheel's metadata must be the table's.
  "$tools/bin/python" - "$wheel" "$work/from-sdist/$(basename "$wheel")" \
    "${SIBLINGS[$package]}" <<'PY'
import re
import sys
import zipfile
from email.parser import Parser

wheel, from_sdist, siblings = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
with zipfile.ZipFile(wheel) as built, zipfile.ZipFile(from_sdist) as rebuilt:
    files, refiles = set(built.namelist()), set(rebuilt.namelist())
    metadata_name = next(n for n in files if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(built.read(metadata_name).decode())
if files != refiles:
    sys.exit(f"{wheel}: the wheel built from the sdist differs: "
             f"only in hatch's {sorted(files - refiles)}, only in the sdist's "
             f"{sorted(refiles - files)}")
declared = set()
for requirement in metadata.get_all("Requires-Dist") or []:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")
    if name.startswith("tightrope-") and "extra ==" not in requirement:
        declared.add(name.removeprefix("tightrope-"))
if declared != siblings:
    sys.exit(f"{wheel} declares the Tightrope packages {sorted(declared)}; "
             f"scripts/check_standalone.sh expects {sorted(siblings)}: update its SIBLINGS")
PY
  VERSION[$package]="$version"
  WHEEL[$package]="$wheel"
done
echo "built wheel and sdist of ${ALL[*]} with $HATCH_PIN ($((SECONDS - started)) s)"

# -- the base environment: torch and its requirements only, kept in .venv-torch/ between runs
base="$repo/.venv-torch"
base_intact() {
  [[ -x "$base/bin/python" ]] && [[ "$(cat "$base/.pin" 2>/dev/null)" == "$TORCH_PIN" ]] &&
    "$base/bin/python" -m pip freeze --all 2>/dev/null | cmp -s - "$base/.frozen"
}
if ! base_intact; then
  echo "installing $TORCH_PIN into .venv-torch/ (the base of the package environments)"
  quietly base-venv "$PYTHON" -m venv --clear "$base"
  quietly base-torch "$base/bin/python" -m pip install --disable-pip-version-check "$TORCH_PIN"
  "$base/bin/python" -m pip freeze --all 2>/dev/null >"$base/.frozen"
  echo "$TORCH_PIN" >"$base/.pin"
fi
purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
base_site="$("$base/bin/python" -c "$purelib")"

# -- each package alone
for package in "${selected[@]}"; do
  package_started=$SECONDS
  env_dir="$work/env-$package"
  quietly "venv-$package" "$PYTHON" -m venv --without-pip "$env_dir"
  echo "$base_site" >"$("$env_dir/bin/python" -c "$purelib")/tightrope_check_base.pth"
  wheels=("${WHEEL[$package]}")
  for sibling in ${SIBLINGS[$package]}; do
    wheels+=("${WHEEL[$sibling]}")
  done
  quietly "install-$package" "$env_dir/bin/python" -m pip install --disable-pip-version-check \
    "${wheels[@]}"
  quietly "pip-check-$package" "$env_dir/bin/python" -m pip check
  # -I: neither the current folder, PYTHONPATH nor user site-packages reach the import path.
  (cd "$work" && env -u PYTHONPATH "$env_dir/bin/python" -I "$repo/scripts/standalone_smoke.py" \
    "$package" "${VERSION[$package]}" ${SIBLINGS[$package]})
  echo "  ($((SECONDS - package_started)) s)"
done
echo "standalone check done in $((SECONDS - started)) s"
