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

# System programs the tests need, installed from Debian's packages when one is missing:
# openssl (the TLS tests' certificates), promtool (Debian's prometheus: checks and unit-tests
# deploy/prometheus-alerts.yml), chromium + chromedriver (the admin console's browser test),
# curl (the README's admin examples) and redis-server (the Redis state backend's tests).
TEST_PROGRAMS := openssl promtool chromium chromedriver curl redis-server
TEST_PACKAGES := openssl prometheus chromium chromium-driver curl redis-server

test: lint
	@missing=""; for program in $(TEST_PROGRAMS); do \
	  command -v $$program >/dev/null || missing="$$missing $$program"; done; \
	  if [ -n "$$missing" ]; then echo "installing what the tests need:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PACKAGES); fi
	$(BIN)/python -m pytest -q

# wrk is the load generator (C, event-driven: the client is never the bottleneck);
# nginx-light gives the plain reverse-proxy baseline; valgrind counts instructions per
# request, a figure the machine's noise cannot move; redis-server backs the state figures
# (python -m bench.state). All come from Debian's packages.
bench: install
	command -v wrk >/dev/null && (command -v nginx || test -x /usr/sbin/nginx) >/dev/null && \
	  command -v valgrind >/dev/null && command -v redis-server >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq wrk nginx-light valgrind redis-server)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.state

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
