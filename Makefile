# Developer and CI entry points. `make test` is the README's test command and what CI runs:
# it installs what it needs (a Python venv with the SDKs) and runs every suite.

CARGO ?= cargo
PYTHON ?= python3
VENV ?= .venv

.PHONY: test lint fmt clippy unit sdk run

test: lint unit sdk

lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy -q --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test -q --workspace

$(VENV)/.installed: tests/sdk/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt
	touch $@

sdk: $(VENV)/.installed
	$(CARGO) build -q --workspace --bins
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/sdk

run:
	$(CARGO) run --release -p llmtap -- serve
