"""Work model: the FLOPs and HBM bytes each kernel schedules, from the launchers' own plans.

    python benchmarks/work_model.py [--json PATH] [--ops attention,pool] [--cases paper,video]

A MODEL, not a timing (no GPU is used). For every op, benchmark case and pass it derives from the
launch plans the kernels run (``pargo_kernels/ops/attention_plan.py``: grids, tile configs, each
program's loop bounds):

* ``flops_issued``: MMA FLOPs the programs issue, padded tiles and masked pairs included
  (``tests/test_work_model.py`` checks this against the ``tl.dot`` calls the interpreter runs);
* ``flops_ideal``: allowed (query, key) pairs only; ``flops_dense``: every pair;
  ``flops_flex128``: FlexAttention's 128x128 block-sparse tiles, every tile holding an allowed
  pair. Per pair: forward 2 GEMMs (``2(D + Dv)`` FLOPs); backward ideal and dense 5 GEMMs
  (FlashAttention-2: S recomputed, dP, dV, dK, dQ: ``2(3D + 2Dv)``), FlexAttention 7 (its dQ
  programs recompute S and dP apart from its dK/dV programs: ``2(5D + 2Dv)``);
* ``bytes_floor``: every input of the op read once, every output written once;
* ``bytes_requested``: the bytes the programs load and store, where a load counts as an HBM read
  unless the same bytes were loaded by the same program or by one of the previous ``R`` programs
  of the launch in launch order; ``R`` = programs of that configuration resident at once on an
  H100 (132 SMs x min(32 blocks, 64 warps, 64K registers, 228 KB shared memory per SM), from
  the sm_90 ahead-of-time compile's registers and shared memory, ``pargo_kernels.aot``).
  Stores always count; nothing is reused across launches; loads are counted in whole rows of
  the loaded tensor (sector granularity and padding ignored);
* ``programs`` (all launches of the pass), ``max_iters_per_program``,
  ``mean_iters_per_program``: main-loop trips (key tiles of a query program, both passes of a
  16-bit dQ program, query tiles of a key program) over the programs of the pass's launch with
  the longest program (``iters_launch``; launches run one after another, so balance matters
  within a launch); every launch's figures are in ``launches``;
* ``roofline_us``: max(bytes_requested / 3.0 TB/s, flops_issued / 800 TFLOP/s), DESIGN.md's
  H100 rates: a lower bound of the model, not a timing; ``what_if``: alternatives priced by
  the model and not implemented (``what_if()``).

Rows of other ops come from providers (``PROVIDERS``): ``pool`` rows from
``benchmarks/work_model_pool.py`` (``pool_rows()``), ``varlen`` rows (the packed ops on a
dynamic-resolution batch, and the padded dense alternative) from
``benchmarks/work_model_varlen.py``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import defaultdict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from pargo_kernels.attention import cascade_windows  # noqa: E402
from pargo_kernels.masks import BandMask, ParGoSelfMask, PartialGlobalMask  # noqa: E402
from pargo_kernels.ops import attention_plan as plan  # noqa: E402

H100_SMS, H100_SMEM, H100_REGS, H100_WARPS, H100_BLOCKS = 132, 228 * 1024, 65536, 64, 32
SMEM_RESERVED = 1024  # per block, CUDA's reservation
ELEM = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
KIND_NAMES = {plan.KIND_PG1D: "pg1d", plan.KIND_PG2D: "pg2d", plan.KIND_BAND: "band",
              plan.KIND_PARGO_SELF: "pgself"}
# kernel launched for each launch name of a plan (dq_delta runs the dQ kernel's delta pass only)
KERNELS = {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel",
           "dq_delta": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel",
           "delta": "_attn_bwd_delta_kernel"}


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------
def attention_cases() -> dict:
    """name -> (op, Problem, mask object)."""
    bf16 = torch.bfloat16
    cases = {}

    def pg(name, B, H, D, np_, ng, nv, vgrid=None, pgrid=None):
        mask = PartialGlobalMask(np_ + ng, nv, np_, vgrid, pgrid)
        cases[name] = ("partial_global", plan.Problem(B, H, np_ + ng, nv, D, D, bf16, mask.kind,
                                                      mask.params), mask)
    pg("paper", 256, 8, 64, 288, 16, 576)
    pg("paper2d", 256, 8, 64, 288, 16, 576, (24, 24), (18, 16))
    pg("hires", 64, 8, 64, 288, 16, 2304)
    pg("video", 4, 16, 128, 288, 16, 36864)
    for layer, (left, right) in enumerate(cascade_windows(288, 6), 1):
        mask = BandMask(288, left, right)
        cases[f"band-l{layer}"] = ("band", plan.Problem(256, 8, 288, 288, 64, 64, bf16, mask.kind,
                                                        mask.params), mask)
    for name, window in pargo_self_windows().items():
        mask = ParGoSelfMask(288 + 16, 288, *(window or (None, None)))
        cases[f"pgself-{name}"] = ("pargo_self", plan.Problem(256, 8, 304, 304, 64, 64, bf16,
                                                              mask.kind, mask.params), mask)
    return cases


def pargo_self_windows() -> dict:
    """ParGo's self-attention windows over Np = 288 partial queries: the released code's static
    mask (None) and the six symmetric cascade bands."""
    bands = cascade_windows(288, 6, "symmetric")
    return {"none": None, **{f"l{i}": w for i, w in enumerate(bands, 1)}}


def two_launch_parts(mask: ParGoSelfMask, p: plan.Problem):
    """What ``pargo_self_attention`` replaces: a band over the partial tokens and full
    attention over the global tokens (a band wide enough), as ``(Problem, mask)`` pairs."""
    np_, ng = mask.n_partial, mask.n - mask.n_partial
    band = BandMask(np_, *(mask.params[1:3]))
    full = BandMask(ng, ng - 1, ng - 1)
    return [(plan.Problem(p.B, p.H, m.n, m.n, p.D, p.Dv, p.dtype, m.kind, m.params), m)
            for m in (band, full)]


# --------------------------------------------------------------------------------------------
# per-program work, from the plan's table entries
# --------------------------------------------------------------------------------------------
def _bd(p: plan.Problem):
    return plan.block_dims(p.D, p.Dv)


def entry_iters(launch: plan.Launch, e) -> int:
    """Main-loop trips of one program (both dQ passes count for a delta-pass program)."""
    bm, bn = launch.cfg["BLOCK_M"], launch.cfg.get("BLOCK_N", 0)
    if launch.name == "delta":
        return 1
    if launch.name == "dkdv":
        return plan.cdiv(max(e[2] - e[1], 0), bm) + plan.cdiv(max(e[4] - e[3], 0), bm)
    its = plan.cdiv(max(e[3] - e[2], 0), bn)
    if launch.name == "dq" and launch.extra.get("delta_pass") and e[5] < 0:
        its *= 2
    return its


def entry_dots(p: plan.Problem, launch: plan.Launch, e) -> list[tuple[int, int, int, int]]:
    """``(count, M, N, K)`` of the ``tl.dot`` calls one program issues."""
    bd, bdv = _bd(p)
    bm, bn = launch.cfg["BLOCK_M"], launch.cfg.get("BLOCK_N", 0)
    if launch.name == "delta":
        return []
    if launch.name == "dkdv":
        n = plan.cdiv(max(e[2] - e[1], 0), bm) + plan.cdiv(max(e[4] - e[3], 0), bm)
        return [(n, bm, bn, bd), (n, bn, bdv, bm), (n, bm, bn, bdv), (n, bn, bd, bm)]
    n = plan.cdiv(max(e[3] - e[2], 0), bn)
    if launch.name == "fwd":
        return [(n, bm, bn, bd), (n, bm, bdv, bn)]
    sp = [(n, bm, bn, bd), (n, bm, bn, bdv)]  # S = Q K^T, dP = dO V^T
    if launch.name == "dq_delta":
        return sp
    dots = sp + [(n, bm, bd, bn)]  # dQ += dS K
    if launch.extra.get("delta_pass") and e[5] < 0:
        dots += sp
    return dots


def entry_io(p: plan.Problem, launch: plan.Launch, e):
    """``(loads, stores)`` of one program: loads as ``(tensor, row_lo, row_hi, bytes_per_row)``
    intervals of the program's head, stores as a byte count."""
    el = ELEM[p.dtype]
    rq, rk, rv = p.D * el, p.D * el, p.Dv * el
    if launch.name == "delta":
        r = (e[0], min(e[0] + launch.cfg["BLOCK_M"], p.Nq))
        return [("O", *r, rv), ("dO", *r, rv)], (r[1] - r[0]) * 4
    if launch.name == "dkdv":
        n = (e[0], min(e[0] + launch.cfg["BLOCK_N"], p.Nv))
        loads = [("K", *n, rk), ("V", *n, rv)]
        for lo, hi in ((e[1], e[2]), (e[3], e[4])):
            if hi > lo:
                loads += [("Q", lo, hi, rq), ("dO", lo, hi, rv), ("LSE", lo, hi, 4),
                          ("delta", lo, hi, 4)]
        return loads, (n[1] - n[0]) * (rk + rv)
    rows = (e[0], min(e[0] + launch.cfg["BLOCK_M"], e[1]))
    nr = rows[1] - rows[0]
    kv = [("K", e[2], e[3], rk), ("V", e[2], e[3], rv)] if e[3] > e[2] else []
    split = e[5] >= 0
    if launch.name == "fwd":
        out = nr * (p.Dv * 4 + 4) if split else nr * (rv + 4)
        return [("Q", *rows, rq)] + kv, out
    loads = [("Q", *rows, rq), ("dO", *rows, rv), ("LSE", *rows, 4)] + kv
    if launch.name == "dq_delta":
        return loads, nr * 4
    own_delta = launch.extra.get("delta_pass") and not split
    if not own_delta:
        loads.append(("delta", *rows, 4))
    return loads, nr * (p.D * 4 if split else rq) + (nr * 4 if own_delta else 0)


# --------------------------------------------------------------------------------------------
# residency (R) from the sm_90 ahead-of-time compile
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def resources(kernel: str, kind: int, dtype: torch.dtype, block_d: int,
              prefix: str = "", delta_only: bool = False) -> tuple[int, int, int]:
    """``(registers, shared bytes, warps)`` of the configuration, compiled for sm_90
    (``prefix``: of the AOT label, ``"varlen-"`` for the varlen kernels; ``delta_only``: the
    dQ kernel's delta-only launch of split global tiles)."""
    from pargo_kernels import aot
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    label = f"{ty} d={block_d}" if kernel == "_attn_bwd_delta_kernel" else \
        f"{prefix}{KIND_NAMES[kind]} {ty} d={block_d} M="
    rows = [r for r in aot.run([90], 1, f"{kernel} {label}")
            if r.kernel == kernel and ("delta-only" in r.config) == delta_only]
    if len(rows) != 1 or not rows[0].ok:
        raise RuntimeError(f"sm_90 compile of {kernel} {label} failed: {rows}")
    warps = int(rows[0].config.split(" w=")[1].split()[0]) if " w=" in rows[0].config else 4
    return rows[0].registers, rows[0].shared_bytes, warps


def resident_programs(regs: int, smem: int, warps: int) -> int:
    """Programs resident at once on an H100 (132 SMs)."""
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocation granularity: 256 registers a warp
    per_sm = min(H100_BLOCKS, H100_WARPS // warps, H100_REGS // (regs_per_warp * warps),
                 H100_SMEM // (smem + SMEM_RESERVED))
    return H100_SMS * per_sm


def launch_resident(p: plan.Problem, launch: plan.Launch) -> int:
    bd = max(_bd(p)) if launch.name != "delta" else _bd(p)[1]
    regs, smem, warps = resources(KERNELS[launch.name], p.kind, p.dtype, bd,
                                  delta_only=launch.name == "dq_delta")
    return resident_programs(regs, smem, warps)


# --------------------------------------------------------------------------------------------
# per launch and per pass
# --------------------------------------------------------------------------------------------
def launch_flops(p: plan.Problem, launch: plan.Launch) -> int:
    per_head = sum(2 * c * m * n * k for e in launch.table for c, m, n, k in entry_dots(p, launch, e))
    return per_head * launch.heads


def requested_bytes(p: plan.Problem, launch: plan.Launch, resident: int) -> int:
    """HBM bytes of one launch under the R-resident-programs rule (module docstring)."""
    ios = [entry_io(p, launch, e) for e in launch.table]
    return hbm_bytes(((bh, *ios[t]) for bh, t in launch.programs()), resident)


def hbm_bytes(programs, resident: int) -> int:
    """HBM bytes of ``programs`` (``(head, loads, stores)`` in launch order, loads as in
    :func:`entry_io`) when a load hits only what one of the previous ``resident`` programs or
    the program itself loaded."""
    seen = defaultdict(list)  # (tensor, bh) -> [(program index, lo, hi)] of recent loads
    total = 0
    for idx, (bh, loads, stores) in enumerate(programs):
        total += stores
        for name, lo, hi, row_bytes in loads:
            key = (name, bh)
            recent = [s for s in seen[key] if s[0] >= idx - resident]
            seen[key] = recent
            covered = sorted((max(a, lo), min(b, hi)) for _, a, b in recent if a < hi and b > lo)
            new, pos = 0, lo
            for a, b in covered:
                if a > pos:
                    new += a - pos
                pos = max(pos, b)
            new += max(hi - pos, 0)
            total += new * row_bytes
            recent.append((idx, lo, hi))
    return total


def reduction_bytes(p: plan.Problem, launch: plan.Launch) -> int:
    """A host-side (torch) reduction over key splits: reads the fp32 partials once, writes the
    global rows once (modelled as one fused pass; torch runs a few elementwise kernels)."""
    s, rows, el = launch.extra["slots"], launch.extra["rows"], ELEM[p.dtype]
    width = {"fwd_merge": (p.Dv * 4 + 4, p.Dv * el + 4), "delta_reduce": (4, 4),
             "dq_reduce": (p.D * 4, p.D * el)}[launch.name]
    return launch.heads * rows * (s * width[0] + width[1])


def launch_stats(p: plan.Problem, launch: plan.Launch, with_bytes: bool = True) -> dict:
    if launch.name not in KERNELS:
        return dict(name=launch.name, programs=0, tiles_per_head=0, cfg={}, flops=0, max_iters=0,
                    mean_iters=0.0, resident=0, bytes=reduction_bytes(p, launch))
    iters = [entry_iters(launch, e) for e in launch.table]
    stats = dict(name=launch.name, programs=launch.heads * launch.tiles,
                 tiles_per_head=launch.tiles, cfg=dict(launch.cfg), flops=launch_flops(p, launch),
                 max_iters=max(iters, default=0), mean_iters=float(np.mean(iters)) if iters else 0.0)
    if with_bytes:
        stats["resident"] = launch_resident(p, launch)
        stats["bytes"] = requested_bytes(p, launch, stats["resident"])
    return stats


def pass_launches(p: plan.Problem, which: str, **kw) -> list[plan.Launch]:
    return plan.forward_plan(p, **kw) if which == "fwd" else plan.backward_plan(p, **kw)


def issued_flops(p: plan.Problem, which: str, **kw) -> dict:
    """``{launch name: MMA FLOPs}`` of one pass (what tests/test_work_model.py checks)."""
    return {la.name: launch_flops(p, la) for la in pass_launches(p, which, **kw)}


def _pair_counts(mask) -> tuple[int, int]:
    """(allowed pairs, pairs inside 128x128 blocks holding any allowed pair)."""
    dense = mask.materialize()
    nq, nv = dense.shape
    pad = torch.zeros(plan.cdiv(nq, 128) * 128, plan.cdiv(nv, 128) * 128, dtype=torch.bool,
                      device=dense.device)
    pad[:nq, :nv] = dense
    blocks = pad.reshape(pad.shape[0] // 128, 128, -1, 128).any(3).any(1)
    return int(dense.sum()), int(blocks.sum()) * 128 * 128


def attention_row(op: str, case: str, p: plan.Problem, mask, which: str) -> dict:
    el = ELEM[p.dtype]
    bh = p.heads
    allowed, flex_pairs = _pair_counts(mask)
    per_pair = {"fwd": 2 * (p.D + p.Dv), "bwd": 2 * (3 * p.D + 2 * p.Dv)}[which]
    flex_per_pair = {"fwd": 2 * (p.D + p.Dv), "bwd": 2 * (5 * p.D + 2 * p.Dv)}[which]
    qkv = el * (p.Nq * p.D + p.Nv * p.D + p.Nv * p.Dv)
    if which == "fwd":  # read q, k, v; write out and the fp32 log-sum-exp
        floor = bh * (qkv + el * p.Nq * p.Dv + 4 * p.Nq)
    else:  # read dout, q, k, v, out, lse; write dq, dk, dv
        floor = bh * (2 * el * p.Nq * p.Dv + qkv + 4 * p.Nq + qkv)
    launches = [launch_stats(p, la) for la in pass_launches(p, which)]
    progs = sum(s["programs"] for s in launches)
    longest = max((s for s in launches if s["programs"]),
                  key=lambda s: (s["max_iters"], s["programs"]))
    return dict(op=op, case=case, **{"pass": which}, dtype=str(p.dtype).replace("torch.", ""),
                shape=dict(B=p.B, H=p.H, Nq=p.Nq, Nv=p.Nv, D=p.D, Dv=p.Dv, kind=p.kind,
                           params=list(p.params)),
                flops_issued=sum(s["flops"] for s in launches), flops_ideal=bh * allowed * per_pair,
                flops_dense=bh * p.Nq * p.Nv * per_pair, flops_flex128=bh * flex_pairs * flex_per_pair,
                flex_bwd_gemms=7 if which == "bwd" else 2,
                bytes_floor=floor, bytes_requested=sum(s["bytes"] for s in launches),
                programs=progs, max_iters_per_program=longest["max_iters"],
                mean_iters_per_program=round(longest["mean_iters"], 3),
                iters_launch=longest["name"], launches=launches)


# H100 rates of DESIGN.md "Floors" (measured there: device copy, dense bf16 matmul), for the
# model's roofline bound max(bytes / BW, FLOPs / peak); a bound, not a timing.
HBM_BYTES_PER_S, MMA_FLOPS_PER_S = 3.0e12, 800e12


def roofline_us(flops: float, nbytes: float) -> float:
    return round(1e6 * max(nbytes / HBM_BYTES_PER_S, flops / MMA_FLOPS_PER_S), 2)


def what_if(p: plan.Problem, row: dict) -> dict:
    """Alternatives the model prices but the kernels do not implement (issue 13, part 4).

    * ``delta_from_fp32_global_out`` (backward): the forward also writes the *global* rows of
      O in fp32 (Ng x Dv x 4 bytes a head) and the backward takes those rows' delta =
      rowsum(dO * O_fp32) from them, so the dQ programs of global tiles (or the delta-only launch
      of their key splits) skip the delta pass over all keys; partial rows keep theirs (1-2 key
      tiles, reused within the program).
    * ``block_m16`` (forward): 16-row query tiles instead of the configured ones, FLOPs only (the
      extra K/V loads of the smaller tiles of a head hit L2 in this model).
    """
    out = {}
    launches = pass_launches(p, row["pass"])
    el = ELEM[p.dtype]
    ng = p.Nq - p.n_seg
    if row["pass"] == "bwd" and p.dtype != torch.float32 and p.kind != plan.KIND_BAND and ng:
        saved_flops, saved_bytes = 0, 0
        for la, st in zip(launches, row["launches"]):
            if la.name in ("dq_delta", "delta_reduce"):
                saved_flops += st["flops"]
                saved_bytes += st["bytes"]
            elif la.name == "dq":
                glob = [e for e in la.table if e[4] and e[5] < 0]
                n = sum(plan.cdiv(e[3] - e[2], la.cfg["BLOCK_N"]) for e in glob)
                bd, bdv = _bd(p)
                saved_flops += la.heads * n * 2 * la.cfg["BLOCK_M"] * la.cfg["BLOCK_N"] * (bd + bdv)
        added = p.heads * ng * (p.Dv * (4 + el) + 4)  # read O_fp32 and dO rows, write delta
        fi, br = row["flops_issued"] - saved_flops, row["bytes_requested"] - saved_bytes + added
        out["delta_from_fp32_global_out"] = dict(
            flops_issued=fi, bytes_requested=br, fwd_bytes_added=p.heads * ng * p.Dv * 4,
            roofline_us=roofline_us(fi, br))
    if row["pass"] == "fwd" and p.kind != plan.KIND_BAND:
        (la,) = [x for x in launches if x.name == "fwd"]
        small = plan.Launch("fwd", la.heads, dict(la.cfg, BLOCK_M=16), plan.query_entries(
            p, 16, la.cfg["BLOCK_N"], plan.SPLIT_MIN_ITERS))
        fi = launch_flops(p, small)
        out["block_m16"] = dict(flops_issued=fi, x_ideal=round(fi / row["flops_ideal"], 2),
                                roofline_us=roofline_us(fi, row["bytes_requested"]))
    return out


_SUMMED = ("flops_issued", "flops_ideal", "flops_dense", "flops_flex128", "bytes_floor",
           "bytes_requested", "programs")


def two_launch_row(case: str, p: plan.Problem, mask: ParGoSelfMask, which: str) -> dict:
    """The two-launch composition ``pargo_self_attention`` replaces (band over the partials, full
    attention over the globals, ``torch.cat`` of the outputs): the two ops' rows summed (their
    launches run one after the other), plus the concatenation's bytes (forward: both outputs
    read, the whole written; backward: dO is sliced as views, no copy)."""
    parts = [attention_row("band", case, pp, m, which) for pp, m in two_launch_parts(mask, p)]
    row = dict(parts[0], op="pargo_self_2launch", case=case,
               shape=dict(parts[0]["shape"], Nq=p.Nq, Nv=p.Nv, kind=p.kind,
                          params=list(p.params)))
    for key in _SUMMED:
        row[key] = sum(r[key] for r in parts)
    longest = max(parts, key=lambda r: (r["max_iters_per_program"], r["programs"]))
    for key in ("max_iters_per_program", "mean_iters_per_program", "iters_launch"):
        row[key] = longest[key]
    row["launches"] = parts[0]["launches"] + parts[1]["launches"]
    if which == "fwd":
        cat = 2 * p.heads * p.Nq * p.Dv * ELEM[p.dtype]
        row["bytes_requested"] += cat
        row["launches"].append(dict(name="cat", programs=0, tiles_per_head=0, cfg={}, flops=0,
                                    max_iters=0, mean_iters=0.0, resident=0, bytes=cat))
    return row


def attention_rows(cases=None) -> list[dict]:
    rows = []
    for name, (op, p, mask) in attention_cases().items():
        if cases and name not in cases and not any(name.startswith(f"{c}-") for c in cases):
            continue
        for which in ("fwd", "bwd"):
            row = attention_row(op, name, p, mask, which)
            row["roofline_us"] = roofline_us(row["flops_issued"], row["bytes_requested"])
            row["what_if"] = what_if(p, row)
            rows.append(row)
            if op == "pargo_self":
                two = two_launch_row(name, p, mask, which)
                two["flops_dense"] = row["flops_dense"]  # every pair of the same N x N problem
                two["roofline_us"] = roofline_us(two["flops_issued"], two["bytes_requested"])
                rows.append(two)
    return rows


def pool_rows(cases=None) -> list[dict]:
    """Rows of the pooling ops (``pool``, ``pool_project``) from ``work_model_pool.py``."""
    try:
        from work_model_pool import pool_rows as rows  # beside this file (pooling ops)
    except ImportError as exc:
        raise SystemExit(f"--ops pool: benchmarks/work_model_pool.py is missing or broken "
                         f"({exc}); run with --ops attention") from exc
    return rows()


def varlen_rows(cases=None) -> list[dict]:
    """Rows of the packed (varlen) attention ops and their padded dense alternative, from
    ``work_model_varlen.py`` (cases ``dynres``, ``dynres-half``)."""
    from work_model_varlen import varlen_rows as rows
    return rows(cases)


PROVIDERS = {"attention": attention_rows, "pool": pool_rows, "varlen": varlen_rows}


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _g(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def markdown(rows: list[dict]) -> str:
    head = ["op", "case", "pass", "FLOPs issued", "x ideal", "x dense", "flex128 / issued",
            "bytes floor", "bytes requested", "x floor", "programs", "iters max / mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ideal = r.get("flops_ideal") or 0
        lines.append("| " + " | ".join([
            r["op"] + (f" [{r['variant']}{', default' if r.get('default') else ''}]"
                       if r.get("variant") else ""),
            r["case"], r["pass"], _g(r["flops_issued"]),
            f"{r['flops_issued'] / ideal:.2f}" if ideal else "-",
            f"{r['flops_issued'] / r['flops_dense']:.2f}" if r.get("flops_dense") else "-",
            f"{r['flops_flex128'] / r['flops_issued']:.2f}" if r.get("flops_flex128") else "-",
            _g(r["bytes_floor"]), _g(r["bytes_requested"]),
            f"{r['bytes_requested'] / r['bytes_floor']:.2f}",
            "-" if r["programs"] is None else str(r["programs"]),
            "-" if r["max_iters_per_program"] is None else  # a modelled alternative, no plan
            f"{r['max_iters_per_program']} / {r['mean_iters_per_program']:.1f} "
            f"({r['max_iters_per_program'] / max(r['mean_iters_per_program'], 1e-9):.1f}x)"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="", help="write the rows to this JSON file")
    ap.add_argument("--ops", default=",".join(PROVIDERS),
                    help=f"comma-separated providers of rows ({', '.join(PROVIDERS)})")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--label", default="model", help="label stored with the rows")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: R comes from the real (sm_90) compiler", file=sys.stderr)
        return 2
    cases = [c for c in args.cases.split(",") if c]
    rows = []
    for name in [o for o in args.ops.split(",") if o]:
        if name not in PROVIDERS:
            ap.error(f"--ops: unknown provider {name!r} (known: {', '.join(PROVIDERS)})")
        rows += PROVIDERS[name](cases or None)
    for r in rows:
        r.setdefault("label", args.label)
    print("Work model (a model, not a timing): H100 sm_90 residency, bf16\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=int)
    return 0


if __name__ == "__main__":
    sys.exit(main())
