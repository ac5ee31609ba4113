"""The test step of ``benchmarks/gpu_run.sh`` in one place: its parallel pytest processes.

Read by ``gpu_run.sh`` (``python3 benchmarks/gpu_steps.py NAME`` prints one pytest argument per
line; ``--names`` the process names) and by ``benchmarks/gpu_plan.py``, which counts what each
process compiles. The benchmark step's order is ``run_all.PHASES``.

The processes run at the same time on disjoint selections (pytest-xdist is not installed on
the lent machine). The Triton profile is split by dtype: dtypes share no compiled kernel, so
each process compiles a third. The ``cuda`` process runs the CUDA extension's tests once the
extension is built: the profile's CUDA cases and the existing CUDA-extension tests.
"""
from __future__ import annotations

import sys

PROFILE = "tests/test_gpu_profile.py"
TEST_PROCS = {
    "triton-fp32": [PROFILE, "-k", "triton and fp32"],
    "triton-fp16": [PROFILE, "-k", "triton and fp16"],
    "triton-bf16": [PROFILE, "-k", "triton and bf16"],
    # after the build: every test of these files whose name or id says "cuda" (all of
    # test_attention_cuda.py; test_pargo_self_attention.py::test_cuda_backend_matches_oracle,
    # test_edge_semantics.py::test_cuda_kernels_edge_semantics, test_pooling.py's [cuda-*]
    # cases and its CUDA refusal test)
    "cuda": [PROFILE, "tests/test_attention_cuda.py", "tests/test_pargo_self_attention.py",
             "tests/test_edge_semantics.py", "tests/test_pooling.py", "-k", "cuda"],
}
CUDA_PROC = "cuda"  # waits for the CUDA extension's build


def main(argv) -> int:
    if argv == ["--names"]:
        print("\n".join(TEST_PROCS))
        return 0
    if len(argv) != 1 or argv[0] not in TEST_PROCS:
        print(f"usage: gpu_steps.py --names | NAME (one of {list(TEST_PROCS)})", file=sys.stderr)
        return 2
    print("\n".join(TEST_PROCS[argv[0]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
