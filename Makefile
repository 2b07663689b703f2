# Two commands matter: `make quickstart` (the main job, end to end on an embedded local Ray) and `make test`.
SHELL := /bin/bash
VENV := .venv/bin
# Keep every Ray listener on loopback (see docs/TOOLS.md) and never reach a model hub from tests.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup quickstart test test-unit test-integration lint format bench docs

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(VENV)/python -m ray_jobs.quickstart --config configs/quickstart.yaml

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

# The site in docs/ (into site/), warnings as errors; the API page must match the app's routes.
docs: setup
	$(VENV)/python scripts/api_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/mkdocs build --strict --quiet

format: setup
	$(VENV)/ruff format .
	$(VENV)/ruff check --fix .

# Two test processes (TEST_WORKERS), each taking whole files (a file's module fixtures are built once); the
# slowest files go first (tests/conftest.py), so neither process ends long before the other.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup lint docs
	$(VENV)/python -m pytest -q $(PYTEST_PARALLEL) tests

test-unit: setup
	$(VENV)/python -m pytest -q $(PYTEST_PARALLEL) -m "not integration" tests

test-integration: setup
	$(VENV)/python -m pytest -q $(PYTEST_PARALLEL) -m integration tests

# Run as modules (-m) so that benchmarks/tokenize.py never shadows the standard library's tokenize.
bench: setup
	for b in tokenize train render serve; do $(VENV)/python -m benchmarks.$$b || exit 1; done
