# Every target creates .venv and installs the package on first use, so a fresh clone needs one command.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-peers clean

# glibc backs large allocations with transparent huge pages: XLA:CPU maps each call's temporaries
# afresh, and with 4 KiB pages pays a page fault per 4 KiB every call (README, "Install by hand").
# Glibc without the tunable ignores it; set GLIBC_TUNABLES yourself to override.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

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

# TRL GRPOTrainer / PPOTrainer and Tunix GRPOLearner vs `rlhfjax.bench rl_iteration` on the same work,
# run alternately (benchmarks/peers/README.md); each peer gets benchmarks/peers/.venv-<name> on first use.
# PEERS_ARGS, e.g. "--rounds=3 --iters=3 --peers=trl_grpo --workloads=default".
bench-peers: $(STAMP)
	$(BIN)/python benchmarks/peers/run.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV)
