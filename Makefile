# Two commands do all set-up on a fresh Debian 12 machine as root:
#   make demo   -- the lab, then deploy.ipynb on it (run folder under runs/)
#   make test   -- the lab, then every test (unit, lab, notebooks via papermill and nbval)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/lab.yaml
PYTEST_ARGS ?=

.PHONY: all venv lab-up lab-down lab-status demo test test-unit nbval lab-ui bench clean

all: test

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || (apt-get update -qq && apt-get install -y -qq python3 python3-venv)
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || (apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV))
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

# The package's bytecode, written even where PYTHONDONTWRITEBYTECODE is set: each of a run's three
# processes (CLI, two kernels) would otherwise compile runbook_lib again (~0.08 s each).
venv: $(VENV)/.installed
	@$(PY) -m compileall -q runbook_lib

lab-up: venv
	$(PY) -m runbook_lib.lab up

lab-down: venv
	$(PY) -m runbook_lib.lab down

lab-status: venv
	$(PY) -m runbook_lib.lab status

demo: lab-up
	$(VENV)/bin/runbook deploy -f $(PARAMS)

# One state dir (CA, registry password) for pytest and nbval: nbval's notebooks then talk
# to the deployment the tests left on the lab.
test: export RUNBOOK_STATE_DIR ?= $(CURDIR)/.test-state
test: lab-up
	$(VENV)/bin/pytest $(PYTEST_ARGS)
	$(VENV)/bin/pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider notebooks/*.ipynb

test-unit: venv
	$(VENV)/bin/pytest -m "not lab" $(PYTEST_ARGS)

lab-ui: lab-up
	$(VENV)/bin/runbook lab-ui

bench: lab-up
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
