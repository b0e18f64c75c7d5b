# Developer and CI entry points. `make test` is the README's test command and what CI runs:
# it installs what it needs (Prometheus and Alertmanager from Debian, a Python venv with the
# SDKs and the chdb ClickHouse engine) and runs every suite, the ClickHouse and Prometheus
# ones included.

CARGO ?= cargo
PYTHON ?= python3
VENV ?= .venv
export LLMTAP_CHDB_PYTHON := $(abspath $(VENV))/bin/python

.PHONY: test deps lint fmt clippy unit sdk chdb deploy-rules helm bench-checks run bench-shipper

test: deps lint unit sdk chdb deploy-rules helm bench-checks

# Debian packages the tests drive: Prometheus, promtool and Alertmanager, and systemd's
# systemd-analyze for the unit file (needs root or sudo for apt-get).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && \
	  command -v prometheus-alertmanager >/dev/null && command -v systemd-analyze >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager systemd; }

lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy -q --workspace --all-targets -- -D warnings

unit: $(VENV)/.installed
	$(CARGO) test -q --workspace

$(VENV)/.installed: tests/sdk/requirements.txt tests/chdb/requirements.txt tests/helm/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt -r tests/chdb/requirements.txt \
	  -r tests/helm/requirements.txt
	touch $@

sdk: $(VENV)/.installed
	$(CARGO) build -q --workspace --bins
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/sdk

# The test adapter's own checks (chdb behind ClickHouse's HTTP interface).
chdb: $(VENV)/.installed
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/chdb

# The alerting rules, dashboards and unit file in deploy/: promtool check and unit tests of the
# Prometheus rules, the Grafana alert and dashboard checks, every dashboard query run on the
# ClickHouse engine (chdb) against the schema `llmtap migrate --dry-run` prints, and the systemd
# unit verified and its ExecStart run (needs promtool and systemd-analyze, from `deps`, and the
# debug binary, built here).
deploy-rules: $(VENV)/.installed
	$(CARGO) build -q -p llmtap --bin llmtap
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/deploy

# The Helm chart: helm lint and template (helm from the venv), and the rendered proxy
# container run against the built binary.
helm: $(VENV)/.installed
	$(CARGO) build -q --workspace --bins
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/helm

# The benchmark harness's target verdicts, on hand-made rows (no build, no load).
bench-checks: $(VENV)/.installed
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/bench

run:
	$(CARGO) run --release -p llmtap -- serve

bench-shipper: $(VENV)/.installed
	$(CARGO) bench -p llmtap-ingest --bench shipper
