# Turnout: developer entry points.
#
#   make demo       create .venv if needed, then play a release on 127.0.0.1 (turnout demo)
#   make test       create .venv if needed, then run the whole test suite (installs what
#                   the fleet, dashboard and TLS tests run, prometheus, redis-server,
#                   chromium and openssl, when root)
#   make test-unit  only the unit tests: in-process, no subprocess, socket or network
#   make test-live  only the live tests: real loopback sockets and processes
#   make fuzz       differential fuzzing of the HTTP/1.1 framing against h11, pure then compiled
#   make build      compile the forwarding path again (after editing one of its modules)
#   make lint       ruff check + ruff format --check + mypy over all of proxy/ + the layers contract
#   make bench      Turnout vs NGINX with wrk at 256, 64 and 1 connections, then memory per connection,
#                   the core's own µs a request in-process, then HTTP/2 and gRPC with h2load
#                   (installs nginx, wrk and h2load when root)
#   make soak       fault soak: reloads, canary crash, kill -9, broken state, 5,000 connections
#                   (SOAK_ARGS="--quick" for the small sizes, "--only reloads" for one scenario)
#   make guard      the guard's simulations: its calibration, then the comparison with
#                   Flagger, Argo Rollouts and Kayenta on identical traffic (a few minutes)
#   make clean      remove caches and build output; `make distclean` also removes .venv
#
# .venv is (re)installed, which also compiles the forwarding path with mypyc (setup.py),
# when pyproject.toml, setup.py or one of the modules setup.py compiles is newer than
# its stamp file. TURNOUT_PURE=1 installs pure Python instead.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the modules setup.py compiles: a compiled module shadows its source until rebuilt
COMPILED := $(shell sed -n 's/^ *"\(proxy\/.*\.py\)",$$/\1/p' setup.py)

.DEFAULT_GOAL := help
.PHONY: help venv build demo test test-tools test-unit test-live fuzz lint bench soak guard clean distclean

help:
	@sed -n 's/^#   make /make /p' $(MAKEFILE_LIST)

venv: $(STAMP)

build: venv

$(STAMP): pyproject.toml setup.py $(COMPILED)
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -e '.[test,bench]'
	@touch $@

demo: venv
	$(BIN)/turnout demo

# The fleet tests (tests/test_fleet*.py) run a real Prometheus and a real Redis, and the
# dashboard's (tests/test_dashboard.py) a real Chromium: Debian's.
TEST_TOOLS := prometheus redis-server chromium openssl

test-tools:
	@missing=""; for t in $(TEST_TOOLS); do \
	  command -v $$t >/dev/null 2>&1 || [ -x /usr/bin/$$t ] || missing="$$missing $$t"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "test-tools: installing$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -q --no-install-recommends $$missing </dev/null; \
	  else \
	    echo "test-tools:$$missing missing and this is not root:" \
	         "sudo apt-get install$$missing (the fleet tests need them)"; \
	  fi; \
	fi

test: venv test-tools
	$(BIN)/pytest -q
	@echo "the forwarding tests again, on the pure Python sources (TURNOUT_PURE=1):"
	TURNOUT_PURE=1 $(BIN)/pytest -q tests/test_forwarding.py tests/test_headers.py tests/test_mirror.py \
	  tests/test_framing.py tests/test_limits.py tests/test_hostile.py tests/test_core.py \
	  tests/test_phases.py

test-unit: venv
	$(BIN)/pytest -q -m unit

test-live: venv test-tools
	$(BIN)/pytest -q -m live

# `make test` runs tests/test_fuzz.py with 300 examples; this runs FUZZ_EXAMPLES per test
# on each build, collecting every disagreement (survey mode) instead of stopping at the
# first; both runs happen even when the first fails. Each prints `fuzz ...: N examples, ...`.
FUZZ_EXAMPLES ?= 100000
FUZZ_ENV := TURNOUT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) TURNOUT_FUZZ_SURVEY=1

fuzz: venv
	@status=0; \
	echo "fuzz: pure Python build (TURNOUT_PURE=1), $(FUZZ_EXAMPLES) examples per test"; \
	TURNOUT_PURE=1 $(FUZZ_ENV) $(BIN)/pytest -q -m fuzz tests/test_fuzz.py || status=1; \
	echo "fuzz: compiled build, $(FUZZ_EXAMPLES) examples per test"; \
	$(FUZZ_ENV) $(BIN)/pytest -q -m fuzz tests/test_fuzz.py || status=1; \
	exit $$status

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# 256, 64 and 1 connections, 5 interleaved rounds; then the memory per connection
BENCH_ARGS ?= --connections 256,64,1 --rounds 5

bench: venv
	@if ! command -v nginx >/dev/null 2>&1 || ! command -v wrk >/dev/null 2>&1 || \
	    ! command -v h2load >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light wrk \
	      nghttp2-client; \
	  else \
	    echo "bench: nginx, wrk or h2load is missing and this is not root; install them" \
	         "(sudo apt-get install nginx-light wrk nghttp2-client) for the full comparison"; \
	  fi; \
	fi
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.inproc
	$(BIN)/python -m bench.h2

soak: venv
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

guard: venv
	$(BIN)/python -m bench.guard_sim
	$(BIN)/python -m bench.guard_compare

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -name '*.so' -not -path './$(VENV)/*' -delete
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
