# One task runner, used the same way on a laptop and in CI.
#   make run    set up what running needs, then run the relay on the embedded Redis with
#               the example config
#   make test   set up everything the tests need, then run the test suite
#   make faults the fault suite (EVENTS=1000 by default): crashes, outages, floods
#   make ci     lint + typecheck + the fault suite, small + test (what .ci/run does)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/relay.example.toml
EVENTS ?= 1000
FAULTS_CI_EVENTS ?= 1000
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup setup-run deps deps-run venv venv-dev run test lint typecheck ci bench faults faults-ci clean

# Two set-ups. `make run` takes only what running needs: Debian's redis-server (for the
# embedded default) and the package with its runtime dependencies. Everything else —
# the test and dev extras (pytest, Playwright, mypy, ruff…), the Debian tools below and
# promtool — is for `make test`, `make ci` and the benchmarks, through `make setup`.
setup-run: deps-run venv
setup: deps venv-dev

# The relay's embedded default and the test suite both start a private redis-server;
# the suite also checks the systemd units (systemd-analyze, from Debian's systemd),
# drives the operator page in Debian's chromium (through Playwright, never its own
# browser downloads), runs workers (tests and fault suite) with a skewed clock under
# libfaketime (Debian's faketime), sends deliveries through a real forward proxy
# (tinyproxy, started by the tests on a free port: Debian's tinyproxy-bin, the program
# without the service that the tinyproxy package would start),
# and checks the alert rules with promtool, which `make venv-dev` takes
# out of Debian's prometheus package into .venv/bin — installing the package would
# start a Prometheus server.
# The broker sinks' tests start a private nats-server (Debian's nats-server) and
# RabbitMQ node (Debian's rabbitmq-server, which brings Erlang and epmd) on free ports
# (tests/support/brokers.py). Installing them may start system ones as well:
# rabbitmq-server's postinst starts its service through invoke-rc.d, which a
# container's policy-rc.d (Debian's Docker images have one) denies, but which on a
# machine running systemd (or with no policy-rc.d, through the init script) leaves a
# system RabbitMQ on 5672 with epmd on 4369; nats-server's starts its unit (on
# 127.0.0.1:4222) only under systemd. Harmless to the tests: their servers take free
# ports and an epmd of their own, never these. Both install /usr/sbin commands, so
# the check below also looks in sbin (not on a non-root user's PATH).
RUN_DEB_TOOLS := redis-server:redis-server
DEB_TOOLS := $(RUN_DEB_TOOLS) systemd-analyze:systemd chromium:chromium faketime:faketime \
	nats-server:nats-server rabbitmq-server:rabbitmq-server tinyproxy:tinyproxy-bin

# $(call apt_missing,COMMAND:PACKAGE …): apt-get install the packages whose command is
# not on PATH (or in sbin). DEBIAN_FRONTEND goes through `env` after sudo, whose
# env_reset would drop it if set before.
define apt_missing
@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; for pair in $(1); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

deps-run:
	$(call apt_missing,$(RUN_DEB_TOOLS))

deps:
	$(call apt_missing,$(DEB_TOOLS))

PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

# The package and its runtime dependencies only.
venv: $(VENV)/.installed-run

$(VENV)/.installed-run: pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	@touch $@

# Plus the test and dev extras, and promtool. It includes the runtime set-up, so it
# stamps that one too.
venv-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test,dev]'
	@command -v promtool >/dev/null 2>&1 || [ -x $(BIN)/promtool ] || { \
	  echo "taking promtool from Debian's prometheus package"; \
	  tmp=$$(mktemp -d) && cd $$tmp && \
	  { apt-get download prometheus >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
	  dpkg-deb -x prometheus_*.deb . && cp usr/bin/promtool $(CURDIR)/$(BIN)/ && \
	  cd / && rm -rf $$tmp; }
	@touch $@ $(VENV)/.installed-run

run: setup-run
	$(BIN)/chert-relay --config $(CONFIG) run

test: setup
	$(BIN)/pytest -q

lint: venv-dev
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench

typecheck: venv-dev
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
