# The two quickstart commands: `make demo` trains SmolLM2 with GRPO end to end; `make test` runs the tests.
# Both set up .venv first (idempotent: a stamp file remembers what was installed).
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test lint reliability-report

setup:
	@bash scripts/setup_env.sh $(VENV)

demo: setup
	$(VENV)/bin/rlhf grpo --config configs/grpo_demo.yaml

test: setup
	$(PYTHON) -m pytest -q

# ruff's configuration is in pyproject.toml ([tool.ruff]); CI runs this before the tests.
lint: setup
	$(VENV)/bin/ruff check .

# The reliability tests (faults injected, bad inputs, services failing, concurrency, security defaults) write what
# they verified to build/reliability.md; the table in README.md is replaced by it.
RELIABILITY_TESTS := tests/test_crash_resume.py tests/test_bad_input.py tests/test_numerical_faults.py \
	tests/test_service_failures.py tests/test_concurrency.py tests/test_security.py tests/test_deployment.py \
	tests/test_config.py tests/test_data.py

reliability-report: setup
	@mkdir -p build
	RLHF_RELIABILITY_REPORT=$(CURDIR)/build/reliability.md $(PYTHON) -m pytest -q $(RELIABILITY_TESTS)
	$(PYTHON) scripts/update_reliability_report.py build/reliability.md README.md
