#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the checks CI runs: ruff, mypy --strict on the packages,
# the fast test suite, and an install of tightrope-bounds alone into a fresh environment.
# Usage: scripts/test.sh [--all] [extra pytest arguments]
#   --all  also runs the tests marked slow (long end-to-end and large property runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

marker=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then
  marker=()
  shift
fi

echo "== ruff"
.venv/bin/ruff check packages apps tests benchmarks examples scripts
echo "== mypy --strict (packages)"
.venv/bin/mypy packages/*/src
echo "== pytest"
status=0
.venv/bin/python -m pytest "${marker[@]}" "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
if [[ $status -ne 0 ]]; then
  exit "$status"
fi
echo "== tightrope-bounds installs and runs alone"
scripts/check_standalone.sh
