"""Compile every Triton kernel of the package ahead of time, without a GPU.

    python -m pargo_kernels.aot [--arch 75 80 86 89 90] [--jobs N] [--filter SUBSTR ...] [--json FILE]

For each launch configuration the launchers can choose (``aot_specs()`` of each kernel module)
and each target architecture, compiles to PTX and cubin with Triton's own toolchain, reads the
registers, stack frame and spill stores/loads from ``ptxas -v`` (Triton's bundled ptxas), the
shared memory from the compile metadata, and the tensor-core instructions (``mma`` / ``wgmma``)
from the PTX.

Exits non-zero on a compile failure, a register spill, shared memory above the architecture's
per-block limit (``SMEM_LIMIT``), a kernel using ``tl.dot`` on 16-bit inputs whose PTX has no
tensor-core instruction, or an fp32 configuration whose PTX has one (fp32 is computed exactly:
a TF32 ``mma`` there is a silent precision loss). Must run with ``TRITON_INTERPRET`` unset.

A module's ``aot_specs(arch)`` yields what its launchers can choose on that architecture (a
module whose ``aot_specs()`` takes no argument yields the same list for every architecture);
what a dispatcher refuses on an architecture (e.g. 16-bit attention below sm_80) is not listed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# Modules that define ``aot_specs()``; each new kernel module adds itself here.
KERNEL_MODULES = ["pargo_kernels.ops.attention_triton", "pargo_kernels.ops.pool_triton",
                  "pargo_kernels.ops.varlen_pool_triton", "pargo_kernels.ops.varlen_triton"]
ARCHS = (75, 80, 86, 89, 90)
# Shared memory a block may use (opt-in maximum), bytes: sm_75 64 KB, sm_86/89 99 KB,
# sm_80 163 KB, sm_90 227 KB (CUDA C Programming Guide, compute capabilities table).
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class Row:
    kernel: str
    config: str
    arch: int
    registers: int = -1
    spill_bytes: int = -1
    stack_bytes: int = -1
    shared_bytes: int = -1
    tensor_cores: str = ""
    error: str = ""
    ok: bool = False


def _specs(filter_: str, arch: int):
    import importlib
    import inspect
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        per_arch = len(inspect.signature(mod.aot_specs).parameters) > 0
        for kernel, pointer_types, constexprs, options, label in (
                mod.aot_specs(arch) if per_arch else mod.aot_specs()):
            name = kernel.fn.__name__
            if filter_ and not any(f in f"{name} {label}" for f in filter_):
                continue
            yield mod_name, name, pointer_types, constexprs, options, label


def launch_signature(kernel, pointer_types: dict, constexprs: dict):
    """Signature, constants and attributes of a launch on contiguous, 16-byte aligned tensors
    whose inner dims are multiples of 16 elements, the way Triton's launcher specialises it:
    pointers and strides divisible by 16 get ``tt.divisibility``, unit strides become constants.

    Naming convention of the package's kernels: pointers are the keys of ``pointer_types``;
    strides are ints named ``s<tensor><dim>``, the innermost one ending in ``d`` (or ``c``).
    Other ints (sizes, mask scalars) are ``do_not_specialize``; floats are named ``*scale*``.
    """
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(kernel.params):
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = f"*{pointer_types[name]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif "scale" in name:
            signature[name] = "fp32"
        elif name.startswith("s") and name[-1] in "dc" and len(name) <= 5:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name.startswith("s") and len(name) <= 5:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    return signature, constants, attrs


def _compile_one(args) -> Row:
    mod_name, name, pointer_types, constexprs, options, label, arch = args
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(kernel=name, config=label, arch=arch)
    kernel = getattr(importlib.import_module(mod_name), name)
    try:
        signature, constants, attrs = launch_signature(kernel, pointer_types, constexprs)
        src = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - reported, and the run fails
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return row
    ptx = compiled.asm["ptx"]
    # tensor-core instructions: wgmma (sm_90), mma.sync (sm_80+), any other mma form
    found = [ins for ins in ("wgmma", "mma.sync", "mma")
             if re.search(rf"\b{re.escape(ins)}\.", ptx)]
    found = [f for f in found if f != "mma" or not ({"wgmma", "mma.sync"} & set(found))]
    row.tensor_cores = ",".join(found) or "-"
    row.shared_bytes = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, f"{name}.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([tool, f"-arch={gpu}", "-v", ptx_path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    info = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                       info)
    if res.returncode or not regs or not spills:
        row.error = "ptxas -v failed: " + info.strip().splitlines()[-1][:200] if info.strip() \
            else "ptxas -v printed nothing"
        return row
    row.registers = int(regs.group(1))
    row.stack_bytes = int(spills.group(1))
    row.spill_bytes = int(spills.group(2)) + int(spills.group(3))
    problems = []
    if row.spill_bytes:
        problems.append(f"register spills ({row.spill_bytes} B stored + loaded)")
    if row.shared_bytes > SMEM_LIMIT.get(arch, 0):
        problems.append(f"shared memory {row.shared_bytes} B above the sm_{arch} block limit "
                        f"{SMEM_LIMIT.get(arch, 0)} B")
    sixteen_bit = any(t in label for t in ("fp16", "bf16"))
    if sixteen_bit and _calls_dot(kernel) and not found:
        problems.append("tl.dot on 16-bit inputs but no tensor-core instruction in the PTX")
    if "fp32" in label and found:
        problems.append(f"fp32 configuration uses tensor cores ({','.join(found)}: TF32), "
                        "not exact fp32")
    row.error = "; ".join(dict.fromkeys(problems))
    row.ok = not problems
    return row


def _calls_dot(kernel) -> bool:
    """Does the kernel (or a helper it calls, one level deep) contain a tl.dot?"""
    import inspect
    src = inspect.getsource(kernel.fn)
    if "tl.dot(" in src or "_dot(" in src:
        return True
    glb = kernel.fn.__globals__
    for callee in re.findall(r"\b(_\w+)\(", src):
        obj = glb.get(callee)
        if obj is not None and hasattr(obj, "fn") and "_dot(" in inspect.getsource(obj.fn):
            return True
    return False


def run(archs, jobs: int, filter_=()) -> list[Row]:
    """Compile every spec whose ``"<kernel> <label>"`` contains one of ``filter_`` (all if
    empty) for each of ``archs``."""
    if isinstance(filter_, str):
        filter_ = [filter_] if filter_ else []
    work = [(*spec, arch) for arch in archs for spec in _specs(filter_, arch)]
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work))


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "config", "arch", "regs", "spill B", "smem B", "tensor cores", "status")
    body = [(r.kernel, r.config, f"sm_{r.arch}", str(r.registers), str(r.spill_bytes),
             str(r.shared_bytes), r.tensor_cores, "ok" if r.ok else f"FAIL: {r.error}")
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help=f"target architectures (known: {' '.join(map(str, ARCHS))})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--filter", nargs="+", default=[],
                        help="only kernels/configs containing one of these texts")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler",
              file=sys.stderr)
        return 2
    unknown = [a for a in args.arch if a not in SMEM_LIMIT]
    if unknown:
        parser.error(f"--arch {unknown}: no shared-memory limit known (known: {list(ARCHS)})")
    rows = run(args.arch, args.jobs, args.filter)
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} ok, {len(bad)} failed, "
          f"{len({(r.kernel, r.config) for r in rows})} configs x {len(args.arch)} archs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if not rows:
        print("no kernel matched", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
