# `make demo` and `make test` each set up .venv (idempotently) and link the sample assets.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared/data

.PHONY: setup demo test test-slow lint clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed
	@bash scripts/link_data.sh $(SHARED)

demo: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun wandb .pytest_cache
