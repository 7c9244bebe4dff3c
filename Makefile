# Two entry points, both idempotent and self-installing:  `make test`  and  `make demo`.
# TORCH_SPEC is installed before anything that depends on torch, so pip never pulls a CUDA build
# by accident; on a GPU machine override it, e.g. `make test TORCH_SPEC=torch`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY          = $(VENV)/bin/python
PYTEST_ARGS ?= -n 2
DEMO_DIR   ?= demo-out

.PHONY: test demo bench install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: $(VENV)/.installed-dev
	$(PY) -m pytest benches

demo: $(VENV)/.installed
	$(VENV)/bin/bpe-train --builtin shakespeare --vocab-size 4096 --seed 1337 -o $(DEMO_DIR)/tokenizer.json
	$(VENV)/bin/bpe-inspect $(DEMO_DIR)/tokenizer.json

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .benchmarks
