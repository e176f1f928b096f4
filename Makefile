# milstudy — two commands: `make reproduce` (the whole study, cpu profile) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= cpu
JOBS ?= 1
KERNEL := milstudy

.PHONY: venv reproduce test smoke lab bench clean-results

# Re-installs only when pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; milstudy needs Python 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-cache-dir -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (milstudy)" >/dev/null
	@touch $(STAMP)

venv: $(STAMP)

reproduce: venv
	$(BIN)/milstudy data synth --profile $(PROFILE)
	$(BIN)/milstudy run --all --profile $(PROFILE) --jobs $(JOBS) ; status=$$? ; \
	$(BIN)/milstudy report --profile $(PROFILE) ; exit $$status

test: venv
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

smoke: venv
	$(BIN)/milstudy run --all --profile smoke

lab: venv
	$(BIN)/jupyter lab --notebook-dir=notebooks

bench: venv
	$(BIN)/pip install --quiet --no-cache-dir -e '.[test,bench]'  # torchmil for `milstudy bench peer`
	$(BIN)/milstudy bench --all

clean-results:
	rm -rf results/smoke results/cpu results/interactive
