# One task runner, used the same way on a laptop and in CI.
#   make run    set up, then run the relay on the embedded Redis with the example config
#   make test   set up, then run the test suite
#   make faults the fault suite (EVENTS=1000 by default): crashes, outages, floods
#   make ci     lint + typecheck + the fault suite, small + test (what .ci/run does)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/relay.example.toml
EVENTS ?= 1000
FAULTS_CI_EVENTS ?= 1000
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup deps venv run test lint typecheck ci bench faults faults-ci clean

setup: deps venv

# The relay's embedded default and the test suite both start a private redis-server;
# the suite also checks the systemd units (systemd-analyze, from Debian's systemd),
# drives the operator page in Debian's chromium (through Playwright, never its own
# browser downloads), runs workers (tests and fault suite) with a skewed clock under
# libfaketime (Debian's faketime),
# and checks the alert rules with promtool, which `make venv` takes
# out of Debian's prometheus package into .venv/bin — installing the package would
# start a Prometheus server.
DEB_TOOLS := redis-server:redis-server systemd-analyze:systemd chromium:chromium faketime:faketime

deps:
	@missing=""; for pair in $(DEB_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,dev]'
	@command -v promtool >/dev/null 2>&1 || [ -x $(BIN)/promtool ] || { \
	  echo "taking promtool from Debian's prometheus package"; \
	  tmp=$$(mktemp -d) && cd $$tmp && \
	  { apt-get download prometheus >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
	  dpkg-deb -x prometheus_*.deb . && cp usr/bin/promtool $(CURDIR)/$(BIN)/ && \
	  cd / && rm -rf $$tmp; }
	@touch $@

run: setup
	$(BIN)/chert-relay --config $(CONFIG) run

test: setup
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench

typecheck: venv
	$(BIN)/mypy

# The fault suite before the tests, so that pytest's summary is the last line CI prints.
ci: setup lint typecheck faults-ci test

# Every scenario of bench/faults at EVENTS events: a table of acked, delivered, lost,
# duplicates, time to settle and restarts (and var/faults.json). Exits 1 on any loss,
# unexpected duplicate or other broken expectation. Scenario 9 mounts a small tmpfs: run
# as root. One scenario: .venv/bin/python -m bench.faults --events 300 --only 11
faults: setup
	@mkdir -p var
	$(BIN)/python -m bench.faults --events $(EVENTS) --json var/faults.json

faults-ci: setup
	$(BIN)/python -m bench.faults --events $(FAULTS_CI_EVENTS)

bench: setup
	$(BIN)/python bench/receiver.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
