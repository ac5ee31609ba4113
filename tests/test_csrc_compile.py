"""Every CUDA kernel source in csrc/ compiles with a bare ``nvcc -c`` (no torch headers) for
sm_80 and sm_90, without register spills or local memory (``--resource-usage``).

The binding file csrc/bindings.cpp needs torch headers and is built by setup.py only.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
if NVCC and not os.path.exists(NVCC):
    NVCC = None

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (not on PATH, no CUDA_HOME)")


def parse_resource_usage(text: str) -> list[dict]:
    """One dict per compiled kernel: name, registers, stack, spill stores/loads, local bytes."""
    kernels, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = dict(name=m.group(1), registers=0, stack=0, spill_stores=0, spill_loads=0,
                           lmem=0)
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes lmem", line)
        if m:
            current["lmem"] = int(m.group(1))
    return kernels


def test_csrc_has_kernel_sources():
    assert SOURCES, "csrc/ has no .cu files"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("source", [os.path.basename(s) for s in SOURCES])
def test_cuda_source_compiles_without_spills(source, arch, tmp_path):
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "--use_fast_math",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "--resource-usage",
           "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", source),
           "-o", str(tmp_path / f"{source}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {source} (sm_{arch}):\n{out[-4000:]}"
    kernels = parse_resource_usage(out)
    assert kernels, f"no ptxas resource usage in the nvcc output:\n{out[-2000:]}"
    bad = [k for k in kernels if k["spill_stores"] or k["spill_loads"] or k["lmem"] or k["stack"]]
    assert not bad, f"register spills / local memory on sm_{arch}: {bad}"
    for k in kernels:
        print(f"sm_{arch} {k['registers']:3d} regs, {k['stack']} B stack, "
              f"{k['spill_stores']}/{k['spill_loads']} B spill st/ld  {k['name']}")
