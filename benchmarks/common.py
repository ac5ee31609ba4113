"""Shared machinery of the benchmark scripts: arguments, device facts, timing, memory, the
correctness gate, and row recording. One copy, used by every ``bench_*.py``.

How one benchmark *case* (an op at one shape) is measured, :func:`run_case`:

1. ``n_copies`` sets of fresh random inputs are drawn, enough that together they exceed
   ``ROTATE_BYTES`` (more than the 50 MB L2 of an H100), and every timed call takes the next set,
   so repeated calls do not find their inputs in cache. (``triton.testing.do_bench`` also wipes
   L2 before each call; the rotation keeps the two honest on any timer.)
2. The reference runs once per case, in float64 (float32 when the dense score tensor is large),
   chunked over the flattened leading dims so it fits in memory.
3. Each provider runs once on the first input set, forward and backward; its output and input
   gradients are compared with the reference by :func:`pargo_kernels.testing.rel_error` against
   ``REL_TOL[dtype]``. A wrong provider is reported ``WRONG (err)`` and not timed. This call is
   also the provider's warm-up (Triton JIT, ``torch.compile``), so compilation is never timed.
4. Each mode (``fwd``, ``bwd``, ``fwd+bwd``) is timed with ``do_bench`` (median and 20/80 %
   quantiles, its own warm-up excluded) and its peak memory read from
   ``torch.cuda.max_memory_allocated``. Out of memory is recorded as ``OOM``.

Forward is timed with autograd enabled (the training forward, which also saves what the backward
needs); ``bwd`` times ``out.backward(grad)`` on a graph built beforehand.

Metrics per row: ``gbps`` = useful bytes / time, ``tflops`` = useful FLOPs / time,
``floor_ms`` = max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate), and
``x_floor`` = time / floor (1.0 is the floor; DESIGN.md "Floors"). Useful bytes count each input
read once and each output written once; useful FLOPs count only allowed (unmasked) pairs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python benchmarks/bench_x.py` from a checkout
    sys.path.insert(0, ROOT)

from pargo_kernels.testing import REL_TOL, rel_error  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDER_SECONDS: dict = {}  # wall time spent per provider in this process (checks, compiles)
ROTATE_BYTES = 128 * 2**20  # > 50 MB L2 of an H100, with margin
MAX_COPIES = 8
REF_CHUNK_ELEMS = 2**26  # dense-score elements per reference chunk
REF_FP64_MAX_ELEMS = 2**28  # above this many dense-score elements the reference runs in fp32

ROW_KEYS = ("op", "case", "provider", "mode", "status", "ms", "ms_p20", "ms_p80", "err", "tol",
            "ref_dtype", "peak_mb", "extra_mb", "aux_mb", "bytes", "flops", "gbps", "tflops",
            "hbm_floor_ms", "floor_ms", "x_floor", "note", "config")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------
# arguments and environment
# --------------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None,
                   help="folder for raw rows (raw/<op>.jsonl); default benchmarks/results")
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU: exercises the checks and the output, times nothing "
                        "meaningful")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of this script; cases past it are recorded SKIPPED")
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up (ms)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition time (ms)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--inject-wrong", action="store_true",
                   help="add a deliberately wrong provider (must come out WRONG)")
    p.add_argument("--providers", default=None,
                   help="comma list of provider-name prefixes to run (default: all)")
    p.add_argument("--first", type=int, default=None,
                   help="run only the first N cases of the script's list (the headline cases)")
    p.add_argument("--skip-first", type=int, default=0,
                   help="skip the first N cases of the script's list")
    p.add_argument("--tag", default="",
                   help="rows go to raw/<script>.<tag>.jsonl (one file per run_all phase)")
    return p


def finish_args(args, plan_only: bool = False) -> None:
    """Device, timing defaults and parsed lists; ``plan_only`` (benchmarks/gpu_plan.py): keep
    the GPU shapes on a CPU (cases are built and their launches recorded, nothing is timed)."""
    args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.device == "cpu" and not args.smoke and not plan_only:
        print("[bench] no CUDA device: running in --smoke mode (tiny shapes, CPU)", flush=True)
        args.smoke = True
    if args.warmup_ms is None:
        args.warmup_ms = 5 if args.quick else 10
    if args.rep_ms is None:
        args.rep_ms = 25 if args.quick else 50
    args.modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown modes {bad}; choose from {MODES}")
    args.dtype_t = DTYPES[args.dtype]
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results")
    args.t0 = time.perf_counter()
    args.provider_filter = tuple(args.providers.split(",")) if args.providers else None


def over_budget(args) -> bool:
    return args.budget_s is not None and time.perf_counter() - args.t0 > args.budget_s


def budget_left(args) -> float:
    """Seconds left of this script's budget (inf without one)."""
    if args.budget_s is None:
        return math.inf
    return args.budget_s - (time.perf_counter() - args.t0)


def selected_cases(items: list, args) -> list:
    """The items (one per case, in the script's order: most important first) that ``--first``
    / ``--skip-first`` select."""
    items = list(items)[args.skip_first:]
    return items if args.first is None else items[:args.first]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def git_sha() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes); where the copy has no git
    history (the lent GPU machine gets a copy of the working tree), ``$GIT_SHA`` if set."""
    given = os.environ.get("GIT_SHA", "").strip()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return f"{given} (GIT_SHA)" if given else "unknown (no commit)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception as exc:  # git missing, not a checkout
        return f"{given} (GIT_SHA)" if given else f"unknown ({type(exc).__name__})"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


# --------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], Any], args, grad_to_none: Optional[Sequence[torch.Tensor]] = None):
    """(median, p20, p80) in ms. CUDA: ``triton.testing.do_bench`` (events, L2 wiped before
    each call, warm-up excluded). CPU (smoke only): a host clock, not a measurement."""
    if args.device == "cuda":
        import triton.testing
        res = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                      grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in res)
    times = []
    for _ in range(1 if args.smoke else 3):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def measure_memory(fn: Callable[[], Any], device: str):
    """(peak MB, MB above what was allocated before the call) of one call of ``fn``."""
    if device != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - base) / 2**20


def allocated_mb(device: str) -> float:
    if device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**20


def is_oom(exc: BaseException) -> bool:
    oom_t = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom_t) or "out of memory" in str(exc).lower()


def free_memory(device: str, full: bool = False) -> None:
    """Return cached blocks to the device; ``full`` also runs the cycle collector (slow, ~0.4 s
    once dynamo is imported, so only once per case and after failures)."""
    if full:
        import gc
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def device_facts(args) -> dict:
    """Device name, versions, git sha, and the two ceilings measured in this run."""
    facts = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "git_sha": git_sha(),
        "device": args.device, "smoke": bool(args.smoke), "quick": bool(args.quick),
        "dtype": args.dtype, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
        "triton_interpret": triton_interpret(),
    }
    try:
        import triton
        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(device_name=torch.cuda.get_device_name(0),
                     capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                     sm_count=props.multi_processor_count,
                     total_mem_gb=round(props.total_memory / 2**30, 1),
                     cudnn=torch.backends.cudnn.version())
        facts.update(measure_ceilings(args))
    else:
        facts.update(device_name="cpu", copy_gbps=None, matmul_tflops=None)
    facts["device_slug"] = slug(facts["device_name"])
    return facts


def measure_ceilings(args) -> dict:
    """Device-to-device copy bandwidth (read + write bytes) and dense bf16 matmul rate."""
    out = {}
    n = 2**29  # 1 GiB of bf16 per buffer
    src = torch.randn(n, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), args)[0]
    out["copy_gbps"] = round(2 * src.numel() * src.element_size() / ms / 1e6, 1)
    out["copy_bytes"] = 2 * src.numel() * src.element_size()
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, args)[0]
    out["matmul_tflops"] = round(2 * m**3 / ms / 1e9, 1)
    out["matmul_shape"] = [m, m, m]
    del a, b
    free_memory("cuda")
    print(f"[bench] ceilings: copy {out['copy_gbps']} GB/s (read+write), "
          f"bf16 matmul {out['matmul_tflops']} TFLOP/s", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# cases, providers, rows
# --------------------------------------------------------------------------------------------
class NotAvailable(Exception):
    """A provider cannot serve this case (not installed, refused, unsupported): not an error."""


@contextlib.contextmanager
def backend_refusals_as_not_available():
    """Turn a pargo_kernels backend refusal (a ValueError saying why the backend cannot serve
    the input) into NotAvailable; any other error propagates."""
    try:
        yield
    except ValueError as exc:
        msg = str(exc)
        if any(key in msg for key in ("cannot serve", "not implemented", "no backend can serve")):
            raise NotAvailable("refused: " + msg.split(": ", 1)[-1][:200]) from exc
        raise


@dataclass
class Provider:
    """``setup(case) -> fn``: builds per-case state (masks, compiled functions) and returns a
    function of the case's input tensors returning the output; raises :class:`NotAvailable`."""
    name: str
    setup: Callable[["Case"], Callable[..., torch.Tensor]]
    note: Callable[["Case"], str] = lambda case: ""
    # reason this provider cannot run a backward on this case (None: it can)
    no_backward: Callable[["Case", Any], Optional[str]] = lambda case, args: None
    # seconds of budget a case needs before it starts (a compile that must fit: FlexAttention,
    # torch.compile); with less left the case is recorded SKIPPED, not started
    min_left_s: float = 0.0


@dataclass
class Case:
    op: str
    name: str
    config: dict
    make_inputs: Callable[[], list]  # fresh random leaves (requires_grad=True)
    out_shape: tuple
    reference: Callable[[list, torch.Tensor, torch.dtype, bool], tuple]  # -> (out, grads)
    bytes: dict  # mode -> useful bytes
    flops: dict  # mode -> useful FLOPs
    ref_elems: int  # size of the dense work, picks fp64 or fp32 for the reference
    group: str = ""
    extra: dict = field(default_factory=dict)


class Recorder:
    """Appends rows to ``<out>/raw/<op>.jsonl`` as they are measured (a killed run keeps them)."""

    def __init__(self, args, script: str):
        self.args = args
        self.raw = os.path.join(args.out, "raw")
        os.makedirs(self.raw, exist_ok=True)
        stem = f"{script}.{args.tag}" if getattr(args, "tag", "") else script
        self.path = os.path.join(self.raw, f"{stem}.jsonl")
        self.meta_path = os.path.join(self.raw, f"{stem}.meta.json")
        open(self.path, "w").close()
        self.facts = device_facts(args)
        self.meta = {"script": script, "facts": self.facts, "unavailable": {}, "skipped": None}
        self.write_meta()

    def write_meta(self) -> None:
        with open(self.meta_path, "w") as f:
            json.dump(self.meta, f, indent=1, default=str)

    def row(self, case: Case, provider: str, mode: str, status: str, **kw) -> dict:
        row = {k: None for k in ROW_KEYS}
        row.update(op=case.op, case=case.name, provider=provider, mode=mode, status=status,
                   config=case.config, group=case.group, **kw)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        ms = row.get("ms")
        shown = (f"{ms:9.4f} ms  x_floor={row['x_floor']}" if ms is not None and status == "ok"
                 else status)
        print(f"[{case.op}] {case.name:28s} {provider:22s} {mode:8s} {shown}", flush=True)
        return row


def ref_dtype_for(case: Case, args) -> torch.dtype:
    if args.smoke or case.ref_elems <= REF_FP64_MAX_ELEMS:
        return torch.float64
    return torch.float32


def _status_err(err: Optional[float], tol: float) -> Optional[str]:
    if err is None or err <= tol:
        return None
    return f"WRONG ({err:.2e})"


def prepare_case(case: Case, args, need_grad: bool):
    """Steps 1-2 of :func:`run_case`: ``(sets, grad_out, ref_dtype, ref_out, ref_grads)``, the
    rotated input sets (``sets[0]`` is the one checked), the upstream gradient and the
    reference on ``sets[0]``."""
    first = case.make_inputs()
    set_bytes = sum(t.numel() * t.element_size() for t in first)
    n_copies = 1 if args.smoke else min(MAX_COPIES, max(1, math.ceil(ROTATE_BYTES / set_bytes)))
    sets = [first] + [case.make_inputs() for _ in range(n_copies - 1)]
    grad_out = torch.randn(case.out_shape, device=args.device, dtype=torch.float32).to(args.dtype_t)
    ref_dt = ref_dtype_for(case, args)
    ref_out, ref_grads = case.reference(first, grad_out, ref_dt, need_grad)
    sync(args.device)
    return sets, grad_out, ref_dt, ref_out, ref_grads


def check_provider(fn, case: Case, first, grad_out, ref_out, ref_grads, need_grad: bool,
                   no_bwd) -> tuple:
    """Step 3 of :func:`run_case`, the correctness gate: one call of ``fn`` on fresh leaves of
    ``first`` (forward, and backward unless ``no_bwd``); returns ``(err_out, err_grad)``."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad and not no_bwd) for t in first]
    out = fn(*leaves)
    if tuple(out.shape) != tuple(case.out_shape):
        raise AssertionError(f"output shape {tuple(out.shape)} != {case.out_shape}")
    err_out, err_grad = rel_error(out, ref_out), None
    if need_grad and not no_bwd:
        out.backward(grad_out)
        errs = [rel_error(x.grad, r) if x.grad is not None else float("inf")
                for x, r in zip(leaves, ref_grads) if r is not None]
        err_grad = max(errs) if errs else None
    return err_out, err_grad


def run_case(case: Case, providers: Sequence[Provider], rec: Recorder, args) -> None:
    """Check and time every provider on one case; every outcome becomes rows (see module doc)."""
    dev, modes = args.device, args.modes
    need_grad = any(m != "fwd" for m in modes)
    tol = REL_TOL[args.dtype_t]

    def skip_all(status, start=0):
        for p in providers[start:]:
            for m in modes:
                rec.row(case, p.name, m, status)

    if over_budget(args):
        return skip_all("SKIPPED (time budget)")
    free_memory(dev, full=True)
    try:
        sets, grad_out, ref_dt, ref_out, ref_grads = prepare_case(case, args, need_grad)
        first = sets[0]
    except Exception as exc:
        status = "OOM" if is_oom(exc) else f"ERROR (inputs/reference: {_short(exc)})"
        free_memory(dev, full=True)
        return skip_all(status)
    base_kw = dict(tol=tol, ref_dtype=str(ref_dt).replace("torch.", ""))

    for pi, prov in enumerate(providers):
        if over_budget(args):
            return skip_all("SKIPPED (time budget)", pi)
        if prov.min_left_s and budget_left(args) < prov.min_left_s:
            for m in modes:
                rec.row(case, prov.name, m, f"SKIPPED (time budget: {budget_left(args):.0f} s "
                        f"left, a compile needs ~{prov.min_left_s:.0f} s)")
            continue
        t_prov = time.perf_counter()
        try:
            _run_provider(case, prov, rec, args, first, sets, grad_out, ref_out, ref_grads,
                          need_grad, base_kw)
        finally:
            PROVIDER_SECONDS[prov.name] = (PROVIDER_SECONDS.get(prov.name, 0.0)
                                           + time.perf_counter() - t_prov)


def _run_provider(case, prov, rec, args, first, sets, grad_out, ref_out, ref_grads, need_grad,
                  base_kw) -> None:
    dev, modes, tol = args.device, args.modes, base_kw["tol"]
    fn = None
    try:
        before = allocated_mb(dev)
        fn = prov.setup(case)
        aux_mb = round(allocated_mb(dev) - before, 1) if dev == "cuda" else None
        note = prov.note(case)
    except NotAvailable as exc:
        for m in modes:
            rec.row(case, prov.name, m, f"n/a ({exc})", **base_kw)
        return
    except Exception as exc:
        st = "OOM" if is_oom(exc) else f"ERROR (setup: {_short(exc)})"
        for m in modes:
            rec.row(case, prov.name, m, st, **base_kw)
        free_memory(dev, full=True)
        return
    # correctness gate (also the warm-up / compile call)
    err_out = err_grad = None
    no_bwd = prov.no_backward(case, args)
    try:
        err_out, err_grad = check_provider(fn, case, first, grad_out, ref_out, ref_grads,
                                           need_grad, no_bwd)
        sync(dev)
    except NotAvailable as exc:
        for m in modes:
            rec.row(case, prov.name, m, f"n/a ({exc})", **base_kw)
        return
    except Exception as exc:
        st = "OOM" if is_oom(exc) else f"ERROR (check: {_short(exc)})"
        if not is_oom(exc) and os.environ.get("PARGO_BENCH_DEBUG"):
            traceback.print_exc()
        for m in modes:
            rec.row(case, prov.name, m, st, err=err_out, **base_kw)
        free_memory(dev, full=True)
        return

    for mode in modes:
        err = err_out if mode == "fwd" else max(e for e in (err_out, err_grad) if e is not None)
        kw = dict(base_kw, err=err, note=note, aux_mb=aux_mb,
                  bytes=case.bytes[mode], flops=case.flops[mode])
        if no_bwd and mode != "fwd":
            rec.row(case, prov.name, mode, f"n/a ({no_bwd})", **kw)
            continue
        wrong = _status_err(err, tol)
        if wrong:
            rec.row(case, prov.name, mode, wrong, **kw)
            continue
        if over_budget(args):
            rec.row(case, prov.name, mode, "SKIPPED (time budget)", **kw)
            continue
        try:
            res = _time_mode(fn, sets, grad_out, mode, case, args, grads=not no_bwd)
            rec.row(case, prov.name, mode, "ok", **kw, **res)
        except Exception as exc:
            st = "OOM" if is_oom(exc) else f"ERROR ({mode}: {_short(exc)})"
            if not is_oom(exc) and os.environ.get("PARGO_BENCH_DEBUG"):
                traceback.print_exc()
            rec.row(case, prov.name, mode, st, **kw)
            free_memory(dev, full=is_oom(exc))
    del fn
    free_memory(dev)


def _time_mode(fn, sets, grad_out, mode, case: Case, args, grads: bool = True) -> dict:
    dev = args.device
    leaves = [[t.detach().requires_grad_(t.requires_grad and grads) for t in s] for s in sets]
    flat = [t for s in leaves for t in s if t.requires_grad]
    it = {"i": 0}

    def nxt():
        i = it["i"]
        it["i"] = (i + 1) % len(leaves)
        return i

    if mode == "fwd":
        def call():
            return fn(*leaves[nxt()])
    elif mode == "fwd+bwd":
        def call():
            fn(*leaves[nxt()]).backward(grad_out)
    else:
        outs = [fn(*s) for s in leaves]

        def call():
            outs[nxt()].backward(grad_out, retain_graph=True)
    ms, p20, p80 = bench(call, args, grad_to_none=flat)
    for t in flat:
        t.grad = None
    peak_mb, extra_mb = measure_memory(call, dev)
    for t in flat:
        t.grad = None
    res = dict(ms=ms, ms_p20=p20, ms_p80=p80, peak_mb=_r(peak_mb), extra_mb=_r(extra_mb))
    b, f = case.bytes[mode], case.flops[mode]
    res["gbps"] = round(b / ms / 1e6, 1)
    res["tflops"] = round(f / ms / 1e9, 2)
    bw, mm = _ceilings(args)
    if bw and mm:
        res["hbm_floor_ms"] = b / (bw * 1e6)
        res["floor_ms"] = max(res["hbm_floor_ms"], f / (mm * 1e9))
        res["x_floor"] = round(ms / res["floor_ms"], 2)
    return res


_CEIL: dict = {}


def set_ceilings(facts: dict) -> None:
    _CEIL.update(bw=facts.get("copy_gbps"), mm=facts.get("matmul_tflops"))


def _ceilings(args):
    return _CEIL.get("bw"), _CEIL.get("mm")


def _r(x):
    return None if x is None else round(x, 1)


def _short(exc: BaseException, n: int = 160) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def chunked_reference(fn: Callable[..., torch.Tensor], inputs: list, grad_out: torch.Tensor,
                      dtype: torch.dtype, need_grad: bool, lead: int, chunk: int):
    """Run ``fn`` on ``inputs`` cast to ``dtype``, ``chunk`` slices of the first ``lead`` dims
    (flattened) at a time; returns (out, grads) in ``dtype`` (grads None if not ``need_grad``).
    Valid when slices along those dims are independent (batch, heads)."""
    shapes = [t.shape for t in inputs]
    flat = [t.detach().reshape(-1, *t.shape[lead:]) for t in inputs]
    g = grad_out.reshape(-1, *grad_out.shape[lead:])
    n = flat[0].shape[0]
    outs, grads = [], [[] for _ in inputs]
    for s in range(0, n, chunk):
        part = [x[s:s + chunk].to(dtype).requires_grad_(need_grad) for x in flat]
        with torch.set_grad_enabled(need_grad):
            o = fn(*part)
        if need_grad:
            o.backward(g[s:s + chunk].to(dtype))
            for lst, x in zip(grads, part):
                lst.append(x.grad)
        outs.append(o.detach())
    out = torch.cat(outs).reshape(*grad_out.shape[:lead], *outs[0].shape[1:])
    if not need_grad:
        return out, [None] * len(inputs)
    return out, [torch.cat(lst).reshape(shp) for lst, shp in zip(grads, shapes)]


def selected(providers: list, args) -> list:
    if not args.provider_filter:
        return providers
    return [p for p in providers if p.name.startswith(args.provider_filter)]


def start(script: str, description: str, argv=None, extra_args=None):
    p = parser(description)
    if extra_args:
        extra_args(p)
    args = p.parse_args(argv)
    finish_args(args)
    rec = Recorder(args, script)
    set_ceilings(rec.facts)
    return args, rec


def plan_args(description: str, argv=(), extra_args=None):
    """Arguments of a script for benchmarks/gpu_plan.py: the GPU cases, on whatever device."""
    p = parser(description)
    if extra_args:
        extra_args(p)
    args = p.parse_args(list(argv))
    finish_args(args, plan_only=True)
    return args


def run_cases(items: list, rec: Recorder, args) -> None:
    """Run ``items`` (``(make_case, providers)`` per case, the script's order) as
    ``--first`` / ``--skip-first`` select them."""
    for make, provs in selected_cases(items, args):
        run_case(make(), provs, rec, args)
