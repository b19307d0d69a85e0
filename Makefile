# The two commands of the README:
#   make demo   set up .venv/ and run the main job
#   make test   set up .venv/ and run what CI runs (lint, types, fast tests, standalone install)
.PHONY: demo test test-all setup bench lint

demo:
	scripts/demo.sh

test:
	scripts/test.sh

# Everything, the tests marked slow included.
test-all:
	scripts/test.sh --all

setup:
	scripts/setup.sh

# Speed ratios (pytest-benchmark); see benchmarks/README.md.
bench:
	scripts/setup.sh
	.venv/bin/python -m pytest benchmarks --benchmark-only --benchmark-group-by=group
	.venv/bin/python benchmarks/bounds_memory.py

lint:
	scripts/setup.sh
	.venv/bin/ruff check packages apps tests benchmarks examples scripts conftest.py
	.venv/bin/mypy packages/*/src apps/*/src
