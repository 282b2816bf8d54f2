# The two quickstart commands: `make demo` trains SmolLM2 with GRPO end to end; `make test` runs the tests.
# Both set up .venv first (idempotent: a stamp file remembers what was installed).
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test

setup:
	@bash scripts/setup_env.sh $(VENV)

demo: setup
	$(VENV)/bin/rlhf grpo --config configs/grpo_demo.yaml

test: setup
	$(PYTHON) -m pytest -q
