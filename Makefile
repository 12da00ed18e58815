# Two commands on a fresh Linux machine with Python 3.11: `make demo` and `make test`.
# Each target bootstraps .venv itself; installs are pinned by constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --progress-bar off -c constraints.txt

# Kubernetes artefact checkers live in their own venv: helm-sdkpy needs Python >= 3.12, and checkov's
# dependency set must not constrain the runtime's.
# (pyenv shims exist for versions that are not selected, so each candidate must actually run.)
PYTHON_TOOLS ?= $(shell for p in $$(command -v python3.12) $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null); do $$p -c 'import sys' 2>/dev/null && echo $$p && break; done)
TOOLS  := .venv-tools

.PHONY: demo test lint install install-dev tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $(VENV)/.installed $@

$(TOOLS)/.installed: tools-requirements.txt charts/tools/install-helm.sh
	test -n "$(PYTHON_TOOLS)" || { echo "Python 3.12 is needed for the Kubernetes checkers (helm-sdkpy)"; exit 1; }
	$(PYTHON_TOOLS) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --progress-bar off -r tools-requirements.txt
	charts/tools/install-helm.sh $(TOOLS)/bin
	touch $@

tools: $(TOOLS)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/modelcommons demo $(DEMO_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(VENV)/.installed-dev $(TOOLS)/.installed lint
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
