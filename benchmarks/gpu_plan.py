"""What ``benchmarks/gpu_run.sh`` compiles on the lent H200, counted on a CPU, and its seconds.

    python benchmarks/gpu_plan.py [--per-compile-s 0.9] [--measure N] [--measure-nvcc]
                                  [--json PATH]

Counts, per step of gpu_run.sh, derived from the code (nothing here is a hand-written count):

* **build**: the CUDA extension's translation units (``setup.cuda_sources()``: nvcc compiles the
  ``.cu`` files, the host compiler the ``.cpp``), built at once (``MAX_JOBS=16``): the step
  takes as long as its slowest unit.
* **tests**: the distinct Triton specializations each pytest process of
  ``gpu_steps.TEST_PROCS`` compiles. The GPU test profile's cases (the node ids pytest collects
  for that process) run with every Triton launch replaced by a recorder that computes the key
  Triton's JIT caches the compiled kernel under on sm_90 (kernel, argument types, 16-byte
  divisibility / ``== 1`` of the specialised pointers and ints, constexprs, ``num_warps`` /
  ``num_stages``: ``triton.runtime.jit``'s own binder), the launchers choosing as on an H200
  (sm_90 tile tables, the GPU's dot precision and pooling tiles, not the interpreter's); the
  kernels do not run. The existing CUDA-extension tests of the ``cuda`` process run on CUDA
  tensors only, so their Triton launches cannot be recorded here (one does launch Triton:
  ``test_attention_cuda.py::test_cuda_agrees_with_triton``, a bf16 D=64 partial-global forward,
  the profile's ``pg1d`` specialization).
* **benchmarks**: the same, for every case of ``run_all.PHASES`` (headline cases first) through
  the providers that run the package's Triton kernels, at the GPU shapes (inputs allocated, not
  filled; ``F.linear`` / ``F.conv2d`` outside the kernels replaced by shape-only stand-ins).
  *new* = not compiled by an earlier step (the processes of one machine share Triton's on-disk
  cache). FlexAttention and ``torch.compile`` graphs are counted, not priced: each such case
  starts only with ``FLEX_COMPILE_S`` of its script's budget left.
* **projectors**: ``bench_projectors.py``'s models (kernels path, backend ``"triton"``; DeCo's
  and C-Abstractor's pooling run on the CUDA extension instead when it is built) at B=2.

Predicted seconds: each compile priced at ``--per-compile-s`` (default the issue's 0.9 s for
sm_90) and, with ``--measure N|all``, at the CPU seconds (ptxas included) measured for it here:
N (or every one) of the test step's specializations compiled for sm_90 with Triton's own
compiler, one after another in one process, fresh cache; plus the stated start-up and per-test
constants (``STARTUP_S``, ``PER_TEST_S``: assumptions, not measurements). Recording takes ~1-2
minutes on 2 busy CPU cores; ``--measure all`` adds the compiles (~2-5 minutes there).
"""
from __future__ import annotations

import os
import sys

if "--compile-specs" not in sys.argv:  # before triton is imported: record, never compile here
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SM = 90
PER_COMPILE_S = 0.9  # s per Triton specialization on sm_90 (issue 22), --per-compile-s
STARTUP_S = 10.0  # python + torch + triton + pytest start and a CUDA context (assumed)
PER_TEST_S = 0.1  # a test's run on the GPU once compiled: small shapes, float64 oracle (assumed)
# nvcc -c -O3 --use_fast_math -gencode sm_90 of each .cu, seconds, measured on the development
# machine (2 busy CPU cores, 2026-12) -- --measure-nvcc re-measures them; bindings.cpp needs a
# CUDA build of torch's headers (c10/cuda), absent there: its cost is assumed
BUILD_UNIT_S = {"csrc/attention_bwd.cu": 24.3, "csrc/attention_fwd.cu": 9.4,
                "csrc/pool_tokens.cu": 5.0}
HOST_UNIT_S = 45.0  # one .cpp including torch/extension headers (assumed)
LINK_S = 3.0  # linking the extension (assumed)


# --------------------------------------------------------------------------------------------
# launch recording
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class LaunchRecorder:
    """Replaces every Triton launch (the interpreter's ``InterpretedFunction.run``) with a
    record of the key the GPU's JIT would compile it under; ``label`` names where the launches
    go. Inside, the package's launchers choose as on sm_90."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.backend = make_backend(GPUTarget("cuda", SM, 32))
        self.label = None
        self.keys: dict = OrderedDict()  # label -> {(kernel, key): spec}
        self._binders: dict = {}
        self._stack = None

    def _binder(self, ifn):
        from triton.runtime.jit import JITFunction, create_function_from_signature
        got = self._binders.get(ifn.fn)
        if got is None:
            jf = JITFunction(ifn.fn, do_not_specialize=ifn.kwargs.get("do_not_specialize"),
                             do_not_specialize_on_alignment=ifn.kwargs.get(
                                 "do_not_specialize_on_alignment"))
            got = self._binders[ifn.fn] = (
                jf, create_function_from_signature(jf.signature, jf.params, self.backend))
        return got

    def _record(self, ifn, args, kwargs):
        from triton.runtime.jit import compute_cache_key
        jf, binder = self._binder(ifn)
        bound, spec, opts = binder(*args, **kwargs)
        name = f"{ifn.fn.__module__}.{ifn.fn.__name__}"
        key = (name, compute_cache_key({}, spec, opts))
        bucket = self.keys.setdefault(self.label, OrderedDict())
        if key not in bucket:
            options, signature, constexprs, attrs = jf._pack_args(self.backend, dict(kwargs),
                                                                  bound, spec, opts)
            bucket[key] = dict(key=list(key), module=ifn.fn.__module__, name=ifn.fn.__name__,
                               signature=signature,
                               constexprs=[[list(k), v] for k, v in constexprs.items()],
                               attrs=[[list(k), v] for k, v in attrs.items()],
                               options=dict(num_warps=options.num_warps,
                                            num_stages=options.num_stages))

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        from pargo_kernels.ops import (attention_plan, attention_triton, pool_triton,
                                       varlen_pool_triton, varlen_triton)
        assert attention_plan.DEFAULT_ARCH == SM, "CPU tensors plan as sm_90 (DEFAULT_ARCH)"
        recorder = self

        def run(ifn, *args, grid, warmup, **kwargs):
            recorder._record(ifn, args, kwargs)
            return None  # nothing executes: outputs keep whatever they were allocated with

        gpu_precision = attention_triton._precision

        def precision(dtype, interpret=False):  # the GPU's, never the interpreter's
            return gpu_precision(dtype)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_patched(InterpretedFunction, "run", run))
        for mod in (attention_triton, pool_triton, varlen_triton, varlen_pool_triton):
            self._stack.enter_context(_patched(mod, "_precision", precision))
        for mod in (pool_triton, varlen_pool_triton):  # the GPU's pooling tiles
            self._stack.enter_context(_patched(mod, "_interp", lambda t: False))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


class _ShapeOnly:
    """Shape-only stand-ins for the heavy torch ops around the kernels (their values do not
    change what is compiled): ``F.linear``, ``F.conv2d``; ``torch.randn`` allocates without
    filling."""

    @staticmethod
    def install(stack):
        import torch
        import torch.nn.functional as F
        real_conv2d = F.conv2d

        class Linear(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b):
                ctx.shapes = (x, w, b)
                return x.new_empty(*x.shape[:-1], w.shape[0])

            @staticmethod
            def backward(ctx, g):
                x, w, b = ctx.shapes
                return (torch.empty_like(x), torch.empty_like(w),
                        None if b is None else torch.empty_like(b))

        class Conv2d(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b, *rest):
                ctx.shapes = (x, w, b, len(rest))
                shape = real_conv2d(x.to("meta"), w.to("meta"),
                                    None if b is None else b.to("meta"), *rest).shape
                return x.new_empty(shape)

            @staticmethod
            def backward(ctx, g):
                x, w, b, n = ctx.shapes
                return (torch.empty_like(x), torch.empty_like(w),
                        None if b is None else torch.empty_like(b), *([None] * n))

        stack.enter_context(_patched(F, "linear", lambda x, w, b=None: Linear.apply(x, w, b)))
        stack.enter_context(_patched(F, "conv2d", lambda x, w, b=None, *r: Conv2d.apply(
            x, w, b, *r)))
        stack.enter_context(_patched(torch, "randn", lambda *size, **kw: torch.empty(
            *size, **{k: v for k, v in kw.items() if k != "generator"})))


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------
def collect(pytest_args) -> list[str]:
    """Node ids pytest collects for ``pytest_args`` (a subprocess, as gpu_run.sh runs it)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *pytest_args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not ids:
        raise RuntimeError(f"pytest --collect-only {pytest_args} failed:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    return ids


def record_tests(rec: LaunchRecorder) -> dict:
    """Per test process: its items, the profile cases it records, what it could not."""
    import gpu_steps
    import test_gpu_profile as prof
    out = OrderedDict()
    for name, args in gpu_steps.TEST_PROCS.items():
        ids = collect(args)
        rec.label = f"tests:{name}"
        rec.keys.setdefault(rec.label, OrderedDict())
        recorded, cuda_only = 0, []
        for node in ids:
            path, _, test = node.partition("::")
            if path == gpu_steps.PROFILE and test.startswith("test_profile["):
                case, dtype, backend = test[len("test_profile["):-1].rsplit("-", 2)
                if backend == "triton":
                    prof.check(case, dtype, "triton", device="cpu", small=False)
                    recorded += 1
                    continue
            cuda_only.append(node)
        out[name] = dict(items=len(ids), recorded=recorded, not_recorded=len(cuda_only),
                         not_recorded_files=sorted({n.split("::")[0] for n in cuda_only}))
    return out


def record_benchmarks(rec: LaunchRecorder) -> dict:
    """Per run_all phase and script: cases, Triton providers recorded, Flex / compile graphs."""
    import torch

    import attention_common
    import common
    import run_all
    out = OrderedDict()
    with contextlib.ExitStack() as stack:
        _ShapeOnly.install(stack)
        for phase, items in run_all.PHASES:
            for script, sargs, _ in items:
                mod = importlib.import_module(run_all.SCRIPTS[script][:-3])
                args = common.plan_args(mod.__doc__.splitlines()[0], sargs)
                plan = mod.plan(args, mod.import_ours()[0]) if script == "pooling" else \
                    mod.plan(args)
                rec.label = f"bench:{phase}:{script}"
                rec.keys.setdefault(rec.label, OrderedDict())
                info = dict(cases=[], flex_graphs=0, compiled_graphs=0, not_available={})
                groups = set()
                for make, provs in common.selected_cases(plan, args):
                    case = make()
                    info["cases"].append(case.name)
                    for prov in provs:
                        if prov.name.startswith("flex"):
                            info["flex_graphs"] += 1
                            if prov.name == "flex" and case.group not in groups and \
                                    script != "varlen":  # block-size trials on a group's first
                                groups.add(case.group)
                                info["flex_graphs"] += len(attention_common.FLEX_BLOCK_SIZES) - 1
                        elif prov.name == "deco-compiled":
                            info["compiled_graphs"] += 1
                        if "[triton]" not in prov.name:
                            continue
                        try:
                            fn = prov.setup(case)
                            leaves = [t.detach().requires_grad_(t.requires_grad)
                                      for t in case.make_inputs()]
                            y = fn(*leaves)
                            y.backward(torch.empty(case.out_shape, dtype=args.dtype_t))
                        except common.NotAvailable as exc:
                            info["not_available"][prov.name] = str(exc)
                out[rec.label] = info
    return out


def record_projectors(rec: LaunchRecorder, batch: int = 2) -> dict:
    import torch

    import bench_projectors as bp
    import models
    rec.label = "projectors"
    rec.keys.setdefault(rec.label, OrderedDict())
    names = list(bp.SMOKE_CFG)
    full = bp.FULL
    with contextlib.ExitStack() as stack:
        _ShapeOnly.install(stack)
        for name in names:
            cfg = {"backend": "triton"} if name in bp.WITH_IMPL else {}
            proj = models.build_projector(name, vision_width=full["vision"],
                                          llm_width=full["llm"], visual_grid=full["grid"],
                                          **cfg).to(torch.bfloat16)
            x = torch.empty(batch, full["grid"][0] * full["grid"][1], full["vision"],
                            dtype=torch.bfloat16)
            y = proj(x, impl="kernels") if name in bp.WITH_IMPL else proj(x)
            y.backward(torch.empty_like(y))
    return dict(projectors=names, batch=batch)


# --------------------------------------------------------------------------------------------
# compile-cost measurement (a subprocess without the interpreter)
# --------------------------------------------------------------------------------------------
def _cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (ptxas)."""
    import resource
    own, kids = (resource.getrusage(resource.RUSAGE_SELF),
                 resource.getrusage(resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compile_specs(path: str) -> int:
    """Compile each spec of the JSON file ``path`` for sm_90, one after another; print
    ``[[wall s, CPU s], ...]``, one pair per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    with open(path) as f:
        specs = json.load(f)
    times = []
    for s in specs:
        kernel = getattr(importlib.import_module(s["module"]), s["name"])
        src = ASTSource(fn=kernel, signature=s["signature"],
                        constexprs={tuple(k): v for k, v in s["constexprs"]},
                        attrs={tuple(k): v for k, v in s["attrs"]})
        t0, c0 = time.perf_counter(), _cpu_s()
        triton.compile(src, target=GPUTarget("cuda", SM, 32), options=s["options"])
        times.append([time.perf_counter() - t0, _cpu_s() - c0])
    print(json.dumps(times))
    return 0


def measure_compiles(specs: list[dict], n) -> dict:
    """Compile ``n`` (or ``"all"``) of ``specs`` (a sample: spread over the kernels) for sm_90,
    one after another in a fresh process with an empty Triton cache, after a warm-up compile
    (Triton's start-up, not counted); wall and CPU seconds (ptxas included) of each."""
    by_kernel = OrderedDict()
    for s in specs:
        by_kernel.setdefault(s["name"], []).append(s)
    n = len(specs) if n == "all" else int(n)
    chosen = []
    while len(chosen) < n and any(by_kernel.values()):
        for k in list(by_kernel):
            if by_kernel[k] and len(chosen) < n:
                chosen.append(by_kernel[k].pop(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "specs.json")
        with open(path, "w") as f:
            json.dump(chosen[:1] + chosen, f)  # the first one twice: the warm-up
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=os.path.join(tmp, "cache"),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-specs",
                               path], env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"compile measurement failed:\n{proc.stderr[-3000:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    warm, times = times[0], times[1:]
    cpu = [c for _, c in times]
    return dict(n=len(times), all=len(times) == len(specs), warmup_wall_s=round(warm[0], 2),
                wall_median_s=round(statistics.median(w for w, _ in times), 2),
                cpu_median_s=round(statistics.median(cpu), 2),
                cpu_mean_s=round(statistics.fmean(cpu), 2), cpu_total_s=round(sum(cpu), 1),
                load_avg=[round(x, 1) for x in os.getloadavg()],
                cpu_s={json.dumps(s["key"]): round(c, 3) for s, c in zip(chosen, cpu)},
                kernels=sorted({s["name"] for s in chosen}))


def measure_nvcc() -> dict:
    """nvcc -c for sm_90 of each .cu here (the extension's flags, without torch's headers)."""
    import shutil
    nvcc = shutil.which("nvcc")
    if not nvcc:
        raise RuntimeError("--measure-nvcc: nvcc not on PATH")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in [s for s in _setup().cuda_sources() if s.endswith(".cu")]:
            t0 = time.perf_counter()
            subprocess.run([nvcc, "-c", "-O3", "-std=c++17", "--use_fast_math",
                            f"-gencode=arch=compute_{SM},code=sm_{SM}", "-I",
                            os.path.join(ROOT, "csrc"), os.path.join(ROOT, src), "-o",
                            os.path.join(tmp, "x.o")], check=True, capture_output=True)
            out[src] = round(time.perf_counter() - t0, 1)
    return out


def _setup():
    spec = importlib.util.spec_from_file_location("pargo_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the functions only (setup() runs under __main__)
    return mod


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------
def make_plan(per_compile_s: float, unit_s: dict, rec: LaunchRecorder, tests: dict,
              bench: dict, proj: dict, measured: dict | None = None) -> dict:
    """Counts and predicted seconds per step: compiles priced at ``per_compile_s`` and, with
    ``measured`` (:func:`measure_compiles`), at the CPU seconds measured for each (the
    sample's mean for those not measured)."""
    import gpu_steps
    sources = _setup().cuda_sources()
    units = {s: unit_s.get(s, HOST_UNIT_S if s.endswith(".cpp") else max(unit_s.values()))
             for s in sources}
    build_s = max(units.values()) + LINK_S

    def measured_s(keys):
        got = measured["cpu_s"]
        return round(sum(got.get(json.dumps(list(k)), measured["cpu_mean_s"]) for k in keys), 1)

    steps = OrderedDict()
    procs = OrderedDict()
    for name, info in tests.items():
        keys = set(rec.keys.get(f"tests:{name}", {}))
        start = build_s if name == gpu_steps.CUDA_PROC else 0.0
        rest = STARTUP_S + info["items"] * PER_TEST_S
        row = dict(info, specializations=len(keys), starts_at_s=round(start, 1),
                   compile_s=round(len(keys) * per_compile_s, 1))
        row["predicted_s"] = round(start + rest + row["compile_s"], 1)
        if measured:
            row["compile_s_measured"] = measured_s(keys)
            row["predicted_s_measured"] = round(start + rest + row["compile_s_measured"], 1)
        procs[name] = row
    test_keys = set().union(*(set(rec.keys.get(f"tests:{n}", {})) for n in tests))
    steps["build"] = dict(nvcc_units=sum(s.endswith(".cu") for s in sources),
                          host_units=sum(s.endswith(".cpp") for s in sources),
                          unit_s=units, predicted_s=round(build_s, 1))
    steps["tests"] = dict(processes=procs, specializations=len(test_keys),
                          serial_compile_s=round(len(test_keys) * per_compile_s, 1),
                          predicted_s=max(p["predicted_s"] for p in procs.values()))
    if measured:
        steps["tests"].update(serial_compile_s_measured=measured_s(test_keys),
                              predicted_s_measured=max(p["predicted_s_measured"]
                                                       for p in procs.values()))
    seen = set(test_keys)
    rows = OrderedDict()
    for label, info in bench.items():
        keys = set(rec.keys.get(label, {}))
        new = keys - seen
        seen |= keys
        rows[label] = dict(info, specializations=len(keys), new=len(new),
                           compile_s=round(len(new) * per_compile_s, 1))
    steps["benchmarks"] = dict(scripts=rows, new=sum(r["new"] for r in rows.values()),
                               compile_s=round(sum(r["compile_s"] for r in rows.values()), 1),
                               flex_graphs=sum(r["flex_graphs"] for r in rows.values()),
                               compiled_graphs=sum(r["compiled_graphs"] for r in rows.values()))
    keys = set(rec.keys.get("projectors", {}))
    steps["projectors"] = dict(proj, specializations=len(keys), new=len(keys - seen),
                               compile_s=round(len(keys - seen) * per_compile_s, 1))
    kernels = OrderedDict()
    for bucket in rec.keys.values():
        for key in bucket:
            kernels.setdefault(key[0].rsplit(".", 1)[1], set()).add(key)
    return dict(sm=SM, per_compile_s=per_compile_s, startup_s=STARTUP_S, per_test_s=PER_TEST_S,
                steps=steps, distinct_specializations=len(seen | keys),
                per_kernel={k: len(v) for k, v in sorted(kernels.items())})


def format_plan(plan: dict, measured: dict | None) -> str:
    s, c = plan["steps"], plan["per_compile_s"]
    both = (lambda x, y: f"{x:.0f} / {y:.0f}") if measured else (lambda x, y: f"{x:.0f}")
    lines = [f"GPU run plan (sm_{plan['sm']}): {plan['distinct_specializations']} distinct Triton "
             f"specializations in all; a compile priced at {c} s"
             + (" / at the CPU seconds measured here for it" if measured else ""), ""]
    b = s["build"]
    lines += [f"build: {b['nvcc_units']} nvcc units + {b['host_units']} host unit(s), in "
              f"parallel (MAX_JOBS=16): ~{b['predicted_s']:.0f} s (slowest unit + link; "
              + ", ".join(f"{os.path.basename(k)} {v:.0f} s" for k, v in b["unit_s"].items())
              + ")", ""]
    t = s["tests"]
    lines += [f"tests: {len(t['processes'])} pytest processes at once, "
              f"{t['specializations']} specializations ("
              + both(t["serial_compile_s"], t.get("serial_compile_s_measured"))
              + " s of compiles in one process); predicted wall ~"
              + both(t["predicted_s"], t.get("predicted_s_measured"))
              + f" s (start-up {plan['startup_s']:.0f} s + compiles + {plan['per_test_s']} s a "
              "test, both assumed)", "",
              "| process | tests | profile cases recorded | specializations | compile s | "
              "starts at s | predicted s |", "|---|---|---|---|---|---|---|"]
    for name, p in t["processes"].items():
        lines.append(f"| {name} | {p['items']} | {p['recorded']} | {p['specializations']} | "
                     + both(p["compile_s"], p.get("compile_s_measured"))
                     + f" | {p['starts_at_s']:.0f} | "
                     + both(p["predicted_s"], p.get("predicted_s_measured")) + " |")
    for p in t["processes"].values():
        if p["not_recorded"]:
            lines.append(f"\n({p['not_recorded']} tests run on CUDA tensors only, not recorded "
                         "here: " + ", ".join(p["not_recorded_files"]) + ")")
    be = s["benchmarks"]
    lines += ["", f"benchmarks (run_all.PHASES, headline first): {be['new']} new "
              f"specializations, ~{be['compile_s']:.0f} s of compiles inside the budget; "
              f"{be['flex_graphs']} FlexAttention and {be['compiled_graphs']} torch.compile "
              "graphs (each case starts only if its compile fits the budget left; not priced)",
              "", "| phase:script | cases | specializations | new | compile s | flex graphs |",
              "|---|---|---|---|---|---|"]
    for label, r in be["scripts"].items():
        lines.append(f"| {label[6:]} | {len(r['cases'])} | {r['specializations']} | {r['new']} "
                     f"| {r['compile_s']:.0f} | {r['flex_graphs']} |")
    pr = s["projectors"]
    lines += ["", f"projectors ({', '.join(pr['projectors'])}; B={pr['batch']}): "
              f"{pr['specializations']} specializations, {pr['new']} new, "
              f"~{pr['compile_s']:.0f} s", "",
              "per kernel (distinct specializations over all steps): "
              + ", ".join(f"{k} {v}" for k, v in plan["per_kernel"].items())]
    if measured:
        lines += ["", f"measured here: {measured['n']}" + (" (all)" if measured["all"] else "")
                  + f" of the test step's specializations compiled for sm_{plan['sm']} one after "
                  "another in one process, fresh cache: CPU seconds per compile (ptxas "
                  f"included) median {measured['cpu_median_s']}, mean {measured['cpu_mean_s']}, "
                  f"total {measured['cpu_total_s']}; wall median {measured['wall_median_s']} s "
                  f"at load average {measured['load_avg'][0]} (Triton's start-up, a warm-up "
                  f"compile not counted: {measured['warmup_wall_s']} s wall)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-compile-s", type=float, default=PER_COMPILE_S,
                   help=f"seconds per Triton compile on sm_90 (default {PER_COMPILE_S})")
    p.add_argument("--measure", default=None, metavar="N|all",
                   help="also compile N (or all) of the test step's specializations for sm_90 "
                        "here and price each at the CPU seconds measured")
    p.add_argument("--measure-nvcc", action="store_true",
                   help="time nvcc -c for sm_90 of each .cu here (instead of BUILD_UNIT_S)")
    p.add_argument("--json", default=None, help="also write the plan to this file")
    p.add_argument("--compile-specs", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.compile_specs:
        return compile_specs(a.compile_specs)
    t0 = time.perf_counter()
    with LaunchRecorder() as rec:
        tests = record_tests(rec)
        bench = record_benchmarks(rec)
        proj = record_projectors(rec)
    measured = None
    if a.measure:
        specs = [s for label, b in rec.keys.items() if label.startswith("tests:")
                 for s in b.values()]
        measured = measure_compiles(specs, a.measure)
    unit_s = measure_nvcc() if a.measure_nvcc else dict(BUILD_UNIT_S)
    plan = make_plan(a.per_compile_s, unit_s, rec, tests, bench, proj, measured)
    plan["measured_compile"] = measured
    plan["nvcc_measured_here"] = bool(a.measure_nvcc)
    print(format_plan(plan, measured))
    print(f"\n(gpu_plan.py ran {time.perf_counter() - t0:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(plan, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
