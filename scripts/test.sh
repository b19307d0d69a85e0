#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the checks CI runs: ruff, mypy --strict on the packages,
# an install of tightrope-bounds alone into a fresh environment, and the fast test suite (last,
# so that its summary closes the output).
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
.venv/bin/ruff check packages apps tests benchmarks examples scripts conftest.py
echo "== mypy --strict (packages and apps)"
.venv/bin/mypy packages/*/src apps/*/src
echo "== tightrope-bounds installs and runs alone"
scripts/check_standalone.sh
echo "== pytest"
status=0
.venv/bin/python -m pytest "${marker[@]}" "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
