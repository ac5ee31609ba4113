# Quick start: `make demo` (set up + main job), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test aot clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

setup: $(PY)

# Main job: the ParGo op on the paper's shape, checked against the float64 oracle, then the
# benchmark harness (real timings on a GPU; a correctness-only smoke run on a CPU).
demo: $(PY)
	$(PY) -m pargo_kernels.demo

test: $(PY)
	$(PY) -m pytest -q

aot: $(PY)
	$(PY) -m pargo_kernels.aot

clean:
	rm -rf $(VENV) build *.egg-info
