# The two commands of the README:
#   make quickstart   set up everything, then run the quickstart experiment
#   make test         set up everything, then run the test suite
SHELL := /bin/bash
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: setup quickstart test bench clean-cache

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/apexdsp quickstart

# Two workers, one test file each at a time (module fixtures built once): on a 2-core machine the suite's
# subprocess starts, model loads and servers overlap instead of queueing.
TEST_WORKERS ?= 2

test: setup
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/lm_throughput.py

clean-cache:
	rm -rf .apexdsp
