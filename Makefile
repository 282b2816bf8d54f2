# The two quickstart commands: `make demo` trains SmolLM2 with GRPO end to end; `make test` runs the tests.
# Both set up .venv first (idempotent: a stamp file remembers what was installed).
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test lint docs reliability-report

setup:
	@bash scripts/setup_env.sh $(VENV)

demo: setup
	$(VENV)/bin/rlhf grpo --config configs/grpo_demo.yaml

test: setup
	$(PYTHON) -m pytest -q

# ruff's configuration is in pyproject.toml ([tool.ruff]); CI runs this before the tests.
lint: setup
	$(VENV)/bin/ruff check .

# The docs site (mkdocs.yml, docs/) into site/; --strict: a broken link, anchor or a page left out of nav fails.
# docs/reference/ is generated: `$(PYTHON) scripts/docs_reference.py` (tests/test_docs.py checks it is current).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The reliability tests (faults injected, bad inputs, services failing, concurrency, security defaults) write what
# they verified to build/reliability.md; the table in docs/reliability.md is replaced by it.
RELIABILITY_TESTS := tests/test_crash_resume.py tests/test_bad_input.py tests/test_numerical_faults.py \
	tests/test_service_failures.py tests/test_concurrency.py tests/test_security.py tests/test_deployment.py \
	tests/test_config.py tests/test_data.py tests/test_cli.py tests/test_early_errors.py tests/test_io.py \
	tests/test_update.py tests/test_tracking_uri.py tests/test_human_pause.py

reliability-report: setup
	@mkdir -p build
	RLHF_RELIABILITY_REPORT=$(CURDIR)/build/reliability.md $(PYTHON) -m pytest -q $(RELIABILITY_TESTS)
	$(PYTHON) scripts/update_reliability_report.py build/reliability.md docs/reliability.md
