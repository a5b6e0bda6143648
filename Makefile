# One task runner, used the same way on a laptop and in CI.
#   make run    set up, then run the relay on the embedded Redis with the example config
#   make test   set up, then run the test suite
#   make ci     lint + typecheck + test (what .ci/run does)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/relay.example.toml
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup deps venv run test lint typecheck ci bench clean

setup: deps venv

# The relay's embedded default and the test suite both start a private redis-server.
deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,dev]'
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

ci: setup lint typecheck test

bench: setup
	$(BIN)/python bench/receiver.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
