"""Triton kernels for packed (varlen) block-sparse attention: partial-global (1-D, 2-D) and band.

Tokens of all sequences are concatenated, ``q [total_q, H, D]``, ``k [total_k, H, D]``,
``v [total_k, H, Dv]``; sequence ``s`` is one int32 row of the plan's metadata
(:mod:`pargo_kernels.varlen_plan`): its offsets, lengths, mask parameters ``P0..P4`` and the
cumulative number of query / key tiles of every planned tile size. Launch grids are
``(sum_s tiles_s, H)``: program ``t`` finds its sequence by a binary search over the cumulative
tile counts, so tiles are scheduled over the concatenation (no program idles because another
sequence is longer) and a program reads only its own sequence's rows.

A global query tile of a sequence the plan splits (``varlen_plan.SPLIT_KEYS``) is ``nsplit``
consecutive programs, each over one key chunk, writing fp32 partials (output and LSE; dQ:
partial dQ, after a delta-only launch over the split programs for 16-bit inputs) to workspaces
``[H, S, G, ...]`` over the global rows of split sequences; the launchers merge them with the
fixed-shape ``_merge_splits`` / a sum in slot order (deterministic, no atomics) and copy the
merged rows into the packed outputs.

Inside a sequence everything is the fixed-shape algorithm of :mod:`attention_triton`, whose
device helpers (``_query_tile``, ``_row_windows``, ``_allowed``, ``_dq_tile``, ``_dkdv_rows``,
``_dot``) run here on the sequence's local row indices and base pointers; the band window is a
pair of runtime scalars or the sequence's own pair from its plan row (``P0, P1``: per-sequence
windows, ``varlen_plan.plan_band(windows=...)``), clipped per sequence; the dK/dV programs
invert the window of their own sequence. Offsets are int64 (a sequence start times a row
stride may exceed 2**31). ``LSE`` and ``DELTA`` are ``[H, total_q]`` fp32, base 2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import varlen_plan as _plan
from ..masks import KIND_BAND, KIND_PG1D, KIND_PG2D
from . import attention_plan as _aplan
from .attention_plan import block_dims, delta_block_m, tile_config
from .attention_triton import (LOG2E, _TL_DTYPE, _attn_bwd_delta_kernel, _delta_pass, _dkdv_rows,
                               _dq_pass, _fwd_pass, _merge_splits, _precision, _row_windows)
from .varlen_pool_triton import _find_seq

A_Q_START = tl.constexpr(_plan.A_Q_START)
A_K_START = tl.constexpr(_plan.A_K_START)
A_NQ = tl.constexpr(_plan.A_NQ)
A_NV = tl.constexpr(_plan.A_NV)
A_P0 = tl.constexpr(_plan.A_P0)
A_NSPLIT = tl.constexpr(_plan.A_NSPLIT)
A_CHUNK = tl.constexpr(_plan.A_CHUNK)
A_GSTART = tl.constexpr(_plan.A_GSTART)
A_FIELDS = tl.constexpr(_plan.A_FIELDS)

_NO_SPEC = ["total_q", "n_seq", "STEPS", "LEFT", "RIGHT", "NSPLIT", "GROWS"]


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _sequence(META, TILE_COL: tl.constexpr, n_seq, STEPS, LEFT, RIGHT,
              KIND: tl.constexpr):
    """Sequence of this program (axis 0 = a tile of the concatenation): its local tile index,
    offsets (int64), lengths and mask parameters."""
    t = tl.program_id(0)
    s = _find_seq(META, TILE_COL, t, n_seq, STEPS, A_FIELDS)
    row = META + s * A_FIELDS
    nq = tl.load(row + A_NQ)
    nv = tl.load(row + A_NV)
    if KIND == 2:  # band: the per-call window or the plan's per-sequence one (the other is
        # (0, 0): their maximum), clipped to this sequence (no key beyond it)
        p0 = tl.minimum(tl.maximum(LEFT, tl.load(row + A_P0)), nq - 1)
        p1 = tl.minimum(tl.maximum(RIGHT, tl.load(row + A_P0 + 1)), nq - 1)
        p2 = p0 * 0
        p3 = p2
        p4 = p2
    else:
        p0 = tl.load(row + A_P0)
        p1 = tl.load(row + A_P0 + 1)
        p2 = tl.load(row + A_P0 + 2)
        p3 = tl.load(row + A_P0 + 3)
        p4 = tl.load(row + A_P0 + 4)
    return (t - tl.load(row + TILE_COL), tl.load(row + A_Q_START).to(tl.int64),
            tl.load(row + A_K_START).to(tl.int64), nq, nv, p0, p1, p2, p3, p4, row)


@triton.jit
def _query_tile(local, nq, nv, P0, row, SPLITS_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
                KIND: tl.constexpr):
    """Query program ``local`` of a sequence: (first row, end of its row segment, is it a
    global tile, key-split slot (-1: none), the split's key range ``[k_lo, k_hi)``).
    Partial-global masks put partial tiles first (rows ``[0, Np)``), then global tiles (rows
    ``[Np, Nq)``), each as ``nsplit`` consecutive programs, one per key chunk (the plan's rule,
    ``varlen_plan.SPLIT_KEYS``); ``SPLITS_ONLY``: ``local`` counts the split programs only.
    A band has one segment and no split."""
    if KIND == 2:
        n_seg = nq
        nsplit = 1
        chunk = nv
    else:
        n_seg = P0
        nsplit = tl.load(row + A_NSPLIT)
        chunk = tl.load(row + A_CHUNK)
    n_ptiles = tl.cdiv(n_seg, BLOCK_M)
    if SPLITS_ONLY:
        local = local + n_ptiles
    is_global = local >= n_ptiles
    g = tl.maximum(local - n_ptiles, 0)
    tile = tl.where(is_global, n_ptiles + g // nsplit, local)
    slot = tl.where(is_global & (nsplit > 1), g % nsplit, -1)
    m0 = tile * BLOCK_M + is_global.to(tl.int32) * (n_seg - n_ptiles * BLOCK_M)
    row_end = tl.where(is_global, nq, n_seg)
    k_lo = tl.maximum(slot, 0) * chunk
    k_hi = tl.where(slot >= 0, tl.minimum(k_lo + chunk, nv), nv)
    return m0, row_end, is_global, slot, k_lo, k_hi


@triton.jit
def _varlen_query_program(Q, K, V, META, sqn, sqh, sqd, skn, skh, svn, svh, n_seq,
                          STEPS, LEFT, RIGHT, NSPLIT, GROWS, D: tl.constexpr,
                          TILE_COL: tl.constexpr, SPLITS_ONLY: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, KIND: tl.constexpr):
    """Prologue of a query-tile program (forward, dQ): the sequence's query offset and head
    (int64), rows (local int32 indices: the window arithmetic stays 32-bit, pointer offsets
    are int64, see ``_offsets``), their windows, the key range ``[n_lo, n_hi)`` the tile visits
    (a key split's chunk of it), the Q tile, the sequence's K / V base pointers, the split slot
    (-1: none) and the sequence's plan row."""
    local, q_start, k_start, nq, nv, p0, p1, p2, p3, p4, row = _sequence(
        META, TILE_COL, n_seq, STEPS, LEFT, RIGHT, KIND)
    h = tl.program_id(1).to(tl.int64)
    m0, row_end, is_global, slot, k_lo, k_hi = _query_tile(local, nq, nv, p0, row, SPLITS_ONLY,
                                                           BLOCK_M, KIND)
    rows = m0 + tl.arange(0, BLOCK_M)
    valid = rows < row_end
    lo, hi, x0, x1 = _row_windows(rows, valid, is_global, nv, p0, p1, p2, p3, p4, KIND)
    # a key split's rows see its chunk only (the loop's last tile may reach past the chunk)
    lo = tl.maximum(lo, k_lo)
    hi = tl.minimum(hi, k_hi)
    n_lo = tl.min(tl.where(valid, lo, nv), 0)
    n_hi = tl.max(hi, 0)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + _offsets(q_start, rows, sqn, h, sqh) + d[None, :] * sqd,
                mask=valid[:, None] & (d[None, :] < D), other=0.0)
    return (q_start, h, rows, valid, lo, hi, x0, x1, n_lo, n_hi, p2, q,
            K + k_start * skn + h * skh, V + k_start * svn + h * svh, slot, row)


@triton.jit
def _split_rows(row, h, slot, rows, NSPLIT, GROWS):
    """int64 index of a key split's rows into a split workspace ``[H, NSPLIT, GROWS, ...]``
    (the global rows of split sequences; computed at store time, not held across the loop)."""
    return ((h * NSPLIT + slot) * GROWS + tl.load(row + A_GSTART)
            + (rows - tl.load(row + A_P0)).to(tl.int64))


@triton.jit
def _offsets(start, rows, s_row, h, s_head):
    """``[len(rows), 1]`` int64 element offsets of local rows of a sequence starting at
    ``start`` (int64), head ``h`` (int64)."""
    return (start + rows.to(tl.int64))[:, None] * s_row + h * s_head


@triton.jit
def _key_tile_queries(n0, n_last, nq, nv, p0, p1, p2, p3, p4, KIND: tl.constexpr):
    """Rows ``[q_lo, q_hi)`` of the first query segment (partial queries, or every row of a
    band) whose windows can hold a key in ``[n0, n_last]``: the inverse window map,
    conservative by at most a tile (the kernels mask pair by pair)."""
    if KIND == 2:
        q_lo = tl.maximum(n0 - p1, 0)
        q_hi = tl.minimum(n_last + p0 + 1, nq)
    elif KIND == 0:
        q_lo = tl.maximum(((n0 + 1) * p0 + nv - 1) // nv - 1, 0)
        q_hi = tl.minimum(((n_last + 1) * p0 + nv - 1) // nv, p0)
    else:
        r_lo = ((n0 // p2) * p3) // p1
        r_hi = tl.minimum(((n_last // p2 + 1) * p3 + p1 - 1) // p1, p3)
        q_lo = r_lo * p4
        q_hi = r_hi * p4
    return q_lo, q_hi


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPEC)
def _varlen_fwd_kernel(
    Q, K, V, O, LSE, OWS, LWS, META,
    sqn, sqh, sqd, skn, skh, skd, svn, svh, svd, son, soh, sod,
    total_q, n_seq, STEPS, LEFT, RIGHT, NSPLIT, GROWS, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, TILE_COL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    q_start, h, rows, valid, lo, hi, x0, x1, n_lo, n_hi, p2, q, k_base, v_base, slot, row = \
        _varlen_query_program(Q, K, V, META, sqn, sqh, sqd, skn, skh, svn, svh, n_seq, STEPS,
                              LEFT, RIGHT, NSPLIT, GROWS, D, TILE_COL, False, BLOCK_M, BLOCK_D,
                              KIND)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    o, m_i, l_safe = _fwd_pass(q, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd, lo, hi,
                               x0, x1, p2, qk_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_DV, KIND,
                               PRECISION)
    if slot >= 0:  # one key split of a global tile: fp32 partials, merged on the host
        ws = _split_rows(row, h, slot, rows, NSPLIT, GROWS)
        tl.store(OWS + ws[:, None] * DV + dv[None, :], o,
                 mask=valid[:, None] & (dv[None, :] < DV))
        tl.store(LWS + ws, m_i + tl.log2(l_safe), mask=valid)
    else:
        tl.store(O + _offsets(q_start, rows, son, h, soh) + dv[None, :] * sod,
                 o.to(O.dtype.element_ty),
                 mask=valid[:, None] & (dv[None, :] < DV))
        tl.store(LSE + h * total_q + q_start + rows, m_i + tl.log2(l_safe), mask=valid)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPEC)
def _varlen_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DQWS, DWS, META,
    sqn, sqh, sqd, skn, skh, skd, svn, svh, svd, sdon, sdoh, sdod, sdqn, sdqh, sdqd,
    total_q, n_seq, STEPS, LEFT, RIGHT, NSPLIT, GROWS, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, TILE_COL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, DELTA_PASS: tl.constexpr,
    DELTA_ONLY: tl.constexpr,
):
    q_start, h, rows, valid, lo, hi, x0, x1, n_lo, n_hi, p2, q, k_base, v_base, slot, row = \
        _varlen_query_program(Q, K, V, META, sqn, sqh, sqd, skn, skh, svn, svh, n_seq, STEPS,
                              LEFT, RIGHT, NSPLIT, GROWS, D, TILE_COL, DELTA_ONLY, BLOCK_M,
                              BLOCK_D, KIND)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    do = tl.load(DO + _offsets(q_start, rows, sdon, h, sdoh) + dv[None, :] * sdod,
                 mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
    stat = h * total_q + q_start  # LSE / DELTA row offset of the sequence (scalar)
    lse = tl.load(LSE + stat + rows, mask=valid, other=0.0)

    # Pass 1 (16-bit inputs): delta = rowsum(P * dP) from the fp32 P and dP, as in the
    # fixed-shape dQ kernel (see there why not rowsum(dO * O) of the rounded O). A key split of
    # a global tile (slot >= 0) reads its rows' delta, reduced beforehand from the per-split
    # partial sums of the DELTA_ONLY launch (over the split programs only), and writes an fp32
    # partial dQ, summed afterwards in slot order.
    if DELTA_ONLY:
        delta = _delta_pass(q, do, lse, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd,
                            lo, hi, x0, x1, p2, qk_scale, D, DV, BLOCK_M, BLOCK_N, KIND, PRECISION)
        tl.store(DWS + _split_rows(row, h, slot, rows, NSPLIT, GROWS), delta, mask=valid)
    else:
        if (slot < 0) & DELTA_PASS:
            delta = _delta_pass(q, do, lse, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn,
                                svd, lo, hi, x0, x1, p2, qk_scale, D, DV, BLOCK_M, BLOCK_N, KIND,
                                PRECISION)
            tl.store(DELTA + stat + rows, delta, mask=valid)
        else:
            delta = tl.load(DELTA + stat + rows, mask=valid, other=0.0)
        dq = _dq_pass(q, do, lse, delta, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd,
                      lo, hi, x0, x1, p2, qk_scale, sm_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_D,
                      KIND, PRECISION)
        if slot >= 0:
            ws = _split_rows(row, h, slot, rows, NSPLIT, GROWS)
            tl.store(DQWS + ws[:, None] * D + d[None, :], dq,
                     mask=valid[:, None] & (d[None, :] < D))
        else:
            tl.store(DQ + _offsets(q_start, rows, sdqn, h, sdqh) + d[None, :] * sdqd,
                     dq.to(DQ.dtype.element_ty), mask=valid[:, None] & (d[None, :] < D))


@triton.jit(do_not_specialize=_NO_SPEC)
def _varlen_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, META,
    sqn, sqh, sqd, skn, skh, skd, svn, svh, svd, sdon, sdoh, sdod,
    sdkn, sdkh, sdkd, sdvn, sdvh, sdvd,
    total_q, n_seq, STEPS, LEFT, RIGHT, NSPLIT, GROWS, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, TILE_COL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    local, q_start, k_start, nq, nv, p0, p1, p2, p3, p4, _ = _sequence(
        META, TILE_COL, n_seq, STEPS, LEFT, RIGHT, KIND)
    h = tl.program_id(1).to(tl.int64)
    n0 = local * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    kv_ok = cols < nv
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + _offsets(k_start, cols, skn, h, skh) + d[None, :] * skd,
                mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
    v = tl.load(V + _offsets(k_start, cols, svn, h, svh) + dv[None, :] * svd,
                mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
    q_lo, q_hi = _key_tile_queries(n0, tl.minimum(n0 + BLOCK_N, nv) - 1, nq, nv,
                                   p0, p1, p2, p3, p4, KIND)

    q_base = Q + q_start * sqn + h * sqh
    do_base = DO + q_start * sdon + h * sdoh
    lse_base = LSE + h * total_q + q_start
    delta_base = DELTA + h * total_q + q_start
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dk, dv_acc = _dkdv_rows(dk, dv_acc, k, v, cols, q_lo, q_hi, False, q_base, do_base, lse_base,
                            delta_base, sqn, sqd, sdon, sdod, nv, p0, p1, p2, p3, p4, qk_scale,
                            D, DV, KIND, BLOCK_M, BLOCK_D, BLOCK_DV, PRECISION)
    if KIND != 2:  # every global query sees every key of its sequence
        dk, dv_acc = _dkdv_rows(dk, dv_acc, k, v, cols, p0, nq, True, q_base,
                                do_base, lse_base, delta_base, sqn, sqd, sdon, sdod, nv,
                                p0, p1, p2, p3, p4, qk_scale, D, DV, KIND, BLOCK_M, BLOCK_D,
                                BLOCK_DV, PRECISION)
    tl.store(DK + _offsets(k_start, cols, sdkn, h, sdkh) + d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok[:, None] & (d[None, :] < D))
    tl.store(DV_ + _offsets(k_start, cols, sdvn, h, sdvh) + dv[None, :] * sdvd,
             dv_acc.to(DV_.dtype.element_ty), mask=kv_ok[:, None] & (dv[None, :] < DV))


# --------------------------------------------------------------------------------------------
# launchers (``plan``: an attention VarlenPlan; nothing here reads a device tensor)
# --------------------------------------------------------------------------------------------
def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every output and workspace (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_lengths(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Tensor lengths against the plan. Row offsets are 64-bit everywhere (the sequence start
    and the local rows of the shared helpers), so no sequence length is refused for its
    strides."""
    plan.check_lengths(q.shape[0], k.shape[0])


# Per-arch varlen tiles where the fixed-shape table (attention_plan.tile_config, itself per
# arch) spills in the varlen kernels, whose per-sequence scalars (offsets, lengths, mask
# parameters) hold extra registers; found by `python -m pargo_kernels.aot --arch 75 80 86 89 90
# --filter _varlen_fwd _varlen_bwd`.
# (kernel, dtype class, padded head dim) -> (BLOCK_M, BLOCK_N, num_warps, num_stages).
_SM80 = {("dq", "16bit", 64): (32, 64, 4, 2), ("dq", "fp32", 64): (16, 32, 4, 1),
         ("dq", "fp32", 128): (16, 16, 4, 1), ("dq", "fp32", 256): (16, 16, 8, 1),
         ("dkdv", "16bit", 32): (32, 32, 4, 1), ("dkdv", "16bit", 64): (32, 32, 4, 2),
         ("dkdv", "fp32", 128): (16, 16, 8, 1), ("dkdv", "fp32", 256): (16, 16, 8, 1),
         ("fwd", "fp32", 256): (16, 16, 8, 1)}
_SM90 = {("dq", "fp32", 16): (32, 16, 4, 1), ("dq", "fp32", 128): (16, 16, 4, 1),
         ("dq", "fp32", 256): (16, 16, 4, 1), ("dkdv", "fp32", 256): (16, 16, 8, 1),
         ("fwd", "fp32", 16): (32, 16, 4, 1), ("fwd", "fp32", 32): (32, 16, 4, 1),
         ("fwd", "fp32", 256): (16, 16, 4, 1)}
_SM75 = {**_SM80, ("fwd", "fp32", 64): (32, 16, 4, 1)}  # 32x32: 24 B spilled (2-D windows)
# sm_86 / sm_89 (same spills on both, `--arch 86 89`): the sm_80 tiles spill 8-28 B in these 8
# (16-bit forward d=16/64 band, dQ and dK/dV d=64 ParGo self; fp32 forward d=32 2-D windows,
# dK/dV d=32, dQ d=128 band and d=256 ParGo self). 16-bit: half the forward's key tile, one
# stage in the backward; fp32: 16-row forward / dK/dV tiles at d=32, dQ d=256 on 4 warps (as on
# sm_90), dQ d=128 32x16 on 8 warps (16x16 on 4 or 8 warps and 16x32 spill there).
_SM86 = {**_SM80, ("fwd", "16bit", 16): (64, 32, 4, 2), ("fwd", "16bit", 64): (64, 32, 4, 2),
         ("dq", "16bit", 64): (32, 64, 4, 1), ("dkdv", "16bit", 64): (32, 32, 4, 1),
         ("fwd", "fp32", 32): (16, 32, 4, 1), ("dkdv", "fp32", 32): (16, 32, 4, 1),
         ("dq", "fp32", 128): (32, 16, 8, 1), ("dq", "fp32", 256): (16, 16, 4, 1)}
_ARCH_OVERRIDES = {75: _SM75, 80: _SM80, 86: _SM86, 89: _SM86, 90: _SM90}


def varlen_tile_config(kernel: str, block_d: int, dtype: torch.dtype,
                       arch: int = _aplan.DEFAULT_ARCH) -> dict:
    """Launch configuration of a varlen kernel on ``sm_<arch>``: the fixed-shape one unless
    overridden for that arch."""
    key = (kernel, "fp32" if dtype == torch.float32 else "16bit", block_d)
    override = _ARCH_OVERRIDES.get(arch, {}).get(key)
    if override is None:
        return tile_config(kernel, block_d, dtype, arch)
    m, n, warps, stages = override
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def _arch(t: torch.Tensor) -> int:
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return major * 10 + minor
    return _aplan.DEFAULT_ARCH


def _delta_schedule(tiles: int, block_m: int, device) -> torch.Tensor:
    """The fixed-shape delta kernel's table (first row of each row tile, ``ENTRY`` ints)."""
    table = torch.zeros((tiles, _aplan.ENTRY), dtype=torch.int32, device=device)
    table[:, 0] = torch.arange(tiles, dtype=torch.int32, device=device) * block_m
    return table


def _scalars(plan, kind: int, window) -> dict:
    left, right = window
    max_n = int(plan.extra[0])  # clip on the host to stay inside int32 (the kernel re-clips)
    return dict(n_seq=plan.n_seq, STEPS=plan.search_steps(), LEFT=min(int(left), max_n),
                RIGHT=min(int(right), max_n), NSPLIT=plan.n_split, GROWS=plan.split_rows,
                KIND=kind)


def _workspace(plan, H: int, width: int, device):
    """fp32 ``[H, S, G, width]`` and ``[H, S, G]`` for the key splits of the global rows of
    split sequences (``varlen_plan.SPLIT_KEYS``); 1-element placeholders without splits."""
    if plan.n_split == 1:
        return _empty((1,), torch.float32, device), _empty((1,), torch.float32, device)
    shape = (H, plan.n_split, plan.split_rows)
    return (_empty((*shape, width), torch.float32, device),
            _empty(shape, torch.float32, device))


def split_row_index(plan) -> torch.Tensor:
    """Packed row of every global row of a split sequence, in workspace order (``[G]`` int64,
    on the plan's device), computed there from the metadata: no host-device synchronisation
    (``output_size`` is the host-side ``G``)."""
    meta = plan.meta[:-1].to(torch.int64)
    ng = torch.where(meta[:, _plan.A_NSPLIT] > 1, meta[:, _plan.A_NQ] - meta[:, _plan.A_P0], 0)
    base = meta[:, _plan.A_Q_START] + meta[:, _plan.A_P0] - meta[:, _plan.A_GSTART]
    g = plan.split_rows
    return (torch.repeat_interleave(base, ng, output_size=g)
            + torch.arange(g, dtype=torch.int64, device=meta.device))


def _col(column: int, block: int) -> int:
    return column + _plan.TILE_SIZES.index(block)


def varlen_forward(q, k, v, plan, kind: int, window, scale: float):
    """Returns ``(out [total_q, H, Dv] contiguous, lse [H, total_q] fp32, base 2)``."""
    check_lengths(plan, q, k, v)
    total_q, H, D = q.shape
    DV = v.shape[2]
    out = _empty((total_q, H, DV), q.dtype, q.device)
    lse = _empty((H, total_q), torch.float32, q.device)
    if H == 0:
        return out, lse
    block_d, block_dv = block_dims(D, DV)
    cfg = varlen_tile_config("fwd", max(block_d, block_dv), q.dtype, _arch(q))
    ows, lws = _workspace(plan, H, DV, q.device)
    _varlen_fwd_kernel[(plan.tiles(_plan.A_QTILES, cfg["BLOCK_M"]), H)](
        q, k, v, out, lse, ows, lws, plan.meta, *q.stride(), *k.stride(), *v.stride(),
        *out.stride(), total_q, qk_scale=scale * LOG2E, D=D, DV=DV, BLOCK_D=block_d,
        BLOCK_DV=block_dv, TILE_COL=_col(_plan.A_QTILES, cfg["BLOCK_M"]),
        PRECISION=_precision(q.dtype, q.device.type == "cpu"), **_scalars(plan, kind, window),
        **cfg)
    if plan.n_split > 1:  # merge the key splits with their log-sum-exps (fixed order)
        merged = _empty((H, plan.split_rows, DV), torch.float32, q.device)
        merged_lse = _empty((H, plan.split_rows), torch.float32, q.device)
        _merge_splits(ows, lws, merged, merged_lse)
        idx = split_row_index(plan)
        out.index_copy_(0, idx, merged.transpose(0, 1).to(out.dtype))
        lse.index_copy_(1, idx, merged_lse)
    return out, lse


def varlen_backward(do, q, k, v, out, lse, plan, kind: int, window, scale: float):
    """Returns ``(dq, dk, dv)``, contiguous, in the dtype of the inputs."""
    check_lengths(plan, q, k, v)
    total_q, H, D = q.shape
    DV = v.shape[2]
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if H == 0:
        return dq, dk, dv
    block_d, block_dv = block_dims(D, DV)
    delta = _empty((H, total_q), torch.float32, q.device)
    delta_pass = q.dtype != torch.float32
    if not delta_pass:  # rowsum(O * dO): the fixed-shape kernel on [1, H, total_q, Dv] views
        block_m = delta_block_m(block_dv)
        tiles = triton.cdiv(total_q, block_m)
        sched = _delta_schedule(tiles, block_m, q.device)
        _attn_bwd_delta_kernel[(H * tiles,)](
            sched, tiles, out, do, delta, 0, out.stride(1), out.stride(0), out.stride(2), 0,
            do.stride(1), do.stride(0), do.stride(2), H, total_q, DV=DV, BLOCK_M=block_m,
            BLOCK_DV=block_dv)
    common = dict(qk_scale=scale * LOG2E, sm_scale=scale, D=D, DV=DV, BLOCK_D=block_d,
                  BLOCK_DV=block_dv, PRECISION=_precision(q.dtype, q.device.type == "cpu"),
                  **_scalars(plan, kind, window))
    cfg = varlen_tile_config("dq", max(block_d, block_dv), q.dtype, _arch(q))
    dqws, dws = _workspace(plan, H, D, q.device)
    split = plan.n_split > 1
    idx = split_row_index(plan) if split else None
    dq_args = (q, k, v, do, lse, delta, dq, dqws, dws, plan.meta, *q.stride(), *k.stride(),
               *v.stride(), *do.stride(), *dq.stride(), total_q)
    if split and delta_pass:  # the split rows' delta: per-split partial sums, then their sum
        _varlen_bwd_dq_kernel[(plan.tiles(_plan.A_STILES, cfg["BLOCK_M"]), H)](
            *dq_args, DELTA_PASS=True, DELTA_ONLY=True,
            TILE_COL=_col(_plan.A_STILES, cfg["BLOCK_M"]), **common, **cfg)
        delta.index_copy_(1, idx, dws.sum(1))
    _varlen_bwd_dq_kernel[(plan.tiles(_plan.A_QTILES, cfg["BLOCK_M"]), H)](
        *dq_args, DELTA_PASS=delta_pass, DELTA_ONLY=False,
        TILE_COL=_col(_plan.A_QTILES, cfg["BLOCK_M"]), **common, **cfg)
    if split:  # the split rows' dQ: the sum of the partial dQs in slot order
        dq.index_copy_(0, idx, dqws.sum(1).transpose(0, 1).to(dq.dtype))
    cfg = varlen_tile_config("dkdv", max(block_d, block_dv), q.dtype, _arch(q))
    _varlen_bwd_dkdv_kernel[(plan.tiles(_plan.A_KTILES, cfg["BLOCK_N"]), H)](
        q, k, v, do, lse, delta, dk, dv, plan.meta, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dk.stride(), *dv.stride(), total_q,
        TILE_COL=_col(_plan.A_KTILES, cfg["BLOCK_N"]), **common, **cfg)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (read by pargo_kernels.aot)
# --------------------------------------------------------------------------------------------
def aot_specs(arch: int = _aplan.DEFAULT_ARCH):
    """Yield ``(kernel, pointer_types, constexprs, options, label)`` for every launch the
    launchers can make on ``sm_<arch>``: each mask kind x dtype x head-dim bucket the
    fixed-shape dispatcher accepts there (``attention_plan.arch_refusal``), with
    ``varlen_tile_config(..., arch)``."""
    for dtype, ty in _TL_DTYPE.items():
        if _aplan.arch_refusal(divmod(arch, 10), dtype):
            continue
        ptrs = dict(Q=ty, K=ty, V=ty, O=ty, DO=ty, DQ=ty, DK=ty, DV_=ty, LSE="fp32",
                    DELTA="fp32", OWS="fp32", LWS="fp32", DQWS="fp32", DWS="fp32", META="i32")
        for block_d in (16, 32, 64, 128, 256):
            if _aplan.arch_refusal(divmod(arch, 10), dtype, block_d):
                continue
            for kind, kname in ((KIND_PG1D, "pg1d"), (KIND_PG2D, "pg2d"), (KIND_BAND, "band")):
                for kernel, which, col in ((_varlen_fwd_kernel, "fwd", _plan.A_QTILES),
                                           (_varlen_bwd_dq_kernel, "dq", _plan.A_QTILES),
                                           (_varlen_bwd_dkdv_kernel, "dkdv", _plan.A_KTILES)):
                    cfg = varlen_tile_config(which, block_d, dtype, arch)
                    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                    block = cfg["BLOCK_N" if which == "dkdv" else "BLOCK_M"]
                    constexprs = dict(D=block_d, DV=block_d, KIND=kind, BLOCK_D=block_d,
                                      BLOCK_DV=block_d, PRECISION=_precision(dtype),
                                      TILE_COL=col + _plan.TILE_SIZES.index(block), **cfg)
                    if which == "dq":
                        constexprs["DELTA_PASS"] = dtype != torch.float32
                        constexprs["DELTA_ONLY"] = False
                    label = (f"varlen-{kname} {ty} d={block_d} M={cfg['BLOCK_M']} "
                             f"N={cfg['BLOCK_N']} w={options['num_warps']} "
                             f"s={options['num_stages']}")
                    yield kernel, ptrs, constexprs, options, label
                    if which == "dq" and dtype != torch.float32 and kind != KIND_BAND:
                        # 16-bit split global tiles (varlen_plan.SPLIT_KEYS): the delta-only dQ
                        yield (kernel, ptrs, {**constexprs, "DELTA_ONLY": True,
                                              "TILE_COL": _col(_plan.A_STILES, block)},
                               options, f"{label} delta-only")
