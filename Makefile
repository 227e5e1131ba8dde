# LLM Paper Lab. Every target creates or refreshes .venv by itself, so on a fresh machine
# `make lab` and `make test` are the whole set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2
PORT ?= 8888
# Jupyter refuses to run as root unless told; CI runs as root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
NB ?=

.PHONY: lab test lint unit notebooks contract book run bench clean-data help

help:
	@echo "make lab            open JupyterLab on notebooks/ (localhost, token auth)"
	@echo "make test           lint + unit/property tests + every notebook in smoke mode + contract checks"
	@echo "make book           run every notebook in full mode -> data/book/*.html, data/scoreboard.json"
	@echo "make run NB=<slug>  run one notebook in full mode -> data/book/<slug>.html"
	@echo "make bench          kernel benchmark table (python -m ci.bench)"

# (Re)install when pyproject.toml changes or the venv is missing.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llm-paper-lab)" >/dev/null
	@touch $(STAMP)

lab: $(STAMP)
	$(PY) -m jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 --ServerApp.port=$(PORT) --no-browser $(ALLOW_ROOT)

lint: $(STAMP)
	$(PY) -m ruff check .

# The real-browser tests run after the others, alone: each drives a whole notebook and a browser,
# and sharing the cores with the other tests' workers made them flaky.
unit: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m "not browser" tests
	$(PY) -m pytest -q -m browser tests

notebooks: $(STAMP)
	$(PY) -m ci.run_notebooks --jobs $(JOBS)

contract: $(STAMP)
	$(PY) -m ci.check_contract
	$(PY) -m ci.catalogue --check

test: lint unit notebooks contract

book: $(STAMP)
	$(PY) -m ci.book --jobs $(JOBS)

run: $(STAMP)
	@test -n "$(NB)" || { echo "usage: make run NB=<slug>"; exit 2; }
	$(PY) -m ci.book --only $(NB)

bench: $(STAMP)
	$(PY) -m ci.bench --json data/bench.json

clean-data:
	rm -rf data/zoo data/claims.jsonl data/runs
