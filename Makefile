# `make run` trains the quickstart recipe; `make test` runs the test suite.
# Both create .venv and install the project into it when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed compiles its CPU all-reduce op (deepspeed_shm_comm) the first time a process group starts on the
# CPU, about 2 min on 2 cores, and again whenever the environment's path changes. It is built into the
# environment when it is installed, so that no test's time window includes the build.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: run test test-all clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,deepspeed,transformers]'
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/goyal-train recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) runs data/generated
