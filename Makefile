# Every target creates .venv and installs the package on first use, so a fresh clone needs one command.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m rlhfjax.demo --workdir=$${WORKDIR:-/tmp/rlhfjax_demo}

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist load tests

bench: $(STAMP)
	$(BIN)/python -m rlhfjax.bench all

clean:
	rm -rf $(VENV)
