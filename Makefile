# The two commands a person needs: `make serve` and `make test`. Both work from a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= smollm2:135m
export TURBOFAN_MODELS ?= $(CURDIR)/.models

.PHONY: install serve test test-fast test-avx2 lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU wheel; a range it satisfies then installs nothing more.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'  # ray: tests/test_replicas.py's Ray tests (~70 s) run, not skip
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/turbofan serve $(MODEL)

test: install
	$(BIN)/turbofan pull smollm2:135m
	$(BIN)/turbofan pull gemma3:270m
	$(BIN)/turbofan pull all-minilm
	$(BIN)/ruff check turbofan tests
	$(BIN)/python -m pytest -q -ra tests

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

# The fast suite on the AVX2 code paths (ATen's kernels, MKL's, and our own kernels, which follow ATen's cap), so CI
# covers both ISAs whatever the host: on an AVX-512 host `make test` runs AVX-512, this runs AVX2.
# The compiled tier keeps one Inductor code cache per CPU capability (see assembly.compile_cache_dir), so the two
# runs never share compiled C++.
test-avx2: install
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: install
	$(BIN)/python -m turbofan.bench.offline
