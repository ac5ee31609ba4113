"""Every CUDA kernel source in csrc/ compiles with a bare ``nvcc -c`` (no torch headers) for
sm_80 and sm_90, without register spills or local memory (``--resource-usage``), and the
attention kernels run their products on tensor cores (HMMA in the SASS, read with
``cuobjdump -sass``; the PTX ``mma.sync`` instead when no cuobjdump is found).

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

# Kernels that must issue tensor-core instructions (every attention kernel does its products
# with mma.sync m16n8k16).
TENSOR_CORE_KERNELS = ("attn_fwd_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel")


def _find_cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    if NVCC:
        beside = os.path.join(os.path.dirname(NVCC), "cuobjdump")
        if os.path.exists(beside):
            return beside
    try:  # Triton ships one
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "cuobjdump")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    return None


def sass_functions(text: str) -> dict:
    """``cuobjdump -sass`` output -> {mangled function name: its SASS}."""
    funcs, name, lines = {}, None, []
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if name:
                funcs[name] = "\n".join(lines)
            name, lines = m.group(1), []
        elif name:
            lines.append(line)
    if name:
        funcs[name] = "\n".join(lines)
    return funcs


def _check_tensor_cores(source: str, arch: int, obj, tmp_path) -> None:
    if not any(k in open(os.path.join(ROOT, "csrc", source)).read()
               for k in TENSOR_CORE_KERNELS):
        return
    cuobjdump = _find_cuobjdump()
    if cuobjdump:
        proc = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        funcs = {n: f for n, f in sass_functions(proc.stdout).items()
                 if any(k in n for k in TENSOR_CORE_KERNELS)}
        assert funcs, f"no attention kernel in the SASS of {source} (sm_{arch})"
        without = [n for n, f in funcs.items() if "HMMA" not in f]
        assert not without, f"attention kernels without tensor-core HMMA on sm_{arch}: {without}"
        return
    ptx = tmp_path / f"{source}.ptx"
    proc = subprocess.run([NVCC, "-ptx", "-O3", "-std=c++17", f"-arch=compute_{arch}", "-I",
                           os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", source), "-o",
                           str(ptx)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mma.sync.aligned.m16n8k16" in ptx.read_text(), f"no mma.sync in the PTX of {source}"


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
    obj = tmp_path / f"{source}.o"
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "--use_fast_math", "--threads", "1",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "--resource-usage",
           "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", source),
           "-o", str(obj)]
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
    _check_tensor_cores(source, arch, obj, tmp_path)


def test_attention_sources_are_compiled():
    """The attention kernels are among the sources compiled above (and by setup.py's glob)."""
    names = {os.path.basename(s) for s in SOURCES}
    assert {"attention_fwd.cu", "attention_bwd.cu"} <= names, names


def test_sass_parser():
    text = ("\tcode for sm_90\n\t\tFunction : _Z3fooPf\n\t/*0000*/ HMMA.16816.F32 R0, R2, R4, R0 ;\n"
            "\t\tFunction : _Z3barPf\n\t/*0000*/ FFMA R0, R1, R2, R3 ;\n")
    funcs = sass_functions(text)
    assert set(funcs) == {"_Z3fooPf", "_Z3barPf"}
    assert "HMMA" in funcs["_Z3fooPf"] and "HMMA" not in funcs["_Z3barPf"]
