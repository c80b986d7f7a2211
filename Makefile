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

# 1) SFT on a flawed teacher, then GRPO with the math verifier past it;
# 2) SFT on a chatty teacher -> 5,000 simulated human comparisons -> reward model (accuracy printed).
demo: $(STAMP)
	$(BIN)/python -m rlhfjax.main --config=exceed_teacher --workdir=$${WORKDIR:-/tmp/rlhfjax_demo}/verifier
	$(BIN)/python -m rlhfjax.main --config=preference --config.stages=sft,rm \
	  --workdir=$${WORKDIR:-/tmp/rlhfjax_demo}/preference

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist load tests

bench: $(STAMP)
	$(BIN)/python -m rlhfjax.bench all

clean:
	rm -rf $(VENV)
