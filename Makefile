# nxlink-openapi-proxy: `make run` to start (demo mode without tenants), `make test` to check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

install: $(STAMP)

# constraints.txt pins every package, direct or not, to the versions the tests last passed
# with, so a fresh install a month from now still passes (pyproject.toml keeps the ranges).
$(STAMP): pyproject.toml proxy/__init__.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: install
	$(BIN)/nxlink-proxy serve --demo

lint: install
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

# The admin console's browser test drives Debian's headless Chromium through chromedriver;
# the README's admin examples are run with curl.
test: lint
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver && command -v curl >/dev/null || \
	  (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver curl)
	$(BIN)/python -m pytest -q

# wrk is the load generator (C, event-driven: the client is never the bottleneck);
# nginx-light gives the plain reverse-proxy baseline; valgrind counts instructions per
# request, a figure the machine's noise cannot move. All come from Debian's packages.
bench: install
	command -v wrk >/dev/null && (command -v nginx || test -x /usr/sbin/nginx) >/dev/null && \
	  command -v valgrind >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light valgrind)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
