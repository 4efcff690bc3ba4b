# Two entry points a newcomer needs: `make demo` and `make test`.
# Each creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test fuzz lint proto bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m gradmix.demo

test: $(STAMP)
	bash scripts/install_system_deps.sh
	$(PY) -m pytest -q --durations=25

# The unit tests only (seconds): for the edit-test loop; `make test` runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

# Property-based fuzzing of every RPC on a real server, 1000 cases per RPC
# (the default `make test` runs 10 per RPC).
fuzz: $(STAMP)
	GRADMIX_FUZZ_EXAMPLES=1000 $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_fuzz.py

# mypy checks the `gradmix.*` packages as they are imported: build/mypy/gradmix
# links each to its folder (pyproject's package-dir), since mypy cannot follow
# the editable install's import hook; pyproject sets mypy_path and packages.
MYPY_TREE := build/mypy/gradmix
MYPY_PACKAGES := server client store trainer demo vocabulary proto

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	mkdir -p $(MYPY_TREE)
	for p in $(MYPY_PACKAGES); do ln -sfn ../../../$$p $(MYPY_TREE)/$$p; done
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench/*.py  # scripts, not a package: checked as files

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) build dist *.egg-info
