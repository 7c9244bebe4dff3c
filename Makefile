# Two entry points, both idempotent and self-installing:  `make test`  and  `make demo`.
# TORCH_SPEC is installed before anything that depends on torch, so pip never pulls a CUDA build
# by accident; on a GPU machine override it, e.g. `make test TORCH_SPEC=torch LOCK=`.
# Every other package is installed at the exact version of LOCK (requirements/dev.lock, written by
# pip-compile from pyproject.toml: `make lock` refreshes it), so a new upstream release cannot break a
# fresh clone; `make test-latest` runs the suite against the newest releases instead. LOCK= (empty)
# installs without the pins.
PYTHON     ?= python3
VENV       ?= .venv
LATEST_VENV ?= .venv-latest
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC   ?= pip==26.3
LOCK       ?= requirements/dev.lock
PINS        = $(if $(LOCK),-c $(LOCK))
PY          = $(VENV)/bin/python
PYTEST_ARGS ?= -n 2
DEMO_DIR   ?= demo-out
DEMO_STEPS ?= 2000
DEMO_TRAIN_ARGS ?=

.PHONY: test test-latest lock demo bench install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP_SPEC)"

$(VENV)/.installed: $(PY) pyproject.toml setup.py tokenizers_bpe/_native_bpe.c tokenizers_bpe/_unicode_classes.h $(LOCK)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PINS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q $(PINS) -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# lint-imports checks the package graph (pyproject.toml, [tool.importlinter]) before the tests run.
test: $(VENV)/.installed-dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The suite against the newest release of every dependency (no pins; torch stays TORCH_SPEC), in a
# venv of its own: tells early what the next `make lock` would break.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip list --format freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/lint-imports
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

# Re-resolve the pins: the newest releases that pyproject.toml allows, against TORCH_SPEC (which
# requirements/torch.txt records; torch itself stays out of the lock, installed first by TORCH_SPEC).
lock: $(VENV)/.installed-dev
	echo "$(TORCH_SPEC)" > requirements/torch.txt
	$(VENV)/bin/pip-compile --quiet --upgrade --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
		--unsafe-package torch --constraint requirements/torch.txt --output-file requirements/dev.lock pyproject.toml

bench: $(VENV)/.installed-dev
	$(PY) -m pytest benches

# The whole pipeline on the built-in Shakespeare corpus, sized for a 2-core CPU (a few minutes):
# tokenizer -> token files -> a small GPT -> a sample. Starts from scratch each time (idempotent).
demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/bpe-train --builtin shakespeare --vocab-size 4096 --seed 1337 -o $(DEMO_DIR)/tokenizer.json
	$(VENV)/bin/bpe-inspect $(DEMO_DIR)/tokenizer.json
	$(VENV)/bin/gpt-prepare --builtin shakespeare --tokenizer $(DEMO_DIR)/tokenizer.json -o $(DEMO_DIR)/data
	$(VENV)/bin/gpt-train --data $(DEMO_DIR)/data --out $(DEMO_DIR)/run --preset shakespeare-cpu \
		--max-steps $(DEMO_STEPS) --eval-interval 250 --seed 1337 $(DEMO_TRAIN_ARGS)
	$(VENV)/bin/gpt-generate --model $(DEMO_DIR)/run/final "ROMEO:" -n 200 --seed 1

# On a CUDA machine: every CUDA test, each kernel against its PyTorch peer, a 124M training step,
# decoding and a one-process NCCL DDP step, in 8 minutes at most; installs nothing (the GPU machine's
# python already has torch, triton and transformers). Without a CUDA GPU it says so and exits 0.
GPU_CHECK_OUT ?= gpu-check-out
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=. $(PYTHON) -m benches.gpu_check --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .benchmarks $(LATEST_VENV)
