# `make run`: set everything up and train the default model.  `make test`: set up and run the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spotpipe-installed

.PHONY: run test setup bench clean

setup: $(STAMP)

# torch==2.13.0 is the CPU build that lies on this machine's disk; installing it first keeps pip
# from resolving an unpinned torch to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/spotpipe train

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/runtime_vs_torch.py --quick

clean:
	rm -rf $(VENV) runs
