# mmret: `make demo` and `make test` each build .venv on first use, install the project, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
# The pair that works from this machine's disk; override on other machines, e.g. TORCH_PKGS="torch torchvision".
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.mmret-installed

.PHONY: demo test test-fast test-gpu lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PKGS)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/mmret demo

# Every tier that can run without a GPU: default, slow, ddp, slurm.
test: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not gpu and not slow and not ddp and not slurm" $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# ruff (lint + format) and the layers of mmret/ (import-linter's contract in pyproject.toml: imports point down).
lint: $(STAMP)
	$(VENV)/bin/ruff check mmret tests experiments
	$(VENV)/bin/ruff format --check mmret tests experiments
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) data runs
