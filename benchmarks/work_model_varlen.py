"""Work model of the packed (varlen) attention ops, from the varlen launchers' own plans.

A MODEL, not a timing. Rows as ``work_model.py``'s (same keys, same assumptions: see its
docstring) for ``partial_global_attention_varlen`` and ``band_attention_varlen`` on the
dynamic-resolution batch of ``bench_varlen.py`` (64 images with grids drawn from 16..48, 4
videos x 16 frames at 24x24; ParGo partial grids by its rule, 16 globals per image; H=8, D=64,
bf16), beside the padded dense alternative (every image padded to the largest Nq x Nv).

How the schedule is read (``varlen_launches``): the programs of a launch are the tiles of the
plan (``pargo_kernels.varlen_plan``: its per-sequence rows and cumulative tile counts, checked
against the entries built here), in the launch order of a ``(tiles, H)`` grid (every tile of
head 0, sequence by sequence, then head 1, ...). Each program's loop bounds are those the
varlen kernels (``ops/varlen_triton.py``) compute in-kernel from the sequence's row:

* query programs (forward, dQ): the sequence's partial tiles, then its global tiles (no tile
  mixes the two); key loop ``[n_lo, n_hi)`` of the tile's rows, which is
  ``attention_plan.query_entries`` of that sequence alone without the fixed-shape splits; a
  global tile of a sequence the plan splits (``varlen_plan.SPLIT_KEYS``) is ``nsplit``
  programs over the key chunks of the plan row; a 16-bit dQ program runs the delta pass and
  the dQ pass, a split one the dQ pass only, after a delta-only launch (``dq_delta``) over the
  split programs; the host-side merges (``fwd_merge``, ``delta_reduce``, ``dq_reduce``) are
  priced as the fixed-shape model's reductions plus one write and read of the reduced rows
  (``index_copy_`` into the packed rows);
* key programs (dK/dV): query rows ``[q_lo, q_hi)`` from ``_key_tile_queries`` (the inverse
  window map, conservative by up to a tile, mirrored in :func:`key_entries`), then the global
  rows ``[Np, Nq)``;
* fp32 inputs add the fixed-shape delta kernel over all ``total_q`` rows (no MMA).

FLOPs per program and loads / stores come from ``work_model.entry_dots`` / ``entry_io`` on the
sequence's own ``Problem``; loads are shifted to packed row coordinates, so the residency rule
(``work_model.hbm_bytes``, R from the sm_90 AOT compile of the varlen kernel) sees neighbouring
sequences' programs. Not counted: each program's binary search over the plan rows (``STEPS``
int32 loads of a few KB of metadata, L2-resident).

``flops_ideal`` counts allowed pairs; ``flops_dense`` every pair inside the sequences
(``sum Nq_i Nv_i``); ``flops_flex128`` FlexAttention's 128x128 blocks of the packed
``[total_q, total_k]`` problem holding an allowed pair (7 backward GEMMs); ``flops_padded`` and
the ``*_padded_dense`` rows: a dense kernel on the padded ``[n_img, H, Nq_max, Nv_max]``
tensors computing every pair, reading the padded tensors once and a bool mask
``[n_img, 1, Nq_max, Nv_max]`` once per head (the mask broadcast over heads), writing the
padded output; an assumption of this model, not a measured SDPA schedule.

    python benchmarks/work_model.py --ops varlen [--json PATH]
"""
from __future__ import annotations

import heapq

import numpy as np
import torch

import work_model as wm
from pargo_kernels import varlen_plan as vp
from pargo_kernels.masks import KIND_BAND, KIND_PG1D
from pargo_kernels.ops import attention_plan as plan
from pargo_kernels.ops.varlen_triton import varlen_tile_config

NO_SPLIT = 2**62
KERNELS = {"fwd": "_varlen_fwd_kernel", "dq": "_varlen_bwd_dq_kernel",
           "dkdv": "_varlen_bwd_dkdv_kernel"}
Q_ROWS = ("Q", "dO", "LSE", "delta", "O")  # tensors indexed by query rows (the rest: key rows)


def seq_problems(vplan: vp.VarlenPlan, H: int, D: int, Dv: int, dtype, window=(0, 0)):
    """``(q_start, k_start, Problem, (nsplit, chunk))`` of every sequence, from the plan's rows
    (band: the per-call window clipped to the sequence, as the kernels do; key splits of the
    global tiles as planned, ``varlen_plan.SPLIT_KEYS``)."""
    out = []
    for row in vplan.meta_host[:-1].tolist():
        nq, nv = row[vp.A_NQ], row[vp.A_NV]
        if vplan.kind == KIND_BAND:  # the call's window or the plan's per-sequence one
            left, right = vp.band_window(row, window)
            params = (min(left, nq - 1), min(right, nq - 1), 0, 0, 0)
        else:
            params = tuple(row[vp.A_P0:vp.A_P0 + 5])
        out.append((row[vp.A_Q_START], row[vp.A_K_START],
                    plan.Problem(1, H, nq, nv, D, Dv, dtype, vplan.kind, params),
                    (row[vp.A_NSPLIT], row[vp.A_CHUNK])))
    return out


def query_entries(p: plan.Problem, block_m: int, block_n: int, split) -> np.ndarray:
    """Forward / dQ programs of one sequence in the varlen order: partial tiles, then every
    global tile as ``nsplit`` programs over key chunks ``[s c, min((s + 1) c, Nv))`` (slot
    ``s``; an empty chunk runs no key tile), as ``_query_tile`` in varlen_triton.py."""
    nsplit, chunk = split
    e = plan.query_entries(p, block_m, block_n, NO_SPLIT)
    glob = e[e[:, 4] == 1]
    if nsplit > 1:
        glob = np.array([(m0, row_end, s * chunk, min((s + 1) * chunk, p.Nv), 1, s)
                         for m0, row_end, *_ in glob.tolist() for s in range(nsplit)],
                        np.int64).reshape(-1, plan.ENTRY)
    return np.concatenate([e[e[:, 4] == 0], glob])


def key_entries(p: plan.Problem, block_n: int) -> np.ndarray:
    """dK/dV programs of one sequence: ``(n0, q_lo, q_hi, g_lo, g_hi, 0)`` with the rows of
    ``_key_tile_queries`` (varlen_triton.py), which may be up to a tile wider than exact."""
    nq, nv, (p0, p1, p2, p3, p4) = p.Nq, p.Nv, (int(x) for x in p.params)
    n0 = np.arange(0, nv, block_n, dtype=np.int64)
    n_last = np.minimum(n0 + block_n, nv) - 1
    if p.kind == KIND_BAND:
        q_lo, q_hi = np.maximum(n0 - p1, 0), np.minimum(n_last + p0 + 1, nq)
    elif p.kind == KIND_PG1D:
        q_lo = np.maximum(((n0 + 1) * p0 + nv - 1) // nv - 1, 0)
        q_hi = np.minimum(((n_last + 1) * p0 + nv - 1) // nv, p0)
    else:
        q_lo = ((n0 // p2) * p3) // p1 * p4
        q_hi = np.minimum(((n_last // p2 + 1) * p3 + p1 - 1) // p1, p3) * p4
    glob = (0, 0) if p.kind == KIND_BAND else (p0, nq)
    g_lo, g_hi = np.full_like(n0, glob[0]), np.full_like(n0, glob[1])
    return np.stack([n0, q_lo, q_hi, g_lo, g_hi, np.zeros_like(n0)], 1)


def _reduction(name: str, vplan: vp.VarlenPlan, H: int) -> plan.Launch:
    """A host-side (torch) reduction over the key splits (``varlen_triton``: the fixed-shape
    ``_merge_splits`` or a sum over slots, then an ``index_copy_`` into the packed rows)."""
    return plan.Launch(name, H, {}, np.zeros((0, plan.ENTRY), np.int64),
                       dict(slots=vplan.n_split, rows=vplan.split_rows))


def varlen_launches(vplan: vp.VarlenPlan, which: str, H: int, D: int, Dv: int, dtype,
                    window=(0, 0)) -> list[dict]:
    """The pass's launches in order: ``dict(launch, seqs=[(q_start, k_start, Problem,
    table)])`` for a kernel launch (``launch`` a ``plan.Launch`` carrying the name, tile config
    and flags), ``dict(launch)`` for a host-side reduction over key splits (``fwd_merge``,
    ``delta_reduce``, ``dq_reduce``), as ``varlen_forward`` / ``varlen_backward`` run them."""
    seqs = seq_problems(vplan, H, D, Dv, dtype, window)
    bd = max(plan.block_dims(D, Dv))
    delta_pass = dtype != torch.float32
    split = vplan.n_split > 1
    if which == "fwd":
        names = ["fwd"] + (["fwd_merge"] if split else [])
    else:
        names = (["dq_delta", "delta_reduce"] if split and delta_pass else []) + ["dq"] + \
            (["dq_reduce"] if split else []) + ["dkdv"]
    out = []
    for name in names:
        if name.endswith(("_merge", "_reduce")):
            out.append(dict(launch=_reduction(name, vplan, H)))
            continue
        cfg = varlen_tile_config("dq" if name == "dq_delta" else name, bd, dtype)
        launch = plan.Launch(name, H, cfg, np.zeros((0, plan.ENTRY), np.int64),
                             dict(delta_pass=delta_pass))
        if name == "dkdv":
            tables = [key_entries(p, cfg["BLOCK_N"]) for _, _, p, _ in seqs]
            planned = vplan.tiles(vp.A_KTILES, cfg["BLOCK_N"])
        else:
            tables = [query_entries(p, cfg["BLOCK_M"], cfg["BLOCK_N"], sp) for _, _, p, sp in seqs]
            if name == "dq_delta":  # the key-split programs only
                tables = [t[t[:, 5] >= 0] for t in tables]
            planned = vplan.tiles(vp.A_STILES if name == "dq_delta" else vp.A_QTILES,
                                  cfg["BLOCK_M"])
        if sum(len(t) for t in tables) != planned:  # the plan's grid is what the model reads
            raise AssertionError(f"{name}: {sum(len(t) for t in tables)} entries, plan has "
                                 f"{planned} tiles")
        out.append(dict(launch=launch, seqs=[(qs, ks, p, t) for (qs, ks, p, _), t in
                                             zip(seqs, tables)]))
    return out


def launch_flops(la: dict) -> int:
    launch = la["launch"]
    return launch.heads * sum(2 * c * m * n * k for _, _, p, table in la["seqs"] for e in table
                              for c, m, n, k in wm.entry_dots(p, launch, e))


def issued_flops(vplan, which, H, D, Dv, dtype, window=(0, 0)) -> dict:
    """``{kernel launch name: MMA FLOPs}`` (what tests/test_work_model.py checks; the host-side
    reductions issue no MMA)."""
    return {la["launch"].name: launch_flops(la)
            for la in varlen_launches(vplan, which, H, D, Dv, dtype, window) if "seqs" in la}


def _programs(la: dict):
    """``(head, loads in packed rows, stores)`` of every program in launch order."""
    launch = la["launch"]
    ios = [(qs, ks, [wm.entry_io(p, launch, e) for e in table]) for qs, ks, p, table in la["seqs"]]
    for h in range(launch.heads):
        for qs, ks, entries in ios:
            for loads, stores in entries:
                yield h, [(n, lo + (qs if n in Q_ROWS else ks), hi + (qs if n in Q_ROWS else ks),
                           b) for n, lo, hi, b in loads], stores


def makespan(iters: list[int], heads: int, resident: int) -> int:
    """Iterations until the last program of a launch ends when its programs (``iters`` per head,
    every head alike, in launch order) start as soon as one of ``resident`` slots frees, each
    taking its main-loop trips plus one (prologue and epilogue): list scheduling, the load
    balance figure of this model (a model of the SM schedule, not a timing)."""
    slots = [0] * max(resident, 1)
    for x in iters * heads:
        heapq.heappush(slots, heapq.heappop(slots) + x + 1)
    return max(slots)


def launch_stats(la: dict, kind: int, dtype, D: int, Dv: int) -> dict:
    launch = la["launch"]
    if "seqs" not in la:  # a host-side reduction: the fixed-shape model's bytes, plus the
        # index_copy_ pass over the reduced fp32 rows (written once, read once)
        width = {"fwd_merge": Dv * 4 + 4, "delta_reduce": 4, "dq_reduce": D * 4}[launch.name]
        p = plan.Problem(1, launch.heads, 1, 1, D, Dv, dtype, kind, (0,) * 5)
        nbytes = wm.reduction_bytes(p, launch) + 2 * launch.heads * launch.extra["rows"] * width
        return dict(name=launch.name, programs=0, tiles_per_head=0, cfg={}, flops=0, max_iters=0,
                    mean_iters=0.0, resident=0, bytes=nbytes, makespan_iters=0)
    iters = [wm.entry_iters(launch, e) for _, _, _, t in la["seqs"] for e in t]
    kernel = KERNELS["dq" if launch.name == "dq_delta" else launch.name]
    bd = max(plan.block_dims(D, Dv))
    resident = wm.resident_programs(*wm.resources(kernel, kind, dtype, bd, "varlen-",
                                                  delta_only=launch.name == "dq_delta"))
    return dict(name=launch.name, programs=launch.heads * len(iters), tiles_per_head=len(iters),
                cfg=dict(launch.cfg), flops=launch_flops(la), max_iters=max(iters, default=0),
                mean_iters=float(np.mean(iters)) if iters else 0.0, resident=resident,
                bytes=wm.hbm_bytes(_programs(la), resident),
                makespan_iters=makespan(iters, launch.heads, resident))


def pair_counts(masks, cu_q, cu_k, block: int = 128) -> tuple[int, int, int]:
    """(allowed pairs, pairs inside the packed problem's ``block``-square blocks holding an
    allowed pair, pairs of every sequence)."""
    allowed, blocks, within = 0, set(), 0
    for i, m in enumerate(masks):
        dense = m.materialize()
        allowed += int(dense.sum())
        within += dense.numel()
        nz = dense.nonzero()
        ids = ((nz[:, 0] + cu_q[i]) // block) * (1 << 32) + (nz[:, 1] + cu_k[i]) // block
        blocks.update(torch.unique(ids).tolist())
    return allowed, len(blocks) * block * block, within


def varlen_row(op: str, case: str, vplan, masks, which: str, H: int, D: int, dtype,
               window=(0, 0)) -> dict:
    el = wm.ELEM[dtype]
    cu_q = vplan.meta_host[:, vp.A_Q_START].tolist()
    cu_k = vplan.meta_host[:, vp.A_K_START].tolist()
    tq, tk = cu_q[-1], cu_k[-1]
    allowed, flex_pairs, within = pair_counts(masks, cu_q, cu_k)
    per_pair = {"fwd": 4 * D, "bwd": 10 * D}[which]
    flex_per_pair = {"fwd": 4 * D, "bwd": 14 * D}[which]
    qkv = el * D * (tq + 2 * tk)
    floor = H * (qkv + el * tq * D + 4 * tq) if which == "fwd" else \
        H * (2 * el * tq * D + qkv + 4 * tq + qkv)
    launches = [launch_stats(la, vplan.kind, dtype, D, D)
                for la in varlen_launches(vplan, which, H, D, D, dtype, window)]
    if which == "bwd" and dtype == torch.float32:  # the fixed-shape delta kernel, no MMA
        launches.insert(0, dict(name="delta", programs=0, flops=0, max_iters=0, mean_iters=0.0,
                                bytes=H * tq * (2 * D * el + 4)))
    longest = max((s for s in launches if s["programs"]),
                  key=lambda s: (s["max_iters"], s["programs"]))
    n_seq = len(masks)
    nq_max = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    nv_max = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    return dict(op=op, case=case, **{"pass": which}, dtype=str(dtype).replace("torch.", ""),
                shape=dict(n_seq=n_seq, H=H, D=D, Dv=D, total_q=tq, total_k=tk, nq_max=nq_max,
                           nv_max=nv_max, kind=vplan.kind),
                flops_issued=sum(s["flops"] for s in launches), flops_ideal=H * allowed * per_pair,
                flops_dense=H * within * per_pair, flops_flex128=H * flex_pairs * flex_per_pair,
                flex_bwd_gemms=7 if which == "bwd" else 2,
                flops_padded=H * n_seq * nq_max * nv_max * per_pair,
                bytes_floor=floor, bytes_requested=sum(s["bytes"] for s in launches),
                programs=sum(s["programs"] for s in launches),
                max_iters_per_program=longest["max_iters"],
                mean_iters_per_program=round(longest["mean_iters"], 3),
                makespan_iters=sum(s.get("makespan_iters", 0) for s in launches),
                iters_launch=longest["name"], launches=launches)


def padded_row(row: dict) -> dict:
    """The padded dense alternative of a varlen row (module docstring: an assumption)."""
    s, el = row["shape"], wm.ELEM[getattr(torch, row["dtype"])]
    n, H, D, nq, nv = s["n_seq"], s["H"], s["D"], s["nq_max"], s["nv_max"]
    qkv = el * D * n * (nq + 2 * nv)
    mask = n * nq * nv
    if row["pass"] == "fwd":
        floor = H * (qkv + el * n * nq * D + 4 * n * nq) + mask
    else:
        floor = H * (2 * el * n * nq * D + 2 * qkv + 4 * n * nq) + mask
    return dict(row, op=row["op"].replace("_varlen", "_padded_dense"),
                flops_issued=row["flops_padded"], bytes_floor=floor,
                bytes_requested=floor + (H - 1) * mask, programs=None,
                max_iters_per_program=None, mean_iters_per_program=None, iters_launch=None,
                makespan_iters=None, launches=[],
                label_note="padded dense: every pair of the padded tensors, mask read once per "
                           "head (assumption, not a schedule)")


def dynres_cases(smoke: bool = False, split_keys=None) -> dict:
    """(op, name) -> (plan, masks, window) for the bench_varlen.py batch (full and half);
    ``split_keys`` as in ``plan_partial_global`` (``NO_SPLIT``: the plan before key splits)."""
    from bench_varlen import BAND_WINDOW, Packed, batch_grids
    out = {}
    for name, half in (("dynres", False), ("dynres-half", True)):
        grids = batch_grids(smoke, half)
        for op in ("partial_global", "band"):
            pk_ = Packed(op, grids, 64)
            out[(f"{op}_varlen", name)] = (pk_.plan("cpu", split_keys), pk_.masks,
                                           BAND_WINDOW if op == "band" else (0, 0))
    return out


BEFORE = "before: no key split"


def varlen_rows(cases=None) -> list[dict]:
    """Rows of the packed ops (their plans as run now) and their padded dense alternative,
    plus, for partial-global, the same plan without key splits (``variant`` ``BEFORE``: the
    schedule before the splits, kept for comparison)."""
    from bench_varlen import H
    rows = []
    before = dynres_cases(split_keys=NO_SPLIT)
    for (op, name), (vplan, masks, window) in dynres_cases().items():
        if cases and name not in cases:
            continue
        for which in ("fwd", "bwd"):
            row = varlen_row(op, name, vplan, masks, which, H, 64, torch.bfloat16, window)
            row["roofline_us"] = wm.roofline_us(row["flops_issued"], row["bytes_requested"])
            pad = padded_row(row)
            pad["roofline_us"] = wm.roofline_us(pad["flops_issued"], pad["bytes_requested"])
            rows += [row, pad]
            if op == "partial_global_varlen":
                old = varlen_row(op, name, before[(op, name)][0], masks, which, H, 64,
                                 torch.bfloat16, window)
                old["roofline_us"] = wm.roofline_us(old["flops_issued"], old["bytes_requested"])
                rows.append(dict(old, variant=BEFORE))
    return rows


__all__ = ["varlen_rows", "issued_flops", "varlen_launches"]
