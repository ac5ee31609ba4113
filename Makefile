# Quick start: `make run` (set up + the digits study: the main job), `make demo` (the ops on the
# paper's shape vs a float64 oracle), `make test` (set up + tests, what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run demo test test-no-interpreter aot clean

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
# Then test-no-interpreter.
TRITON_INTERPRET ?= 1

test: $(PY)
	TRITON_INTERPRET=$(TRITON_INTERPRET) $(PY) -m pytest -q
	$(MAKE) --no-print-directory test-no-interpreter

# Tests that hold on CUDA: the kernel and projector test files with no GPU visible and no
# interpreter must give only passes and skips (a test that pins the Triton backend on CPU tensors
# or assumes the interpreter fails here as it would on a CUDA machine). Cheap: the Triton cases
# skip, the reference cases run again (23-48 s of CPU on a loaded 2-core machine). Left out:
# files that do not run the kernels in this process (AOT / nvcc compiles, benchmark subprocesses,
# the trainer and digits study), and the work-model CLI test, whose subprocess drops
# TRITON_INTERPRET anyway.
NO_INTERPRETER_SKIP := aot csrc_compile benchmarks_smoke bench_entry digits mllm mllm_varres \
	train train_best eval_mme mutants_apply llava gpu_run setup_cuda
test-no-interpreter: $(PY)
	TRITON_INTERPRET=0 CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -p no:cacheprovider \
		$(foreach f,$(NO_INTERPRETER_SKIP),--ignore=tests/test_$(f).py) \
		--deselect tests/test_work_model.py::test_model_cli_rows

aot: $(PY)
	$(PY) -m pargo_kernels.aot

clean:
	rm -rf $(VENV) build *.egg-info
