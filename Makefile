# Quick start: `make run` (set up + the digits study: the main job), `make demo` (the ops on the
# paper's shape vs a float64 oracle), `make test` (set up + tests, what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run demo test aot clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

setup: $(PY)

# Main job: the detail-perception study (models/digits): CPU -> reduced profile (minutes),
# GPU -> full profile. Results (table, JSON, PNGs) in runs/digits_<profile>/.
run: $(PY)
	$(PY) -m models.digits.run --profile auto

# The ParGo op on the paper's shape, checked against the float64 oracle, then the
# benchmark harness (real timings on a GPU; a correctness-only smoke run on a CPU).
demo: $(PY)
	$(PY) -m pargo_kernels.demo

# The CPU run (what CI runs): the Triton kernels under Triton's interpreter, chosen here, never by
# the tests. On a GPU machine: `make test TRITON_INTERPRET=0` (compiled kernels on CUDA tensors).
TRITON_INTERPRET ?= 1

test: $(PY)
	TRITON_INTERPRET=$(TRITON_INTERPRET) $(PY) -m pytest -q

aot: $(PY)
	$(PY) -m pargo_kernels.aot

clean:
	rm -rf $(VENV) build *.egg-info
