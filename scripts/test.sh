#!/usr/bin/env bash
# Set up (scripts/setup.sh, with --ffcv where FFCV can be built, so its loader's tests run), then
# run the checks CI runs: ruff, mypy --strict on the packages, the hatch build of every library
# and an install of each alone into a fresh environment with a smoke test
# (scripts/check_standalone.sh), and the fast test suite (last, so that its summary closes the
# output).
# Usage: scripts/test.sh [--all] [extra pytest arguments]
#   --all  also runs the tests marked slow (long end-to-end and large property runs).
set -euo pipefail
cd "$(dirname "$0")/.."
# FFCV needs C libraries from apt: built as root (CI) or when they are already there; otherwise
# its tests skip, and this says so.
if [[ "$(id -u)" == "0" ]] || pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  scripts/setup.sh --ffcv
else
  scripts/setup.sh
  echo "FFCV not built (its C libraries need: sudo apt-get install pkg-config libturbojpeg0-dev" \
       "libopencv-dev); the FFCV tests will be skipped" >&2
fi

marker=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then
  marker=()
  shift
fi

echo "== ruff"
.venv/bin/ruff check packages apps tests benchmarks examples scripts conftest.py
echo "== mypy --strict (packages and apps)"
.venv/bin/mypy packages/*/src apps/*/src
echo "== each library builds with hatch, installs and runs alone"
scripts/check_standalone.sh
echo "== pytest"
status=0
.venv/bin/python -m pytest "${marker[@]}" "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
